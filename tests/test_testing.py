"""stagewise.testing: the scripted cascade of its docstring, and a fake runtime that leaves the registry as it was."""

from __future__ import annotations

import pytest

import stagewise
from stagewise.runtimes import RUNTIMES
from stagewise.testing import EchoSession, fake_runtime, scripted_bundle, scripted_cascade, scripted_image


def test_the_docstring_example_exits_early_on_the_fake_clock(tmp_path):
    cascade, sessions, clock = scripted_cascade(tmp_path / "bundle", latencies=(2.0, 5.0, 20.0))
    p = cascade.predict(scripted_image([240, 0, 0], label=2))
    assert (p.stage_index, p.label, p.elapsed_ms) == (0, 2, 2.0)
    assert p.probabilities[2] == pytest.approx(240 / 255)
    unsure = cascade.predict(scripted_image([10, 10, 10], label=1))
    assert unsure.stage_index == 2 and [len(s.calls) for s in sessions] == [2, 1, 1] and clock.now == pytest.approx(0.029)


def test_a_model_cascade_reads_the_image_at_every_stage(tmp_path):
    manifest = scripted_cascade(tmp_path / "b", (1.0, 1.0), chained=False, combine="mean_probs").cascade.bundle.manifest
    assert [s.input.source for s in manifest.stages] == ["image", "image"]
    assert [s.exit.combine for s in manifest.stages] == ["own", "mean_probs"]
    assert manifest.operating_points[0].thresholds == (0.8, None)


def test_fake_runtime_loads_bundles_by_name_and_restores_the_registry(tmp_path):
    bundle = scripted_bundle(tmp_path / "bundle.swb")
    before = dict(RUNTIMES)
    with fake_runtime("fake") as runtime:
        assert RUNTIMES["fake"] is runtime and runtime.installed()
        with stagewise.load(bundle, runtime="fake") as cascade:
            assert cascade.predict(scripted_image([0, 0, 0], label=0)).name == "b"  # EchoSession answers class 1
    assert RUNTIMES == before
    with fake_runtime("onnxruntime", open_stage=lambda paths, io, options: EchoSession(label=2)):
        with stagewise.load(bundle, runtime="onnxruntime") as cascade:
            assert cascade.predict(scripted_image([0, 0, 0], label=0)).name == "c"
    assert RUNTIMES == before
