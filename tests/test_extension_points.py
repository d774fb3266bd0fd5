"""Extension points, used from outside the package through the public API only.

A toy artifact format (``npz``: a linear layer's weights as numpy arrays), a numpy runtime that runs
it and a toy exit score (the gap between the two top raw logits) are registered here, a bundle using
them is written, validated, loaded and run — no file of stagewise had to change for any of it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import stagewise
from stagewise.bundle import read_bundle, write_bundle
from stagewise.errors import InvalidOptionError, ManifestError
from stagewise.exits import SCORES, ExitScore, ScoreContext, register_exit_score
from stagewise.formats import FORMATS, Format, register_format
from stagewise.runtimes import RUNTIMES, LoadOptions, Runtime, StageIO, StageSession, register_runtime
from stagewise.testing import manifest_for, scripted_image, stage_entry

SIDE = 8
FEATURES = 3 * SIDE * SIDE


@pytest.fixture
def registries():
    """Every registry as it was before the test (the registrations below are the test's own)."""
    saved = [(table, dict(table)) for table in (FORMATS, RUNTIMES, SCORES)]
    yield
    for table, before in saved:
        table.clear()
        table.update(before)


class LinearStage(StageSession):
    """One stage of the ``npz`` format on numpy: ``logits = flat(x) @ w + b``, and ``x`` itself as the carry.
    ``seen`` keeps every input batch, so the test can recompute what the cascade should have decided."""

    def __init__(self, path: Path, io: StageIO):
        with np.load(path, allow_pickle=False) as arrays:
            self.w, self.b = arrays["w"], arrays["b"]
        self.io = io
        self.seen: list[np.ndarray] = []

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        self.seen.append(np.array(x))
        logits = x.reshape(len(x), -1).astype(np.float32) @ self.w + self.b
        outputs = {"logits": logits, "carry": x}
        return {name: outputs[name] for name in self.io.outputs}


OPENED: list[LinearStage] = []


def open_stage(paths: list[Path], io: StageIO, options: LoadOptions) -> LinearStage:
    """The runtime's opener (``Runtime.module`` names this test module)."""
    OPENED.append(LinearStage(paths[0], io))
    return OPENED[-1]


def logit_gap(probs: np.ndarray, logits: np.ndarray, context: ScoreContext) -> np.ndarray:
    """Top-1 minus top-2 raw logit."""
    top2 = np.sort(np.asarray(logits, dtype=np.float64), axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def toy_bundle(out: Path, work: Path, score: str = "logit_gap", artifact_format: str = "npz") -> Path:
    """Two stages of the ``npz`` format: stage 0 backs class 0 by the brightness of the red channel and exits when
    its ``score`` reaches 2; stage 1 reads stage 0's carry and always answers class 2 on a black image."""
    w0 = np.zeros((FEATURES, 3), np.float32)
    w0[:SIDE * SIDE, 0] = 10.0 / (SIDE * SIDE)  # NCHW: the first SIDE * SIDE inputs are channel 0
    w1 = np.zeros((FEATURES, 3), np.float32)
    weights = {"s0.npz": (w0, np.zeros(3, np.float32)), "s1.npz": (w1, np.array([0, 0, 1], np.float32))}
    files = {}
    for name, (w, b) in weights.items():
        np.savez(work / name, w=w, b=b)
        files[f"{artifact_format}/{name}"] = work / name
    stages = [stage_entry("s0", {"source": "image", "size": [SIDE, SIDE], "tensor": "image"},
                          [f"{artifact_format}/s0.npz"], carry=True, score=score),
              stage_entry("s1", {"source": "carry", "from": "s0", "tensor": "carry"},
                          [f"{artifact_format}/s1.npz"], carry=False)]
    for stage in stages:
        stage["artifacts"] = {artifact_format: stage["artifacts"]["onnx"]}
    manifest = manifest_for(stages, ["a", "b", "c"], {"default": [2.0, None]})
    return write_bundle(out, manifest, files)


def register_toys() -> None:
    register_format(Format("npz", (".npz",), "a linear layer's weights as numpy arrays"))
    register_runtime(Runtime("numpy-linear", "npz", module=__name__, package="numpy", install_hint="nothing to install"))
    register_exit_score(ExitScore("logit_gap", logit_gap, "top-1 minus top-2 raw logit"))


def test_a_registered_format_runtime_and_exit_score_run_a_bundle_end_to_end(tmp_path, registries):
    register_toys()
    path = toy_bundle(tmp_path / "toy", tmp_path)
    OPENED.clear()
    cascade = stagewise.load(path, warmup=False)  # "auto" finds the only runtime of the bundle's only format
    assert cascade.runtime == "numpy-linear" and read_bundle(path).formats() == ["npz"]

    bright = scripted_image([255, 255, 255], label=0, size=SIDE)
    bright[..., 0] = 255
    dark = np.zeros((SIDE, SIDE, 3), np.uint8)
    early, late = cascade.predict(bright), cascade.predict(dark)

    first = OPENED[0]
    gaps = [float(logit_gap(None, x.reshape(1, -1) @ first.w + first.b, ScoreContext())[0]) for x in first.seen]
    assert gaps[0] >= 2.0 > gaps[1]  # the toy score decided: the bright image exits at stage 0, the dark one not
    assert (early.stage_index, early.name) == (0, "a") and early.score == pytest.approx(gaps[0], rel=1e-6)
    assert (late.stage_index, late.name) == (1, "c")


def test_the_manifest_check_follows_the_registries(tmp_path, registries):
    with pytest.raises(ManifestError, match="artifacts"):  # the format is unknown until it is registered
        toy_bundle(tmp_path / "before", tmp_path)
    register_format(Format("npz", (".npz",)))
    with pytest.raises(ManifestError, match="score"):  # so is the exit score
        toy_bundle(tmp_path / "score", tmp_path)
    register_toys()
    assert read_bundle(toy_bundle(tmp_path / "after", tmp_path)).manifest.stages[0].exit.score == "logit_gap"


def test_registering_a_runtime_for_an_unknown_format_is_refused(registries):
    with pytest.raises(InvalidOptionError, match="did you mean 'onnx'"):
        register_runtime(Runtime("numpy-linear", "onx", module=__name__, package="numpy", install_hint="-"))


def open_bare_stage(paths: list[Path], io: StageIO, options: LoadOptions) -> object:
    """An opener whose session does not derive from StageSession."""

    class Bare:
        def run(self, x):
            return {}
    return Bare()


def test_a_runtime_whose_sessions_are_not_stage_sessions_is_refused_at_load(tmp_path, registries, monkeypatch):
    register_toys()
    path = toy_bundle(tmp_path / "toy", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "open_stage", open_bare_stage)
    with pytest.raises(InvalidOptionError, match="derive the runtime's session class from StageSession"):
        stagewise.load(path, warmup=False)
