"""Average-budget mode on the scripted mock backend: convergence, step changes, infeasible targets."""

from __future__ import annotations

import numpy as np
import pytest

from stagewise.manifest import Manifest
from stagewise.runtimes.controller import ControllerError, MeanBudgetController, points_from_manifest
from stagewise.runtimes.latency import LatencyModel
from stagewise.testing import manifest_for, scripted_cascade, scripted_image, stage_entry

TOLERANCE = 0.04  # the windowed mean cost must be within 4% of the budget once converged

# Stage-0 confidence is uniform on 0..255 in the test images, so a threshold t exits a share
# of about 1 - t at the first stage. Accuracies are made up but consistent (exiting more costs accuracy).
POINTS = {"full": ([None, None], [0.0, 1.0], 0.80),
          "drop-0.5pt": ([0.8, None], [0.2, 0.8], 0.795),
          "drop-1pt": ([0.6, None], [0.4, 0.6], 0.785),
          "drop-2pt": ([0.4, None], [0.6, 0.4], 0.77),
          "dominated": ([0.5, None], [0.5, 0.5], 0.70)}
FIRST_STAGE_ACCURACY = 0.70


def make_cascade(tmp_path, latencies=(10.0, 30.0), points=POINTS, stage_accuracy=True, **kwargs):
    def calibrated(manifest: dict) -> None:
        for p in manifest["operating_points"]:
            _, rates, acc = points[p["name"]]
            p["expected"] = {"accuracy": acc, "mean_cost": 0.0, "cost_unit": "ms", "exit_rates": rates, "n": 500}
        if stage_accuracy:
            manifest["calibration"] = {"stage_accuracy": [FIRST_STAGE_ACCURACY, 0.8]}

    cascade, sessions, _ = scripted_cascade(tmp_path / "bundle", latencies, edit=calibrated,
                                            thresholds={n: t for n, (t, _, _) in points.items()}, **kwargs)
    return cascade, sessions


class Requests:
    """Seeded images: uniform first-stage confidence, the second stage always sure."""

    def __init__(self, seed: int = 0, low: int = 0, high: int = 256):
        self.rng = np.random.default_rng(seed)
        self.low, self.high = low, high

    def __call__(self) -> np.ndarray:
        return scripted_image([int(self.rng.integers(self.low, self.high)), 250], int(self.rng.integers(0, 3)))


def run(cascade, requests, n, **kw):
    preds = [cascade.predict(requests(), **kw) for _ in range(n)]
    return np.array([p.elapsed_ms for p in preds]), np.array([p.stage_index for p in preds]), preds


def test_hull_keeps_only_points_worth_mixing(tmp_path):
    cascade, _ = make_cascade(tmp_path, mean_budget_ms=25.0)
    cascade.warm_up()
    state = cascade.controller.state()
    assert "dominated" not in state.hull
    assert state.hull[0] == "s0-only" and state.hull[-1] == "full"
    # predicted cost on this device: first stage always, second for the share that goes on
    assert state.predicted_ms["full"] == pytest.approx(40.0)
    assert state.predicted_ms["drop-1pt"] == pytest.approx(10.0 + 0.6 * 30.0)
    assert state.predicted_ms["s0-only"] == pytest.approx(10.0)


def test_converges_to_the_target_mean(tmp_path):
    cascade, sessions = make_cascade(tmp_path, mean_budget_ms=25.0)
    cascade.warm_up()
    cost, stages, preds = run(cascade, Requests(0), 1500)
    tail = cost[500:]
    assert abs(tail.mean() - 25.0) <= TOLERANCE * 25.0, tail.mean()
    assert cost.mean() <= 25.0 * (1 + TOLERANCE)
    # windows of 200 requests all within tolerance after convergence
    for w in tail.reshape(-1, 200):
        assert abs(w.mean() - 25.0) <= 2 * TOLERANCE * 25.0
    # it spends the budget: about half the images go on (10 + 0.5 * 30 = 25)
    assert 0.4 < (stages[500:] == 1).mean() < 0.55
    used = {p.operating_point for p in preds}
    assert "dominated" not in used and len(used & {"drop-0.5pt", "drop-1pt", "drop-2pt"}) >= 1


def test_adapts_to_a_step_change_in_latency_and_recovers(tmp_path):
    cascade, sessions = make_cascade(tmp_path, mean_budget_ms=25.0)
    cascade.warm_up()
    requests = Requests(1)
    before, stages_before, _ = run(cascade, requests, 800)
    sessions[0].latency, sessions[1].latency = 15.0, 45.0  # another process takes the CPU: 1.5x slower
    slow, stages_slow, _ = run(cascade, requests, 800)
    sessions[0].latency, sessions[1].latency = 10.0, 30.0  # and leaves
    after, stages_after, _ = run(cascade, requests, 800)
    settle = 150
    for phase in (before, slow, after):
        assert abs(phase[settle:].mean() - 25.0) <= TOLERANCE * 25.0, phase[settle:].mean()
    # slower device: fewer images may go on (15 + r * 45 = 25 -> r = 0.22); then accuracy comes back
    assert (stages_slow[settle:] == 1).mean() == pytest.approx(10 / 45, abs=0.06)
    assert (stages_after[settle:] == 1).mean() == pytest.approx((stages_before[settle:] == 1).mean(), abs=0.06)
    # the overshoot right after the slowdown is paid back: the mean of the whole slow phase stays near target
    assert slow.mean() <= 25.0 * (1 + TOLERANCE)


