"""Every deprecated name of CHANGELOG.md still works for one release and warns (through stagewise.deprecation)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

import stagewise
from stagewise.bundle import read_bundle
from stagewise.deprecation import REMOVED_IN, deprecated, renamed_keywords
from stagewise.errors import CalibrationError, ConversionError, InvalidOptionError
from stagewise.images import Preprocess
from stagewise.runtimes import load as runtimes_load
from stagewise.runtimes.records import StageRecord
from stagewise.runtimes.stream import FrameResult
from stagewise.runtimes.trace_log import read_log
from stagewise.testing import fake_runtime, manifest_for, scripted_bundle, scripted_cascade, scripted_image, stage_entry

OLD = f"is deprecated and will be removed in stagewise {REMOVED_IN}"


def test_the_helper_warns_at_the_callers_line():
    with pytest.warns(DeprecationWarning, match=f"old {OLD}; use new") as caught:
        deprecated("old", "new", stacklevel=2)
    assert caught[0].filename == __file__

    @renamed_keywords(before="after")
    def f(after=None):
        return after

    with pytest.raises(TypeError, match="both before= and after="):
        f(before=1, after=2)


@pytest.mark.parametrize("load", [stagewise.load, runtimes_load], ids=["stagewise.load", "runtimes.load"])
def test_load_backend_is_runtime(tmp_path, load):
    bundle = scripted_bundle(tmp_path / "b")
    with fake_runtime("fake"):
        with pytest.warns(DeprecationWarning, match=r"load\(backend=...\) " + OLD + "; use runtime="):
            cascade = load(bundle, backend="fake")
        with cascade:
            assert cascade.runtime == "fake"


def test_serve_backend_is_runtime(tmp_path):
    from stagewise.runtimes.serve import serve

    with pytest.warns(DeprecationWarning, match=r"serve\(backend=...\) " + OLD):
        with pytest.raises(InvalidOptionError, match="port"):  # refused before anything is loaded
            serve(str(tmp_path / "nowhere"), port=-1, backend="onnxruntime")


def test_recalibrate_backend_and_labels_are_runtime_and_labelled(tmp_path):
    from stagewise.runtimes.calibrate import recalibrate

    with pytest.warns(DeprecationWarning) as caught:
        # labels=False arrives as labelled=False: bounding the error increase is then refused, before any image is read
        with pytest.raises(CalibrationError, match="error increase needs labels"):
            recalibrate(tmp_path / "b", tmp_path / "data", backend="onnxruntime", labels=False, risk=0.1, delta=0.1,
                        risk_kind="error_increase")
    assert {str(w.message).split(" is ")[0] for w in caught} == {"recalibrate(backend=...)", "recalibrate(labels=...)"}


def test_prediction_stage_is_stage_index_and_record_stage_is_stage_name(tmp_path):
    cascade = scripted_cascade(tmp_path / "b").cascade
    p = cascade.predict(scripted_image([10, 240, 0], label=1))
    with pytest.warns(DeprecationWarning, match=r"Prediction.stage " + OLD + "; use Prediction.stage_index"):
        assert p.stage == p.stage_index == 1
    with pytest.warns(DeprecationWarning, match=r"StageRecord.stage " + OLD + "; use StageRecord.stage_name"):
        assert p.trace[1].stage == p.trace[1].stage_name == p.stage_name == "s1"


def test_task_labels_is_classes(tmp_path):
    task = read_bundle(scripted_bundle(tmp_path / "b", classes=("x", "y", "z"))).manifest.task
    with pytest.warns(DeprecationWarning, match=r"Task.labels " + OLD + "; use Task.classes"):
        assert task.labels == task.classes == ("x", "y", "z")


@pytest.mark.parametrize("helper", ["manifest_for", "scripted_bundle", "scripted_cascade"])
def test_testing_helpers_take_classes(tmp_path, helper):
    with pytest.warns(DeprecationWarning, match=helper + r"\(labels=...\) " + OLD + "; use classes="):
        if helper == "manifest_for":
            made = manifest_for([stage_entry("s0", {"source": "image", "size": [8, 8]}, ["s0.bin"], carry=False)],
                                labels=["p", "q"], thresholds={"full": [None]})
            assert made["task"]["labels"] == ["p", "q"]
        elif helper == "scripted_bundle":
            assert read_bundle(scripted_bundle(tmp_path / "b", labels=("p", "q", "r"))).classes == ["p", "q", "r"]
        else:
            assert scripted_cascade(tmp_path / "c", labels=("p", "q", "r")).cascade.classes == ["p", "q", "r"]


def test_frame_result_to_dict_needs_no_stage_names(tmp_path):
    cascade = scripted_cascade(tmp_path / "b").cascade
    p = cascade.predict(scripted_image([240, 0, 0], label=2))
    frame = FrameResult(0, "ok", 0.0, 10.0, 0.0, 2.0, None, p)
    with pytest.warns(DeprecationWarning, match=r"FrameResult.to_dict\(stage_names\) " + OLD):
        old = frame.to_dict(cascade.stage_names)
    assert old == frame.to_dict() and old["stage_name"] == "s0" and old["stage_index"] == 0


def test_logs_written_before_the_rename_still_read(tmp_path):
    """A 0.1 `stagewise run --json` line: the class under `name`, the stage's name under `stage` (also in the trace)."""
    record = {"stage": "s0", "decision": "exit", "score": 0.9, "label": 2, "latency_ms": 1.0, "predicted_ms": None,
              "threshold": 0.8}
    log = tmp_path / "old.jsonl"
    log.write_text(json.dumps({"image": "a.png", "label": 2, "name": "c", "score": 0.9, "stage": "s0",
                               "elapsed_ms": 1.0, "budget_limited": False, "operating_point": "default",
                               "trace": [record]}) + "\n")
    (prediction, sample), = read_log(log)
    assert (prediction.label, prediction.name, prediction.stage_index, prediction.stage_name) == (2, "c", 0, "s0")
    assert prediction.trace[0] == StageRecord("s0", "exit", 0.9, 2, 1.0, None, 0.8) and sample is None


