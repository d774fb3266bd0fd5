"""The sequential executor: runs a bundle's stages in order and stops as soon as one is sure.

``Cascade.predict`` handles one image, optionally under a latency budget (a stage whose
predicted latency does not fit in what is left is skipped and the best answer so far is
returned). ``Cascade.predict_batch`` routes per sample: samples that exit leave the batch and
only the undecided ones are sent to the next stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from stagewise.bundle import Bundle, read_bundle
from stagewise.calibration import thresholds_of
from stagewise.errors import UnknownOperatingPointError
from stagewise.exits import confidence, softmax
from stagewise.images import Preprocess, load_image

from .base import DEFAULT_PREFERENCE, LoadOptions, StageIO, StageSession, resolve_runtime
from .latency import LatencyModel


@dataclass(frozen=True)
class StageRecord:
    """What happened at one stage for one prediction.

    ``decision`` is ``"exit"`` (score reached the threshold), ``"continue"``, ``"last"`` (the
    final stage always answers) or ``"skipped_budget"`` (not run: predicted to overrun).
    """

    stage: str
    decision: str
    score: float | None
    label: int | None
    latency_ms: float | None
    predicted_ms: float | None
    threshold: float | None


@dataclass(frozen=True)
class Prediction:
    """The answer for one image."""

    label: int
    name: str
    score: float
    stage: int
    elapsed_ms: float
    trace: tuple[StageRecord, ...]
    probabilities: np.ndarray
    budget_limited: bool = False

    def top_k(self, k: int = 5) -> list[tuple[int, float]]:
        """The ``k`` most probable classes with their probabilities."""
        order = np.argsort(-self.probabilities)[:k]
        return [(int(i), float(self.probabilities[i])) for i in order]


@dataclass(frozen=True)
class _Stage:
    name: str
    session: StageSession
    io: StageIO
    size: tuple[int, int] | None
    carry_from: int | None
    logits: str
    carry: str | None
    score: str
    temperature: float
    combine: str


class Cascade:
    """A loaded bundle, ready to classify images stage by stage."""

    def __init__(self, bundle: Bundle, sessions: Sequence[StageSession], runtime: str, threads: int | None,
                 device: str = "CPU", clock: Callable[[], float] = time.perf_counter):
        m = bundle.manifest
        self._clock = clock
        self.bundle = bundle
        self.runtime = runtime
        self.threads = threads
        self.device = device
        self.labels: list[str] = m["task"]["labels"]
        self.preprocess = Preprocess.from_manifest(m["input"])
        names = [s["name"] for s in m["stages"]]
        self._stages = [self._plan(spec, session, names) for spec, session in zip(m["stages"], sessions)]
        self._points = {p["name"]: p for p in m["operating_points"]}
        self.operating_point = m["default_operating_point"]
        self.latency = LatencyModel(len(self._stages))
        profile = profile_name(runtime, threads, device)
        for k, spec in enumerate(m["stages"]):
            recorded = spec["cost"].get("latency_ms", {}).get(profile)
            if recorded:
                self.latency.seed(k, recorded.get("p95", recorded["p50"]))

    @staticmethod
    def _plan(spec: dict, session: StageSession, names: list[str]) -> _Stage:
        source = spec["input"]
        outputs = spec["outputs"]
        return _Stage(
            name=spec["name"], session=session, io=stage_io(spec),
            size=tuple(source["size"]) if source["source"] == "image" else None,
            carry_from=names.index(source["from"]) if source["source"] == "carry" else None,
            logits=outputs["logits"], carry=outputs.get("carry"), score=spec["exit"]["score"],
            temperature=spec["exit"]["temperature"], combine=spec["exit"].get("combine", "own"))

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self._stages]

    @property
    def operating_points(self) -> list[str]:
        return list(self._points)

    def use(self, name: str) -> None:
        """Make ``name`` the operating point used when a call does not name one."""
        self._thresholds(name)
        self.operating_point = name

    def _thresholds(self, name: str | None) -> np.ndarray:
        name = self.operating_point if name is None else name
        if name not in self._points:
            raise UnknownOperatingPointError(
                f"unknown operating point {name!r}; this bundle defines: {', '.join(self._points)} "
                "(see `stagewise inspect`, or add one with `stagewise calibrate`)")
        return thresholds_of(self._points[name])

    def warm_up(self, runs: int = 2) -> None:
        """Run every stage ``runs`` times on a grey image; the last run seeds the latency model."""
        size = max((s.size for s in self._stages if s.size), key=lambda hw: hw[0] * hw[1])
        grey = np.full((size[0], size[1], 3), 128, dtype=np.uint8)
        for r in range(runs):
            prediction = self.run_all_stages(grey)
            if r == runs - 1:
                for k, record in enumerate(prediction.trace):
                    self.latency.seed(k, max(record.latency_ms, self.latency.predict(k)))

    def run_all_stages(self, image: Any) -> Prediction:
        """Run every stage on one image regardless of thresholds (for profiling and inspection)."""
        return self._run(load_image(image), np.full(len(self._stages), np.inf), None, observe=False)

    def stage_logits(self, images: Sequence[Any], batch_size: int = 32) -> list[np.ndarray]:
        """Every stage's raw logits for every image (N x C per stage), in batches."""
        per_stage: list[list[np.ndarray]] = [[] for _ in self._stages]
        for i in range(0, len(images), batch_size):
            chunk = [load_image(im) for im in images[i:i + batch_size]]
            carries: dict[int, np.ndarray] = {}
            for k, st in enumerate(self._stages):
                x = self.preprocess.tensor(chunk, st.size) if st.size else carries[st.carry_from]
                out = st.session.run(x)
                per_stage[k].append(out[st.logits])
                if st.carry:
                    carries[k] = out[st.carry]
        return [np.concatenate(xs) for xs in per_stage]

    def predict_stage(self, image: Any, stage: int) -> Prediction:
        """The answer of the single network that ends at ``stage``, on its own probabilities.

        For a stage that reads the image this runs that stage alone (one model of a cascade);
        for a carry stage it runs the chain of stages feeding it (a truncated network).
        """
        start = self._clock()
        img = load_image(image)
        chain = [stage]
        while self._stages[chain[-1]].carry_from is not None:
            chain.append(self._stages[chain[-1]].carry_from)
        carries: dict[int, np.ndarray] = {}
        records = []
        for k in reversed(chain):
            st = self._stages[k]
            t0 = self._clock()
            out = st.session.run(self.preprocess.tensor([img], st.size) if st.size else carries[st.carry_from])
            if st.carry:
                carries[k] = out[st.carry]
            probs = softmax(out[st.logits], st.temperature)
            score = float(confidence(st.score, probs, out[st.logits])[0])
            records.append(StageRecord(st.name, "last" if k == stage else "continue", score, int(probs[0].argmax()),
                                       (self._clock() - t0) * 1e3, None, None))
        label = int(probs[0].argmax())
        return Prediction(label, self.labels[label], score, stage, (self._clock() - start) * 1e3,
                          tuple(records), probs[0])

    def predict(self, image: Any, budget_ms: float | None = None, operating_point: str | None = None) -> Prediction:
        """Classify one image (HxWx3 uint8 RGB array, PIL image or path).

        With ``budget_ms``, a stage after the first runs only if its predicted latency fits in
        the time left; otherwise the best answer so far is returned with ``budget_limited``.
        """
        start = self._clock()
        thresholds = self._thresholds(operating_point)
        return self._run(load_image(image), thresholds, budget_ms, start=start)

    def _run(self, image: np.ndarray, thresholds: np.ndarray, budget_ms: float | None,
             start: float | None = None, observe: bool = True) -> Prediction:
        start = self._clock() if start is None else start
        records: list[StageRecord] = []
        carries: dict[int, np.ndarray] = {}
        total = None
        best = None
        limited = False
        last = len(self._stages) - 1
        for k, st in enumerate(self._stages):
            predicted = self.latency.predict(k) if budget_ms is not None else None
            if predicted is not None and best is not None:
                left = budget_ms - (self._clock() - start) * 1e3
                if predicted > left:
                    limited = True
                    records.extend(StageRecord(s.name, "skipped_budget", None, None, None,
                                               self.latency.predict(j), None)
                                   for j, s in enumerate(self._stages[k:], start=k))
                    break
            t0 = self._clock()
            x = self.preprocess.tensor([image], st.size) if st.size else carries[st.carry_from]
            out = st.session.run(x)
            probs, total = self._decide(st, k, out[st.logits], total)
            score = float(confidence(st.score, probs, out[st.logits])[0])
            ms = (self._clock() - t0) * 1e3
            if observe:
                self.latency.observe(k, ms)
            if st.carry:
                carries[k] = out[st.carry]
            best = (k, probs[0], score)
            done = k == last or score >= thresholds[k]
            decision = "last" if k == last else ("exit" if done else "continue")
            records.append(StageRecord(st.name, decision, score, int(probs[0].argmax()), ms, predicted,
                                       None if k == last or not np.isfinite(thresholds[k]) else float(thresholds[k])))
            if done:
                break
        k, probs, score = best
        label = int(probs.argmax())
        return Prediction(label, self.labels[label], score, k, (self._clock() - start) * 1e3,
                          tuple(records), probs, limited)

    @staticmethod
    def _decide(st: _Stage, k: int, logits: np.ndarray, total: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The stage's deciding probabilities and the updated running sum of probabilities."""
        own = softmax(logits, st.temperature)
        total = own if total is None else total + own
        return (total / (k + 1) if st.combine == "mean_probs" else own), total

    def predict_batch(self, images: Iterable[Any], operating_point: str | None = None) -> list[Prediction]:
        """Classify many images with per-sample routing; same answers as ``predict`` one by one."""
        start = self._clock()
        thresholds = self._thresholds(operating_point)
        imgs = [load_image(im) for im in images]
        n = len(imgs)
        active = np.arange(n)
        carries: dict[int, np.ndarray] = {}
        total: np.ndarray | None = None
        traces: list[list[StageRecord]] = [[] for _ in range(n)]
        results: list[Prediction | None] = [None] * n
        last = len(self._stages) - 1
        for k, st in enumerate(self._stages):
            if not len(active):
                break
            t0 = self._clock()
            x = self.preprocess.tensor([imgs[i] for i in active], st.size) if st.size else carries[st.carry_from][active]
            out = st.session.run(x)
            logits = out[st.logits]
            own = softmax(logits, st.temperature)
            if total is None:
                total = np.zeros((n, own.shape[1]))
            total[active] += own
            probs = total[active] / (k + 1) if st.combine == "mean_probs" else own
            scores = confidence(st.score, probs, logits)
            ms = (self._clock() - t0) * 1e3
            if st.carry:
                carry = out[st.carry]
                carries.setdefault(k, np.zeros((n,) + carry.shape[1:], dtype=carry.dtype))[active] = carry
            done = np.full(len(active), True) if k == last else scores >= thresholds[k]
            now = (self._clock() - start) * 1e3
            for row, i in enumerate(active):
                decision = "last" if k == last else ("exit" if done[row] else "continue")
                traces[i].append(StageRecord(st.name, decision, float(scores[row]), int(probs[row].argmax()), ms, None,
                                             None if k == last or not np.isfinite(thresholds[k]) else float(thresholds[k])))
                if done[row]:
                    label = int(probs[row].argmax())
                    results[i] = Prediction(label, self.labels[label], float(scores[row]), k, now,
                                            tuple(traces[i]), probs[row])
            active = active[~done]
        return results

    def close(self) -> None:
        """Release the sessions and any temporary files of a ``.swb`` bundle."""
        self._stages = []
        self.bundle.close()

    def __enter__(self) -> "Cascade":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stage_io(spec: dict) -> StageIO:
    """The tensor names of a manifest stage."""
    outputs = spec["outputs"]
    return StageIO(spec["input"]["tensor"], tuple(v for v in (outputs["logits"], outputs.get("carry")) if v))


def profile_name(runtime: str, threads: int | None, device: str = "CPU") -> str:
    """The name under which a latency profile for this configuration is stored."""
    return f"{runtime}-{device.lower()}-{threads or 'default'}t"


def load(path: str | Path, backend: str = "auto", device: str = "CPU", threads: int | None = None,
         prefer: Sequence[str] = DEFAULT_PREFERENCE, warmup: bool = True, options: dict | None = None) -> Cascade:
    """Open a bundle (directory or ``.swb``) on a runtime and return a ready :class:`Cascade`.

    ``backend`` is ``"onnxruntime"``, ``"openvino"``, ``"litert"`` or ``"auto"`` (the first
    of ``prefer`` that is installed and that the bundle carries artifacts for). ``threads`` sets
    the runtime's intra-op threads; ``options`` passes runtime-specific settings.
    """
    bundle = read_bundle(path)
    try:
        runtime = resolve_runtime(backend, bundle.formats(), prefer)
        opener = runtime.opener()
        load_options = LoadOptions(threads=threads, device=device, extra=dict(options or {}))
        sessions = []
        for k, spec in enumerate(bundle.manifest["stages"]):
            sessions.append(opener(bundle.artifact_paths(k, runtime.artifact_format), stage_io(spec), load_options))
    except BaseException:
        bundle.close()
        raise
    cascade = Cascade(bundle, sessions, runtime.name, threads, device)
    if warmup:
        cascade.warm_up()
    return cascade
