"""Test doubles for code that uses stagewise: cascades and runtimes without a model or a backend.

Your own tests can run the real executor (routing, budgets, operating points, traces, the
service) on *scripted* stages whose answers and latencies you choose::

    from stagewise.testing import scripted_cascade, scripted_image

    def test_my_app_takes_the_early_answer(tmp_path):
        cascade, sessions, clock = scripted_cascade(tmp_path / "bundle", latencies=(2.0, 5.0, 20.0))
        p = cascade.predict(scripted_image([240, 0, 0], label=2))   # stage 0 is 94 % sure of class 2
        assert (p.stage_index, p.label, p.elapsed_ms) == (0, 2, 2.0)

or load a bundle by name through a runtime that exists only inside a ``with`` block (the CLI
and :func:`stagewise.load` then work end to end)::

    with fake_runtime("fake"):
        cascade = stagewise.load(scripted_bundle(tmp_path / "bundle"), runtime="fake")

What is here:

* :class:`ScriptedSession` (a :class:`~stagewise.runtimes.StageSession`) and :class:`FakeClock`:
  a stage takes its scripted latency on the fake clock and reads its confidence and class from
  the image (:func:`scripted_image`);
* :func:`stage_entry`, :func:`manifest_for`: manifest documents of stages and operating points;
* :func:`scripted_bundle`: a valid bundle on disk whose model files are placeholder bytes;
* :func:`scripted_cascade`: that bundle as a :class:`~stagewise.runtimes.Cascade` on scripted sessions;
* :class:`EchoSession`, :class:`FakeRuntime` and :func:`fake_runtime`: a runtime registered for
  the duration of a ``with`` block.

Importing this module loads numpy and stagewise's device side only (no backend, no training framework).
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from .bundle import read_bundle, write_bundle
from .deprecation import renamed_keywords
from .runtimes.base import RUNTIMES, LoadOptions, Opener, Runtime, StageIO, StageSession, register_runtime
from .runtimes.executor import Cascade


class FakeClock:
    """A clock (seconds) that only moves when a scripted stage runs or a test moves ``now``."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ScriptedSession(StageSession):
    """A stage session whose answer is written in the image and whose run takes ``latency_ms`` on ``clock``.

    Stage ``k`` reads its confidence (0-255) at row 0, column ``k`` of channel 0 and the class at
    row 0, column 0 of channel 1 (see :func:`scripted_image`); it returns logits whose softmax
    gives that class that confidence, and the input itself as ``carry``, so every stage of a
    chain sees the image. ``latency_ms`` is one number, or a list of them taken one per call
    (``latencies``: anything with ``pop``, e.g. a seeded generator). ``calls`` records the batch size of every run.
    """

    def __init__(self, k: int, clock: FakeClock, latency_ms: float | list[float], classes: int = 3):
        self.k, self.clock, self.classes = k, clock, classes
        self.latencies = latency_ms if isinstance(latency_ms, list) else None
        self.latency = latency_ms
        self.calls: list[int] = []

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        self.calls.append(len(x))
        ms = self.latencies.pop(0) if self.latencies else self.latency
        self.clock.now += ms / 1e3
        p = np.clip(x[:, 0, 0, self.k] / 255.0, 1e-3, 1 - 1e-3)
        label = x[:, 1, 0, 0].astype(int) % self.classes
        logits = np.zeros((len(x), self.classes), dtype=np.float32)
        logits[np.arange(len(x)), label] = np.log(p / (1 - p) * (self.classes - 1))
        return {"logits": logits, "carry": x}


def scripted_image(confidences: Sequence[int], label: int, size: int = 8) -> np.ndarray:
    """An RGB image (uint8, ``size`` x ``size``) that tells stage ``k`` of a :class:`ScriptedSession` to be
    ``confidences[k]`` / 255 sure of class ``label``."""
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[0, :len(confidences), 0] = confidences
    img[0, 0, 1] = label
    return img


def stage_entry(name: str, source: dict, files: list[str], carry: bool, score: str = "max_softmax",
                combine: str = "own") -> dict:
    """A manifest stage: reads ``source`` (its ``input``), ONNX artifact ``files``, outputs ``logits``
    (and ``carry`` when ``carry``), the exit rule ``score``/``combine`` at temperature 1, 1 MAC."""
    return {"name": name, "input": source,
            "artifacts": {"onnx": {"files": [{"path": f} for f in files], "precision": "fp32"}},
            "outputs": {"logits": "logits", **({"carry": "carry"} if carry else {})},
            "exit": {"score": score, "temperature": 1.0, "combine": combine}, "cost": {"macs": 1}}


@renamed_keywords(labels="classes")
def manifest_for(stages: list[dict], classes: Sequence[str], thresholds: Mapping[str, Sequence[float | None]]) -> dict:
    """A valid manifest document around ``stages`` (float NCHW input, mean 0, std 1, stretched) with one
    operating point per entry of ``thresholds`` (name: a threshold per stage), the first the default."""
    return {
        "format": "stagewise-bundle", "format_version": 1, "name": "test",
        "producer": {"stagewise": "0.1.0", "source_framework": "torch"},
        "task": {"type": "classification", "labels": list(classes)},
        "input": {"color": "RGB", "layout": "NCHW", "dtype": "float32", "mean": [0, 0, 0], "std": [1, 1, 1],
                  "resize": "stretch"},
        "stages": stages,
        "operating_points": [{"name": n, "thresholds": list(t)} for n, t in thresholds.items()],
        "default_operating_point": next(iter(thresholds)),
    }