def test_savchenko_takes_targets():
    from stagewise.converters.savchenko import (SavchenkoSettings, fit_linear_head, max_wrong_class,
                                                savchenko_heads)

    rng = np.random.default_rng(0)
    targets = np.repeat(np.arange(3), 8)
    features = rng.normal(size=(24, 4)) + np.eye(3, 4)[targets] * 3
    settings = SavchenkoSettings(alphas=(0.2,))
    with pytest.warns(DeprecationWarning, match=r"fit_linear_head\(labels=...\) " + OLD + "; use targets="):
        head = fit_linear_head(features, labels=targets, classes=3, settings=settings)
    assert head.decision(features).shape == (24, 3)
    with pytest.warns(DeprecationWarning, match=r"max_wrong_class\(labels=...\) " + OLD):
        assert max_wrong_class(np.eye(3), labels=np.arange(3)).tolist() == [0.0, 0.0, 0.0]
    with pytest.warns(DeprecationWarning, match=r"savchenko_heads\(labels=...\) " + OLD):
        result = savchenko_heads([features, features], labels=targets, classes=3, settings=settings)
    with pytest.warns(DeprecationWarning, match=r"SavchenkoResult.held_out_labels " + OLD):
        assert result.held_out_labels is result.held_out_targets


def test_converters_take_classes(tmp_path):
    from stagewise.converters.build import build_bundle
    from stagewise.converters.candidates import measure_candidates
    from stagewise.converters.options import BuildOptions

    pre = Preprocess.from_manifest(manifest_for([], ["a"], {"full": []})["input"])
    with pytest.warns(DeprecationWarning, match=r"build_bundle\(labels=...\) " + OLD + "; use classes="):
        with pytest.raises(ConversionError, match="one framework"):  # no plans: refused before any work
            build_bundle(tmp_path / "b", "b", [], pre, labels=["a"], calibration=None)
    with pytest.warns(DeprecationWarning, match=r"measure_candidates\(labels=...\) " + OLD):
        assert measure_candidates([], pre, labels=["a"], calibration=[], options=replace(BuildOptions())) == []
