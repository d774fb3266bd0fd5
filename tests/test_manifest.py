"""The typed manifest: exact round trip to JSON, attribute access, errors naming the field."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest

from stagewise.bundle import read_bundle, update_manifest, write_bundle
from stagewise.errors import ManifestError
from stagewise.images import Preprocess
from stagewise.manifest import ExitRule, LatencyStats, Manifest, StageInput
from stagewise.testing import manifest_for, stage_entry

SHA = "ab" * 32


def calibrated_document() -> dict:
    """A manifest with every optional record filled in, as calibration and profiling leave it."""
    stages = [stage_entry("s0", {"source": "image", "size": [8, 8], "tensor": "image"}, ["m/s0.onnx"], carry=True),
              stage_entry("s1", {"source": "carry", "from": "s0", "tensor": "carry_in", "shape": [-1, 4]},
                          ["m/s1.onnx"], carry=False, combine="mean_probs")]
    doc = manifest_for(stages, ["cat", "dog"], {"full": [None, None], "fast": [0.75, None]})
    for f in (f for s in doc["stages"] for f in s["artifacts"]["onnx"]["files"]):
        f.update(sha256=SHA, bytes=1234)
    doc["task"]["top_k"] = 2
    doc["input"].update(crop_fraction=0.875, interpolation="bicubic")
    doc["producer"].update(kind="early_exit", created="2026-01-01")
    s0 = doc["stages"][0]
    s0["artifacts"]["onnx"].update(precision="int8", quantization={"kept_fp32": False, "agreement": 0.99},
                                   verification={"max_abs": 1e-5})
    s0["cost"].update(params=10, latency_ms={"ort-cpu-1t": {"p50": 1.5, "p90": 1.7, "p95": 2.0, "mean": 1.6,
                                                            "n": 20}})
    s0["head"] = {"after": "layer1", "kind": "linear"}
    s0["exit"] = {"score": "learned", "temperature": 1.5, "model": {"path": "exits/s0.npz", "sha256": SHA}}
    doc["operating_points"][1].update(
        goal={"kind": "risk", "epsilon": 0.05},
        expected={"accuracy": 0.9, "agreement": 0.95, "mean_cost": 1.2, "cost_unit": "ms",
                  "exit_rates": [0.6, 0.4], "n": 100, "note": "kept as written"},
        guarantee={"epsilon": 0.05, "delta": 0.1, "n": 100, "method": "ltt", "risk": "disagreement",
                   "n_tune": 50, "upper_bound": 0.04})
    doc["calibration"] = {"n": 100, "stage_accuracy": [0.8, 0.9]}
    doc["profiles"] = {"ort-cpu-1t": {"runtime": "onnxruntime", "threads": 1, "return_ms": {"p50": 0.1}}}
    return doc


def old_document() -> dict:
    """A manifest as an early stagewise wrote it: no combine, crop fraction, interpolation or costs."""
    doc = manifest_for([stage_entry("only", {"source": "image", "size": [16, 16], "tensor": "image"}, ["a.onnx"],
                                    carry=False)], ["a", "b", "c"], {"full": [None]})
    doc["stages"][0]["artifacts"]["onnx"]["files"][0]["sha256"] = SHA
    del doc["stages"][0]["exit"]["combine"]
    doc["stages"][0]["cost"] = {}
    doc["input"]["resize"] = "shorter_crop"
    return doc


@pytest.mark.parametrize("make", [calibrated_document, old_document])
def test_round_trip_is_exact(make):
    doc = make()
    before = copy.deepcopy(doc)
    manifest = Manifest.from_dict(doc)
    assert manifest.to_dict() == doc
    assert json.loads(json.dumps(manifest.to_dict())) == doc
    assert doc == before  # parsing does not touch the document


def test_attributes_of_a_calibrated_manifest():
    m = Manifest.from_dict(calibrated_document())
    assert m.classes == ["cat", "dog"] and m.task.top_k == 2
    assert m.input == Preprocess(mean=(0, 0, 0), std=(1, 1, 1), layout="NCHW", resize="stretch",
                                 crop_fraction=0.875, interpolation="bicubic")
    s0, s1 = m.stages
    assert s0.input == StageInput.image((8, 8), "image")
    assert s1.input.source == "carry" and s1.input.from_stage == "s0" and s1.input.shape == (-1, 4)
    assert s0.outputs.names() == ("logits", "carry") and s1.outputs.carry is None
    assert s0.exit.score == "learned" and s0.exit.model.path == "exits/s0.npz" and s0.exit.combine == "own"
    assert s1.exit.combine == "mean_probs"
    onnx = s0.artifacts["onnx"]
    assert onnx.precision == "int8" and onnx.files[0].bytes == 1234 and onnx.quantization["agreement"] == 0.99
    assert s0.cost.latency("ort-cpu-1t") == LatencyStats(1.5, 2.0, 20, {"p90": 1.7, "mean": 1.6})
    assert s1.cost.latency("ort-cpu-1t") is None and s0.cost.params == 10
    fast = m.point("fast")
    assert fast.thresholds == (0.75, None)
    np.testing.assert_array_equal(fast.threshold_array, [0.75, np.inf])
    assert fast.expected.exit_rates == (0.6, 0.4) and fast.expected.other == {"note": "kept as written"}
    assert fast.guarantee.upper_bound == 0.04 and fast.guarantee.empirical_risk is None
    assert [f.path for f in m.files()] == ["m/s0.onnx", "exits/s0.npz", "m/s1.onnx"]
    with pytest.raises(KeyError):
        m.point("slow")


def test_records_are_read_only():
    m = Manifest.from_dict(calibrated_document())
    with pytest.raises(AttributeError):
        m.name = "other"
    with pytest.raises(TypeError):
        m.calibration["n"] = 5
    with pytest.raises(TypeError):
        m.stages[0].head["after"] = "layer2"


def test_writers_change_records_not_documents():
    doc = calibrated_document()
    m = Manifest.from_dict(doc)
    renamed = m.with_stages(lambda k, s: replace(s, name=f"x{k}") if k == 0 else s)
    assert [s.name for s in renamed.stages][:1] == ["x0"] and m.stages[0].name == "s0"  # the original is unchanged
    full = m.with_points([{"name": "only", "thresholds": [None] * len(m.stages)}], "only")
    assert [p.name for p in full.operating_points] == ["only"] and full.default_operating_point == "only"
    assert Manifest.from_dict(full.to_dict()) == full
    with pytest.raises(TypeError):
        m["stages"]  # no JSON view: read attributes, write with write_bundle


@pytest.mark.parametrize("change, field", [
    (lambda d: d["stages"][0]["exit"].update(temperature=0), "stages[0].exit.temperature"),
    (lambda d: d["stages"][1]["input"].update({"from": "s1"}), "stages[1].input.from"),
    (lambda d: d["operating_points"][1]["guarantee"].update(delta=2), "operating_points[1].guarantee.delta"),
    (lambda d: d["task"].update(labels=["one"]), "task.labels"),
])
def test_a_bad_field_is_named(change, field):
    doc = calibrated_document()
    change(doc)
    with pytest.raises(ManifestError, match=field.replace("[", r"\[").replace("]", r"\]")):
        Manifest.from_dict(doc)


def test_exit_rule_written_without_combine_stays_without():
    rule = ExitRule.from_dict({"score": "margin", "temperature": 2.0})
    assert rule.combine == "own" and rule.to_dict() == {"score": "margin", "temperature": 2.0}
    assert ExitRule("margin", 2.0, "mean_probs").to_dict()["combine"] == "mean_probs"


@pytest.mark.parametrize("suffix", ["", ".swb"])
def test_bundles_read_typed_and_write_either_form(tmp_path, suffix):
    doc = old_document()
    data = tmp_path / "a.onnx"
    data.write_bytes(b"model")
    first = write_bundle(tmp_path / f"first{suffix}", doc, {"a.onnx": data})
    bundle = read_bundle(first)
    assert isinstance(bundle.manifest, Manifest) and bundle.classes == ["a", "b", "c"]
    second = write_bundle(tmp_path / f"second{suffix}", bundle.manifest, {"a.onnx": data})
    assert read_bundle(second).manifest == bundle.manifest

    def rename(m: Manifest, root) -> Manifest:
        assert m == bundle.manifest
        return replace(m, name="renamed")
    assert update_manifest(second, rename).name == "renamed" and read_bundle(second).manifest.name == "renamed"
    bundle.close()
