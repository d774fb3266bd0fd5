"""The INT8 gate: accuracy on held-back images, not raw agreement; calibration once per stage; a time budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from stagewise.converters.export import Exported, SearchClock, StageInputs, export_stage, exporter
from stagewise.converters.int8_gate import Gate, bootstrap_interval, paired_proportions_interval
from stagewise.converters.onnx_export import OnnxExporter
from stagewise.converters.options import BuildOptions
from stagewise.converters.plans import cascade_plans
from stagewise.errors import ConversionError

CLASSES = 10


def boundary_logits(n: int = 2000, boundary: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float logits where a ``boundary`` share of images ties two classes, a candidate that flips exactly those
    images between the two, and labels: the float answer for confident images, a third class for boundary ones."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1, (n, CLASSES))
    answer = rng.integers(0, CLASSES, n)
    logits[np.arange(n), answer] += 6
    tied = rng.random(n) < boundary
    second = (answer + 1) % CLASSES
    logits[tied, second[tied]] = logits[tied, answer[tied]] - 0.01
    candidate = logits.copy()
    candidate[tied, second[tied]] += 0.02  # the candidate answers the other of the two tied classes
    targets = np.where(tied, (answer + 2) % CLASSES, answer)
    return logits, candidate, targets


def test_boundary_flips_pass_the_accuracy_gate_and_fail_the_agreement_rule():
    reference, candidate, targets = boundary_logits()
    verdict = Gate().judge(reference, targets)(candidate)
    assert verdict.passes and verdict.record["accuracy_difference"] == 0.0
    assert verdict.record["agreement_with_fp32"] < 0.85 and verdict.record["decided_by"] == "interval"
    assert "within the 0.5 pt --int8-max-drop" in verdict.summary
    old = Gate(tolerance=0.99).judge(reference, targets)(candidate)
    assert not old.passes and old.record["rule"] == "agreement"
    # without labels, a tie between two classes costs nothing under the float probabilities either
    unlabelled = Gate().judge(reference, None)(candidate)
    assert unlabelled.passes and abs(unlabelled.record["accuracy_difference"]) < 2e-3
    assert unlabelled.record["measure"] == "float_probabilities"


def test_confident_flips_fail_the_gate_with_and_without_labels():
    reference, _, targets = boundary_logits(boundary=0.0)
    broken = reference.copy()
    wrong = np.arange(0, len(reference), 25)  # 4 % of images, all confident, answered wrong
    broken[wrong] = np.roll(broken[wrong], 3, axis=1)
    for labels in (targets, None):
        verdict = Gate().judge(reference, labels)(broken)
        assert not verdict.passes and verdict.record["accuracy_difference"] < -0.03
        assert verdict.record["difference_interval"][1] < -0.005 and verdict.record["decided_by"] == "interval"


def test_too_few_images_decide_on_the_point_estimate_and_say_so():
    reference, _, targets = boundary_logits(n=100, boundary=0.0)
    candidate = reference.copy()
    candidate[[0]] = np.roll(candidate[[0]], 3, axis=1)  # one image of 100 lost: -1 pt, interval [-3, 0]
    verdict = Gate(max_drop=0.02).judge(reference, targets)(candidate)
    assert verdict.passes and verdict.record["decided_by"] == "point estimate"
    assert "100 images cannot tell" in verdict.summary and "decided on the point estimate (kept)" in verdict.summary
    low, high = verdict.record["difference_interval"]
    assert low < -0.02 < high and verdict.record["difference_method"] == "Agresti-Min paired 95%"
    # no image changed is no proof on 30 images, and close to one on 5,000
    assert paired_proportions_interval(0, 0, 30)[0] < -0.05 and paired_proportions_interval(0, 0, 5000)[0] > -0.002
    assert bootstrap_interval(np.zeros(30))[0] < -0.05 and bootstrap_interval(np.zeros(5000))[0] > -0.002


def test_gate_options_are_checked():
    with pytest.raises(ConversionError, match="int8_max_drop"):
        BuildOptions(int8_max_drop=2.0)
    with pytest.raises(ConversionError, match="int8_search_seconds"):
        BuildOptions(int8_search_seconds=float("nan"))
    assert BuildOptions().gate == Gate(0.005, None) and BuildOptions(int8_tolerance=0.99).gate.rule == "agreement"


class Linear(nn.Module):
    """A linear classifier on 4x4 RGB inputs: its INT8 is exact enough to keep, and easy to break."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(48, CLASSES)
        with torch.no_grad():
            self.fc.weight.mul_(scale)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _linear_stage(n: int = 900):
    x = np.random.default_rng(1).normal(0, 1, (n, 3, 4, 4)).astype(np.float32)
    plan = cascade_plans([("only", Linear().eval(), (4, 4))])[0]
    with torch.no_grad():
        answers = plan.outputs(x)["logits"].argmax(1)
    return plan, x, answers


class Perturbed(OnnxExporter):
    """An exporter whose 'quantized' model is another float model (what a real quantizer's noise does, exactly)."""

    def __init__(self, model: nn.Module):
        self.candidate = cascade_plans([("only", model.eval(), (4, 4))])[0]

    def quantize(self, plan, fp32, workdir, inputs, options, *args, **kwargs):
        (workdir / "candidate").mkdir(exist_ok=True)
        files = self.export(self.candidate, workdir / "candidate", inputs, options).files
        return Exported(files, {"tool": "test", "float_layers": []})

    def quantize_mixed(self, plan, fp32, workdir, inputs, options, judge, clock=None):
        return self.quantize(plan, fp32, workdir, inputs, options)