def test_corrects_a_shift_between_calibration_and_live_data(tmp_path):
    """Live images are much less confident than the calibration images were: the controller
    re-estimates the first-stage exit rates and still meets the target."""
    cascade, _ = make_cascade(tmp_path, mean_budget_ms=25.0)
    cascade.warm_up()
    cost, _, _ = run(cascade, Requests(2, low=0, high=180), 1500)
    assert abs(cost[500:].mean() - 25.0) <= TOLERANCE * 25.0


def test_budget_below_the_cheapest_point_uses_it_and_says_so(tmp_path):
    cascade, _ = make_cascade(tmp_path, mean_budget_ms=6.0)
    cascade.warm_up()
    cost, stages, preds = run(cascade, Requests(3), 50)
    assert (stages == 0).all() and {p.operating_point for p in preds} == {"s0-only"}
    assert not cascade.controller.state().feasible
    cascade.set_mean_budget(100.0)  # retarget keeps what was learned
    cost, stages, preds = run(cascade, Requests(3), 200)
    assert {p.operating_point for p in preds[-100:]} == {"full"} and (stages[-100:] == 1).all()
    assert cascade.controller.requests == 250


def test_call_option_explicit_point_and_off_switch(tmp_path):
    cascade, _ = make_cascade(tmp_path)
    cascade.warm_up()
    assert cascade.controller is None
    p = cascade.predict(Requests(4)(), mean_budget_ms=20.0)
    assert cascade.controller is not None and cascade.controller.budget_ms == 20.0
    assert p.operating_point in cascade.controller.state().predicted_ms
    # an explicit operating point bypasses the controller and does not count as its request
    assert cascade.predict(Requests(4)(), operating_point="full").operating_point == "full"
    assert cascade.controller.requests == 1
    cascade.set_mean_budget(None)
    assert cascade.controller is None and cascade.predict(Requests(4)()).operating_point == "full"


def two_stage_document(points: dict[str, list]) -> dict:
    """A valid two-stage manifest document (placeholder file hashes) with ``points``."""
    stages = [stage_entry("s0", {"source": "image", "size": [8, 8], "tensor": "image"}, ["s0.bin"], carry=True),
              stage_entry("s1", {"source": "carry", "from": "s0", "tensor": "carry"}, ["s1.bin"], carry=False)]
    for f in (f for s in stages for f in s["artifacts"]["onnx"]["files"]):
        f["sha256"] = "0" * 64
    return manifest_for(stages, ["a", "b", "c"], points)


def test_bundle_without_calibrated_points_is_refused_clearly(tmp_path):
    manifest = two_stage_document({"full": [None, None]})
    with pytest.raises(ControllerError, match="stagewise calibrate"):
        points_from_manifest(Manifest.from_dict(manifest))
    manifest["calibration"] = {"stage_accuracy": [0.6, 0.7]}
    assert [p.name for p in points_from_manifest(Manifest.from_dict(manifest))] == ["s0-only"]


def test_controller_with_a_scripted_plant_and_no_executor():
    """The controller alone against a simulated cost process (mean cost linear in the mix)."""
    latency = LatencyModel(2, min_samples=1)
    for _ in range(10):
        latency.observe(0, 4.0)
        latency.observe(1, 16.0)
    manifest = two_stage_document({n: t for n, (t, _, _) in POINTS.items()})
    for p in manifest["operating_points"]:
        _, rates, accuracy = POINTS[p["name"]]
        p["expected"] = {"accuracy": accuracy, "exit_rates": rates}
    points = points_from_manifest(Manifest.from_dict(manifest))
    ctl = MeanBudgetController(points, latency, budget_ms=12.0, horizon=50, headroom=0.0)
    rng = np.random.default_rng(5)
    costs = []
    for _ in range(2000):
        name, thr = ctl.choose()
        s0 = rng.random()
        cost = 4.0 + (16.0 if s0 < thr[0] else 0.0) + 0.5  # 0.5 ms the model does not know about
        ctl.update(cost, first_score=s0)
        costs.append(cost)
    assert np.mean(costs[500:]) == pytest.approx(12.0, rel=TOLERANCE)
    assert ctl.state().bias_ms == pytest.approx(0.5, abs=0.3)


def test_no_windup_while_the_budget_does_not_bind(tmp_path):
    """A long stretch where even the most accurate point is under budget banks no credit: when the
    device then slows down, the controller does not overspend the budget."""
    cascade, sessions = make_cascade(tmp_path, mean_budget_ms=45.0)
    cascade.warm_up()
    requests = Requests(6)
    easy, stages, _ = run(cascade, requests, 600)
    assert (stages[100:] == 1).all() and easy.mean() < 45.0  # pinned at "full" (40 ms)
    assert cascade.controller.state().upper == "full"
    sessions[0].latency, sessions[1].latency = 15.0, 45.0  # "full" now costs 60 ms
    slow, _, _ = run(cascade, requests, 800)
    assert slow[:100].mean() <= 45.0 * 1.08, slow[:100].mean()
    assert abs(slow[150:].mean() - 45.0) <= TOLERANCE * 45.0
