"""Threshold calibration: constraints hold on the data fitted, search is exact for one threshold."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from stagewise.calibration import ExitTable, Goal, Settings, calibrate_stages, pareto
from stagewise.errors import CalibrationError
from stagewise.exits import confidence, softmax, stage_probabilities


def synthetic_table(n=400, k=3, seed=0) -> ExitTable:
    """Later stages are more accurate; confidence is informative of correctness."""
    rng = np.random.default_rng(seed)
    skill = np.linspace(0.55, 0.9, k)[:, None]
    correct = rng.random((k, n)) < skill
    scores = np.clip(np.where(correct, rng.normal(0.75, 0.15, (k, n)), rng.normal(0.5, 0.15, (k, n))), 0, 1)
    return ExitTable(scores, correct, np.array([1.0, 2.0, 4.0][:k]))


def test_evaluate_hand_example():
    scores = np.array([[0.9, 0.2, 0.6], [0.1, 0.9, 0.3]])
    correct = np.array([[True, False, False], [False, True, True]])
    table = ExitTable(scores, correct, np.array([1.0, 3.0]))
    out = table.evaluate(np.array([0.5, np.inf]))
    assert out.exit_rates == (2 / 3, 1 / 3)
    assert out.accuracy == pytest.approx(2 / 3)
    assert out.mean_cost == pytest.approx((1 + 4 + 1) / 3)
    oracle = table.oracle()
    assert oracle.accuracy == 1.0 and oracle.mean_cost == pytest.approx((1 + 4 + 4) / 3)


@pytest.mark.parametrize("drop", [0.0, 0.01, 0.03])
def test_min_cost_meets_accuracy_floor_on_fit_data(drop):
    table = synthetic_table()
    floor = table.full().accuracy - drop
    found = table.min_cost(floor)
    assert found.accuracy >= floor - 1e-12
    assert table.evaluate(np.array(found.thresholds)).accuracy == found.accuracy
    assert found.mean_cost <= table.full().mean_cost


def test_min_cost_is_exact_for_two_stages():
    table = synthetic_table(n=200, k=2, seed=3)
    floor = table.full().accuracy - 0.02
    found = table.min_cost(floor)
    candidates = np.append(np.unique(table.scores[0]), np.inf)
    best = min((o for o in (table.evaluate(np.array([t, np.inf])) for t in candidates) if o.accuracy >= floor),
               key=lambda o: o.mean_cost)
    assert found.mean_cost == pytest.approx(best.mean_cost)


def test_three_stage_search_close_to_brute_force():
    table = synthetic_table(n=120, k=3, seed=5)
    floor = table.full().accuracy - 0.02
    found = table.min_cost(floor)
    grid = [np.append(np.quantile(table.scores[j], np.linspace(0, 1, 25)), np.inf) for j in range(2)]
    brute = min((o for o in (table.evaluate(np.array([a, b, np.inf])) for a, b in itertools.product(*grid))
                 if o.accuracy >= floor), key=lambda o: o.mean_cost)
    assert found.accuracy >= floor
    assert found.mean_cost <= brute.mean_cost + 1e-9


def test_max_accuracy_respects_budget():
    table = synthetic_table()
    for budget in (1.5, 2.5, 4.0):
        found = table.max_accuracy(budget)
        assert found.mean_cost <= budget + 1e-12
    assert table.max_accuracy(7.0).accuracy >= table.max_accuracy(2.0).accuracy
    with pytest.raises(CalibrationError, match="raise the budget"):
        table.max_accuracy(0.5)


def test_unreachable_accuracy_is_reported():
    table = synthetic_table()
    with pytest.raises(CalibrationError, match="allow a larger drop"):
        table.min_cost(1.01)


def test_front_is_monotone():
    front = synthetic_table().front()
    costs = [o.mean_cost for o in front]
    accs = [o.accuracy for o in front]
    assert costs == sorted(costs) and accs == sorted(accs) and len(front) >= 3
    assert pareto(front) == front


def synthetic_logits(n=400, classes=4, seed=0) -> tuple[list[np.ndarray], np.ndarray]:
    """Three stages whose logits carry more of the target with depth."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, classes, n)
    logits = []
    for signal in (0.8, 1.5, 2.5):
        z = rng.normal(size=(n, classes))
        z[np.arange(n), targets] += signal
        logits.append(z)
    return logits, targets


def test_calibrate_names_points_and_default():
    logits, targets = synthetic_logits()
    exits = [{"score": "max_softmax", "temperature": 1.0, "combine": "own"} for _ in range(3)]
    result = calibrate_stages(logits, exits, np.array([1.0, 2.0, 4.0]), targets, Goal("drop", 0.01),
                              Settings(fit_temperature=False, target_drops=(0.0, 0.01), budgets=(2.0,), front_points=0))
    names = [p["name"] for p in result.points]
    assert names == ["full", "drop-0pt", "drop-1pt", "budget-2ms"] and result.default == "drop-1pt"
    for p in result.points:
        assert p["thresholds"][-1] is None and len(p["thresholds"]) == 3
        assert sum(p["expected"]["exit_rates"]) == pytest.approx(1.0)
    full = result.table.full().accuracy
    assert result.points[0]["expected"]["accuracy"] == pytest.approx(full)
    assert result.points[2]["expected"]["accuracy"] >= full - 0.01
    assert result.points[2]["expected"]["mean_cost"] < result.points[0]["expected"]["mean_cost"]
    assert result.points[3]["expected"]["mean_cost"] <= 2.0 + 1e-12


def test_exit_scores():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    p = softmax(logits)
    assert confidence("max_softmax", p)[1] == pytest.approx(1 / 3)
    assert confidence("margin", p)[0] == pytest.approx(p[0, 0] - p[0, 1])
    assert confidence("entropy", p)[1] == pytest.approx(0.0, abs=1e-9)
    assert confidence("entropy", np.array([[1.0, 0.0, 0.0]]))[0] == pytest.approx(1.0)
    assert confidence("max_logit", p, logits)[0] == 2.0
    assert softmax(logits, temperature=2.0)[0, 0] < p[0, 0]
    combined = stage_probabilities([logits, logits[::-1]], [1.0, 1.0], ["own", "mean_probs"])
    np.testing.assert_allclose(combined[1], (p + p[::-1]) / 2)
    with pytest.raises(ValueError, match="unknown exit score"):
        confidence("vibes", p)