def test_export_keeps_int8_that_only_flips_boundary_images(tmp_path):
    plan, x, answers = _linear_stage()
    flipped = Linear()
    with torch.no_grad():
        flipped.fc.bias.add_(torch.randn(CLASSES) * 0.05)  # moves the images near a boundary only
        moved = flipped(torch.from_numpy(x)).argmax(1).numpy()
    flips = moved != answers
    assert 0.01 < flips.mean() < 0.2
    after = (answers + 1) % CLASSES
    neither = np.where(after == moved, (answers + 2) % CLASSES, after)  # a class neither model answers
    targets = np.where(flips, neither, answers)  # the flipped images are wrong either way
    inputs = StageInputs(x[:16], x[:300], x[300:], agree_targets=targets[300:])
    kept, _, _ = export_stage(Perturbed(flipped), plan, tmp_path, inputs, BuildOptions(int8=True))
    q = kept["quantization"]
    assert kept["precision"] == "int8" and "rejected" not in q
    assert q["accuracy_difference"] == 0.0 and q["agreement_with_fp32"] < 0.99 and q["rule"] == "accuracy"
    assert q["measure"] == "labels" and q["images"] == 600 and q["search_seconds"] >= 0
    old, _, _ = export_stage(Perturbed(flipped), plan, tmp_path / "old", inputs,
                             BuildOptions(int8=True, int8_tolerance=0.99))
    assert old["precision"] == "fp32" and old["quantization"]["rejected"].startswith("agreement gate")


def test_export_refuses_int8_calibrated_on_absurd_ranges(tmp_path):
    plan, x, answers = _linear_stage()
    absurd = StageInputs(x[:16], x[:300] * 1000, x[300:], agree_targets=answers[300:])  # ranges 1000x too wide
    refused, files, _ = export_stage(exporter("onnx"), plan, tmp_path, absurd, BuildOptions(int8=True, int8_mixed=False))
    q = refused["quantization"]
    assert refused["precision"] == "fp32" and q["kept_fp32"] is True
    assert q["accuracy_difference"] <= -0.02 and q["difference_interval"][1] < -0.005
    assert q["rejected"].startswith("accuracy gate: top-1 100.00% ->") and "beyond the 0.5 pt" in q["rejected"]
    good = StageInputs(x[:16], x[:300], x[300:], agree_targets=answers[300:])
    kept, _, _ = export_stage(exporter("onnx"), plan, tmp_path / "good", good, BuildOptions(int8=True))
    assert kept["quantization"]["accuracy_difference"] > q["accuracy_difference"] + 0.5  # the ranges did it


def test_calibration_runs_once_per_stage_and_method(tmp_path, monkeypatch):
    import importlib

    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")

    from stagewise.converters.int8_gate import Verdict
    from stagewise.converters.onnx_export import recipes
    from toy_models import fragile_net

    calls = []
    real = ort_quantize.create_calibrator
    monkeypatch.setattr(ort_quantize, "create_calibrator",
                        lambda *a, **k: calls.append(k["calibrate_method"].name) or real(*a, **k))
    x = np.random.default_rng(0).normal(0, 1, (200, 3, 16, 16)).astype(np.float32)
    plan, inputs = cascade_plans([("only", fragile_net(), (16, 16))])[0], StageInputs(x[:16], x[:100], x[100:])
    onnx_exporter = exporter("onnx")
    fp32 = onnx_exporter.export(plan, tmp_path, inputs, BuildOptions())
    never = Verdict(False, 0.0, "refused", {"agreement_with_fp32": 0.0})
    result = onnx_exporter.quantize_mixed(plan, fp32, tmp_path, inputs, BuildOptions(int8=True), lambda c: never)
    search = result.record["search"]
    assert len(search) > len(recipes()) + 1  # every recipe, the ranking and the exclusion steps ran...
    assert sorted(calls) == sorted({r.calibration for r in recipes()})
    # ...on one calibration pass per method (MinMax, Percentile, Entropy), not one per candidate


def test_the_search_stops_when_its_time_budget_is_spent(tmp_path):
    from stagewise.converters.int8_gate import Verdict
    from toy_models import fragile_net

    x = np.random.default_rng(0).normal(0, 1, (200, 3, 16, 16)).astype(np.float32)
    plan, inputs = cascade_plans([("only", fragile_net(), (16, 16))])[0], StageInputs(x[:16], x[:100], x[100:])
    onnx_exporter = exporter("onnx")
    fp32 = onnx_exporter.export(plan, tmp_path, inputs, BuildOptions())
    never = Verdict(False, 0.0, "refused", {"agreement_with_fp32": 0.0})
    ticks = iter(range(1000))
    clock = SearchClock(1.5, clock=lambda: float(next(ticks)))  # one tick per look at the clock
    result = onnx_exporter.quantize_mixed(plan, fp32, tmp_path, inputs, BuildOptions(int8=True), lambda c: never, clock)
    search = result.record["search"]
    assert search[-1]["stopped"] == "search time budget (1.5 s) spent"
    assert len([t for t in search if "stopped" not in t]) == 2 and "ranking" not in result.record