@renamed_keywords(labels="classes")
def scripted_bundle(out: str | Path, stages: int = 3, *, chained: bool = True, combine: str = "own",
                    thresholds: Mapping[str, Sequence[float | None]] | None = None,
                    classes: Sequence[str] = ("a", "b", "c"), profile: Sequence[float] | None = None,
                    edit: Callable[[dict], None] | None = None) -> Path:
    """Write a valid bundle of ``stages`` stages ``s0``, ``s1``, ... to ``out`` (a directory or a ``.swb``);
    its model files are placeholder bytes, so it runs on :class:`ScriptedSession` or a :func:`fake_runtime`.

    ``chained``: stage ``k`` reads the carry of stage ``k - 1`` (an early-exit network); otherwise every
    stage reads the 8x8 image (a model cascade, where a budget may skip cheap stages). Stages after the
    first decide on ``combine`` (own or mean_probs). ``thresholds``: operating points (default: one,
    ``default``, where stage ``k`` exits at confidence 0.8 - 0.2k). ``profile``: a p95 latency (ms) per
    stage, stored as device profile ``mock-cpu-1t`` (the profile of :func:`scripted_cascade`). ``edit``
    changes the manifest document before it is written.
    """
    image = {"source": "image", "size": [8, 8], "tensor": "image"}
    entries = [stage_entry(f"s{k}", image if k == 0 or not chained else
                           {"source": "carry", "from": f"s{k - 1}", "tensor": "carry"},
                           [f"s{k}.bin"], carry=chained and k < stages - 1, combine=combine if k else "own")
               for k in range(stages)]
    for entry, p95 in zip(entries, profile or ()):
        entry["cost"]["latency_ms"] = {"mock-cpu-1t": {"p50": p95 / 2, "p95": p95, "n": 10}}
    thresholds = thresholds or {"default": [round(0.8 - 0.2 * k, 2) for k in range(stages - 1)] + [None]}
    manifest = manifest_for(entries, classes, thresholds)
    if edit is not None:
        edit(manifest)
    with tempfile.TemporaryDirectory(prefix="stagewise-scripted-") as folder:
        files = {}
        for k in range(stages):
            files[f"s{k}.bin"] = Path(folder) / f"s{k}.bin"
            files[f"s{k}.bin"].write_bytes(bytes([k]) * 16)
        return write_bundle(out, manifest, files)


class ScriptedCascade(NamedTuple):
    """What :func:`scripted_cascade` returns: the cascade, its sessions (one per stage) and its clock."""

    cascade: Cascade
    sessions: list[ScriptedSession]
    clock: FakeClock


@renamed_keywords(labels="classes")
def scripted_cascade(out: str | Path, latencies: Sequence[float | list[float]] = (2.0, 5.0, 20.0), *,
                     clock: FakeClock | None = None, chained: bool = True, combine: str = "own",
                     thresholds: Mapping[str, Sequence[float | None]] | None = None,
                     classes: Sequence[str] = ("a", "b", "c"), profile: Sequence[float] | None = None,
                     edit: Callable[[dict], None] | None = None, **options) -> ScriptedCascade:
    """A :func:`scripted_bundle` written to ``out`` with one stage per entry of ``latencies`` (ms per run,
    or a list of them, see :class:`ScriptedSession`), loaded as a :class:`~stagewise.runtimes.Cascade`
    on scripted sessions timed by ``clock`` (default: a new :class:`FakeClock`) under runtime name
    ``mock``, 1 thread. ``options`` go to the cascade (``latency``, ``mean_budget_ms``, ``controller``, ...)."""
    path = scripted_bundle(out, len(latencies), chained=chained, combine=combine, thresholds=thresholds,
                           classes=classes, profile=profile, edit=edit)
    clock = clock or FakeClock()
    sessions = [ScriptedSession(k, clock, ms, len(classes)) for k, ms in enumerate(latencies)]
    return ScriptedCascade(Cascade(read_bundle(path), sessions, "mock", 1, clock=clock, **options), sessions, clock)


class EchoSession(StageSession):
    """A stage session that answers at once, ``label`` with logit 5 (real clock, so time nothing on it)."""

    def __init__(self, classes: int = 3, label: int = 1):
        self.classes, self.label = classes, label

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        logits = np.zeros((len(x), self.classes), dtype=np.float32)
        logits[:, self.label] = 5.0
        return {"logits": logits, "carry": x}


def _echo(paths: Sequence[Path], io: StageIO, options: LoadOptions) -> EchoSession:
    return EchoSession()


@dataclass(frozen=True)
class FakeRuntime(Runtime):
    """A runtime that counts as installed and opens every stage with ``open_stage`` (default: an
    :class:`EchoSession`)."""

    open_stage: Opener = _echo

    def installed(self) -> bool:
        return True

    def opener(self) -> Opener:
        return self.open_stage


@contextmanager
def fake_runtime(name: str = "fake", artifact_format: str = "onnx",
                 open_stage: Opener = _echo) -> Iterator[FakeRuntime]:
    """Register a :class:`FakeRuntime` called ``name`` that runs bundles' ``artifact_format`` artifacts
    for the ``with`` block; afterwards the runtime registered under ``name`` before (if any) is back.

    ``open_stage(paths, io, options)`` returns the session of one stage (its artifact files, tensor
    names and :class:`~stagewise.runtimes.LoadOptions`)."""
    runtime = FakeRuntime(name, artifact_format, module=__name__, package="numpy",
                          install_hint="nothing to install (stagewise.testing)", open_stage=open_stage)
    before = RUNTIMES.get(name)
    register_runtime(runtime)
    try:
        yield runtime
    finally:
        if before is None:
            RUNTIMES.pop(name, None)
        else:
            RUNTIMES[name] = before


__all__ = ["EchoSession", "FakeClock", "FakeRuntime", "ScriptedCascade", "ScriptedSession", "fake_runtime",
           "manifest_for", "scripted_bundle", "scripted_cascade", "scripted_image", "stage_entry"]
