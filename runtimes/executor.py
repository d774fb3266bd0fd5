"""The sequential executor: runs a bundle's stages in order and stops as soon as one is sure.

``Cascade.predict`` handles one image, optionally under a latency budget (a stage whose
predicted latency does not fit in what is left is skipped and the best answer so far is
returned). ``Cascade.predict_batch`` routes per sample: samples that exit leave the batch and
only the undecided ones are sent to the next stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from stagewise.bundle import Bundle, read_bundle
from stagewise.checks import nonnegative_budget, positive_count, positive_number
from stagewise.errors import BundleError, DeadlineExceededError, UnknownOperatingPointError, UnknownOptionError
from stagewise.exits import exit_scores, load_exit_model, softmax
from stagewise.images import load_image
from stagewise.manifest import StageSpec

from .base import LoadOptions, StageIO, StageSession, resolve_runtime
from .controller import MeanBudgetController
from .latency import LatencyModel
from .model_io import check_stages
from .options import RuntimeOptions
from .patches import PatchChoice
from .routing import Carries, StageRouter, run_chain


@dataclass(frozen=True)
class StageRecord:
    """What happened at one stage for one prediction.

    ``decision`` is ``"exit"`` (score reached the threshold), ``"continue"``, ``"last"`` (the
    final stage always answers), ``"skipped_budget"`` (not run: predicted to overrun) or
    ``"cancelled_budget"`` (started, then cancelled when the budget ran out: no score).
    ``latency_ms`` is the stage's step time (input preparation, backend call, exit rule);
    ``predicted_ms`` the latency model's quantile for it before it ran. Under a budget,
    ``left_ms`` is what was left of it when the stage was considered and ``needed_ms`` what the
    scheduler reserved for it (prediction x learned margin + time to return); ``reason`` says
    why the stage ran or not: ``"no_budget"``, ``"first"`` (the first stage to run always runs),
    ``"fits"`` (needed <= left), ``"over_budget"`` (needed > left: skipped) or
    ``"planned_skip"`` (skipped so that a later, more accurate stage reading the image fits) or
    ``"cancelled"`` (ran past the budget and was stopped). ``box`` is the patch of the original
    image a patch stage read (left, top, right, bottom pixels; ``None`` for other stages).
    """

    stage: str
    decision: str
    score: float | None
    label: int | None
    latency_ms: float | None
    predicted_ms: float | None
    threshold: float | None
    left_ms: float | None = None
    needed_ms: float | None = None
    reason: str | None = None
    box: tuple[float, float, float, float] | None = None

    def explain(self) -> str:
        """One line saying why this stage ran or not."""
        if self.reason == "planned_skip":
            return (f"{self.stage}: skipped so that a later stage fits: {self.left_ms:.2f} ms left "
                    f"(this one needs {self.needed_ms:.2f})")
        if self.reason == "over_budget":
            return (f"{self.stage}: skipped, needs {self.needed_ms:.2f} ms (predicted {self.predicted_ms:.2f}) "
                    f"but {self.left_ms:.2f} ms left")
        if self.reason == "cancelled":
            return (f"{self.stage}: cancelled after {self.latency_ms:.2f} ms when the budget ran out "
                    f"({self.left_ms:.2f} ms were left, it needed {self.needed_ms:.2f})")
        ran = f"{self.stage}: ran in {self.latency_ms:.2f} ms -> {self.decision}"
        if self.score is not None:
            ran += f" (score {self.score:.3f}" + (f" vs {self.threshold:.3f})" if self.threshold is not None else ")")
        if self.reason == "first":
            return ran + f"; the first stage run always runs ({self.left_ms:.2f} ms left, needs {self.needed_ms:.2f})"
        if self.reason == "fits":
            return ran + f"; fitted: needs {self.needed_ms:.2f} ms of {self.left_ms:.2f} ms left"
        return ran


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
    budget_ms: float | None = None
    operating_point: str | None = None

    @property
    def deadline_missed(self) -> bool:
        """True when a per-request budget was given and the answer took longer."""
        return self.budget_ms is not None and self.elapsed_ms > self.budget_ms

    def top_k(self, k: int = 5) -> list[tuple[int, float]]:
        """The ``k`` most probable classes with their probabilities."""
        order = np.argsort(-self.probabilities)[:k]
        return [(int(i), float(self.probabilities[i])) for i in order]


@dataclass(frozen=True)
class _Stage:
    name: str
    session: StageSession
    io: StageIO
    logits: str
    score: str
    temperature: float
    combine: str
    exit_model: Any = None  # the learned exit score's model (stagewise.exits.LearnedExitScore)
    run_within: Any = None  # session.run_within(tensor, timeout_s) when the runtime can cancel a run


@dataclass(frozen=True)
class _Point:
    """An operating point resolved once: thresholds as Python floats (``inf``: never exits) and as the
    trace shows them (``None`` for the last stage and for stages that never exit)."""

    name: str | None
    thresholds: tuple[float, ...]
    shown: tuple[float | None, ...]

    @classmethod
    def of(cls, name: str | None, thresholds: Sequence[float]) -> "_Point":
        values = tuple(float(t) for t in thresholds)
        last = len(values) - 1
        return cls(name, values, tuple(None if k == last or not np.isfinite(t) else t for k, t in enumerate(values)))


class Cascade:
    """A loaded bundle, ready to classify images stage by stage."""

    def __init__(self, bundle: Bundle, sessions: Sequence[StageSession], runtime: str, threads: int | None,
                 device: str = "CPU", clock: Callable[[], float] = time.perf_counter,
                 mean_budget_ms: float | None = None, latency: LatencyModel | dict | None = None,
                 profile: str | None = None, controller: dict | None = None):
        m = bundle.manifest
        self._clock = clock
        self.bundle = bundle
        self.runtime = runtime
        self.threads = threads
        self.device = device
        self.classes: list[str] = m.classes
        self.preprocess = m.input
        self.preprocess.check_resizer()
        self.router = StageRouter.from_manifest(m)
        self._stages = [self._plan(spec, session, bundle.root) for spec, session in zip(m.stages, sessions)]
        self._points = {p.name: _Point.of(p.name, p.threshold_array) for p in m.operating_points}
        self._chosen: dict[str, _Point] = {}  # the controller's points, resolved on first use
        self._all = _Point.of(None, np.full(len(self._stages), np.inf))
        # under a budget, a cascade may skip cheap stages when only a later, image-reading stage fits
        self._can_jump = any(self.router.reads_image(k) for k in range(1, len(self._stages)))
        self.operating_point = m.default_operating_point
        # Budget scheduling: the latency model (options as a dict, or a ready model), seeded from
        # the bundle's device profile (``profile``; default: this runtime/device/threads).
        self.latency = latency if isinstance(latency, LatencyModel) else LatencyModel(len(self._stages),
                                                                                      **(latency or {}))
        self.profile = profile or profile_name(runtime, threads, device)
        for k, spec in enumerate(m.stages):
            stats = spec.cost.latency(self.profile)
            if stats:
                self.latency.seed(k, stats.p50 if stats.p95 is None else stats.p95)
        recorded = (m.profiles or {}).get(self.profile, {}).get("return_ms")
        if recorded:
            self.latency.seed_return(recorded.get("p95", recorded["p50"]))
        self._controller_options = dict(controller or {})
        self.controller: MeanBudgetController | None = None
        if mean_budget_ms is not None:
            self.set_mean_budget(mean_budget_ms)
        self._listeners: list[Callable[[Prediction], None]] = []

    def add_listener(self, listener: Callable[["Prediction"], None]) -> None:
        """Call ``listener(prediction)`` after every answer of :meth:`predict` and :meth:`predict_batch`
        (e.g. a drift monitor); it runs on the caller's thread, so it must be cheap."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[["Prediction"], None]) -> None:
        """Stop calling ``listener``."""
        self._listeners.remove(listener)

    def set_mean_budget(self, mean_budget_ms: float | None, **options: Any) -> None:
        """Average-budget mode: keep the running mean latency per image at ``mean_budget_ms``.

        Calls of :meth:`predict` that name no operating point then use the point chosen by a
        :class:`~stagewise.runtimes.controller.MeanBudgetController` (``options``: ``horizon``,
        ``gain``, ``headroom``). A new budget keeps what the controller learned; ``None`` turns
        the mode off.
        """
        if mean_budget_ms is None:
            self.controller = None
            return
        mean_budget_ms = positive_number("mean_budget_ms", mean_budget_ms)
        if self.controller is not None and not options:
            self.controller.retarget(mean_budget_ms)
            return
        self._controller_options.update(options)
        self.controller = MeanBudgetController.from_manifest(self.bundle.manifest, self.latency, mean_budget_ms,
                                                             **self._controller_options)

    @staticmethod
    def _plan(spec: StageSpec, session: StageSession, root: Path | None = None) -> _Stage:
        return _Stage(name=spec.name, session=session, io=stage_io(spec), logits=spec.outputs.logits,
                      score=spec.exit.score, temperature=spec.exit.temperature, combine=spec.exit.combine,
                      exit_model=_exit_model(root, spec), run_within=getattr(session, "run_within", None))

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self._stages]

    @property
    def operating_points(self) -> list[str]:
        return list(self._points)

    def use(self, name: str) -> None:
        """Make ``name`` the operating point used when a call does not name one."""
        self._point(name)
        self.operating_point = name

    def choose_patches(self, mode: str = "cam", seed: int = 0) -> None:
        """How patch stages pick their patches: from the glance stage's CAM (``"cam"``, the default) or
        at random (``"random"``: the same size, count and IoU rule, seeded by ``seed`` and each image's
        pixels), the baseline of the glance-and-focus ablation."""
        if mode not in ("cam", "random"):
            raise UnknownOptionError(f"patches are chosen by 'cam' or 'random', not {mode!r}")
        self.router = self.router.with_patches(PatchChoice(mode, int(seed)))

    def _point(self, name: str | None) -> _Point:
        name = self.operating_point if name is None else name
        point = self._points.get(name)
        if point is None:
            raise UnknownOperatingPointError(
                f"unknown operating point {name!r}; this bundle defines: {', '.join(self._points)} "
                "(see `stagewise inspect`, or add one with `stagewise calibrate`)")
        return point

    def _controlled(self, controller: MeanBudgetController) -> _Point:
        name, thresholds = controller.choose()
        point = self._chosen.get(name)
        if point is None:
            point = self._chosen[name] = _Point.of(name, thresholds)
        return point

    def warm_up(self, runs: int = 1) -> None:
        """Call every stage's backend ``runs`` times on a grey input of its own size; the last
        run's times seed the latency model.

        Only the backend calls: no decode, no resize, no exit rule, so warming up costs one
        backend pass per stage.
        """
        clock = self._clock
        for _ in range(runs):
            carries = Carries(1)
            times = []
            for k, st in enumerate(self._stages):
                x = self.router.warm_input(k, carries)
                t0 = clock()
                out = st.session.run(x)
                times.append((clock() - t0) * 1e3)
                self.router.keep(k, out, carries)
        for k, ms in enumerate(times):
            self.latency.seed(k, max(ms, self.latency.predict(k)))

    def run_all_stages(self, image: Any) -> Prediction:
        """Run every stage on one image regardless of thresholds (for profiling and inspection)."""
        return self._run(load_image(image), self._all, None, observe=False)

    def stage_logits(self, images: Sequence[Any], batch_size: int = 32) -> list[np.ndarray]:
        """Every stage's raw logits for every image (N x C per stage), in batches."""
        per_stage: list[list[np.ndarray]] = [[] for _ in self._stages]
        for i in range(0, len(images), batch_size):
            chunk = [load_image(im) for im in images[i:i + batch_size]]
            for k, _, out in run_chain(self.router, chunk, lambda k, x: self._stages[k].session.run(x)):
                per_stage[k].append(out[self._stages[k].logits])
        return [np.concatenate(xs) for xs in per_stage]

    def class_activation(self, image: Any) -> tuple[np.ndarray, tuple[float, float, float, float]]:
        """The class-activation map (grid rows x columns) of the first stage that outputs one, for one image
        (HxWx3 uint8 RGB array, PIL image or path), and the region of the image its cells cover
        (left, top, right, bottom pixels)."""
        router = self.router
        k = next((j for j, name in enumerate(router.cam_outputs) if name is not None), None)
        if k is None:
            raise BundleError("this bundle has no stage with a CAM output (a glance stage); convert it with "
                              "`stagewise convert --stage MODEL@SIZE --focus MODEL@SIZE`")
        img = load_image(image)
        carries = Carries(1)
        for j in router.chain(k):
            router.keep(j, self._stages[j].session.run(router.input(j, [img], carries)), carries)
        return carries.take(("cam", k))[0], router.cam_extent(k, img)

    def predict_stage(self, image: Any, stage: int) -> Prediction:
        """The answer of the single network that ends at ``stage``, on its own probabilities.

        For a stage that reads the image this runs that stage alone (one model of a cascade);
        for a carry stage it runs the chain of stages feeding it (a truncated network).
        """
        start = self._clock()
        img = [load_image(image)]
        carries = Carries(1)
        records = []
        for k in self.router.chain(stage):
            st = self._stages[k]
            t0 = self._clock()
            out = st.session.run(self.router.input(k, img, carries))
            self.router.keep(k, out, carries)
            probs = softmax(out[st.logits], st.temperature)
            score = float(exit_scores(st.score, probs, out[st.logits], st.temperature, model=st.exit_model,
                                      own=probs)[0])
            records.append(StageRecord(st.name, "last" if k == stage else "continue", score, int(probs[0].argmax()),
                                       (self._clock() - t0) * 1e3, None, None))
        label = int(probs[0].argmax())
        return Prediction(label, self.classes[label], score, stage, (self._clock() - start) * 1e3,
                          tuple(records), probs[0])

    def predict(self, image: Any, budget_ms: float | None = None, operating_point: str | None = None,
                mean_budget_ms: float | None = None) -> Prediction:
        """Classify one image (HxWx3 uint8 RGB array, PIL image or path).

        ``budget_ms`` is a per-request deadline, counted from this call: a stage after the
        first runs only if ``elapsed + needed <= budget_ms``, where ``needed`` is the stage's
        predicted step time (a high quantile of its recent live measurements) times a safety
        margin learned from past prediction errors, plus the time to return (see
        :mod:`stagewise.runtimes.latency`). Otherwise the best answer so far is returned with
        ``budget_limited``. On runtimes that can cancel a run (ONNX Runtime, OpenVINO) a stage
        after the first is admitted when its *median* step time plus the time to return fits, and
        if it is still running when the budget (less the time to return) runs out it is cancelled
        and the best answer so far returned (decision ``"cancelled_budget"``).
        The first stage always runs to the end (without it there is no answer);
        ``deadline_missed`` tells whether the answer came late anyway.

        ``mean_budget_ms`` (or :meth:`set_mean_budget`) switches on the average-budget mode:
        without an explicit ``operating_point``, a controller picks each request's point so
        the running mean latency stays at the target.
        """
        start = self._clock()
        if budget_ms is not None:
            budget_ms = nonnegative_budget("budget_ms", budget_ms)
        if mean_budget_ms is not None and (self.controller is None or self.controller.budget_ms != mean_budget_ms):
            self.set_mean_budget(mean_budget_ms)
        controller = self.controller if operating_point is None else None
        point = self._point(operating_point) if controller is None else self._controlled(controller)
        prediction = self._run(load_image(image), point, budget_ms, start=start)
        if controller is not None:
            controller.observe(prediction)
        for listener in self._listeners:
            listener(prediction)
        return prediction

    def _run(self, image: np.ndarray, point: _Point, budget_ms: float | None,
             start: float | None = None, observe: bool = True) -> Prediction:
        clock, latency, router, stages = self._clock, self.latency, self.router, self._stages
        start = clock() if start is None else start
        thresholds, shown = point.thresholds, point.shown
        records: list[StageRecord] = []
        images, carries = [image], Carries(1)
        total = best = None
        limited = False
        last = len(stages) - 1
        now = clock()
        first = 0
        if budget_ms is not None and self._can_jump:
            left = budget_ms - (now - start) * 1e3
            first = self._start_stage(left)
            if first:
                limited = True
                records.extend(self._skipped(0, first, left, "planned_skip"))
        runs = 0
        for k in range(first, last + 1):
            st = stages[k]
            predicted = latency.predict(k)
            left = needed = None
            reason = "no_budget"
            if budget_ms is not None:
                left = budget_ms - (now - start) * 1e3
                needed = latency.needed(k, cancellable=k > first and st.run_within is not None)
                if k > first:
                    if needed > left:
                        limited = True
                        records.extend(self._skipped(k, last + 1, left, "over_budget"))
                        break
                reason = "fits" if k > first else "first"
            t0 = now
            x = router.input(k, images, carries)
            try:
                out = self._call(st, x, budget_ms if k > first else None, start, observe)
            except DeadlineExceededError:
                now = clock()
                limited = True
                if observe:  # a lower bound of the stage's time: it teaches the model the stage got slower
                    latency.observe(k, (now - t0) * 1e3, predicted)
                records.append(StageRecord(st.name, "cancelled_budget", None, None, (now - t0) * 1e3, predicted, None,
                                           left, needed, "cancelled"))
                records.extend(self._skipped(k + 1, last + 1, left, "over_budget"))
                break
            runs += 1
            logits = out[st.logits]
            own, probs, total = self._decide(st, logits, total, runs)
            score = float(exit_scores(st.score, probs, logits, st.temperature, total, k, st.exit_model, own)[0])
            router.keep(k, out, carries)
            best = (k, probs[0], score)
            done = k == last or score >= thresholds[k]
            now = clock()
            ms = (now - t0) * 1e3
            if observe:
                latency.observe(k, ms, predicted)
            records.append(StageRecord(st.name, "last" if k == last else ("exit" if done else "continue"), score,
                                       int(probs[0].argmax()), ms, predicted, shown[k], left, needed, reason,
                                       _box(router.box(k, carries))))
            if done:
                break
        k, probs, score = best
        label = int(probs.argmax())
        end = clock()
        if observe:
            latency.observe_return((end - now) * 1e3)
        return Prediction(label, self.classes[label], score, k, (end - start) * 1e3, tuple(records), probs, limited,
                          budget_ms, point.name)

    def _call(self, st: _Stage, x: np.ndarray, budget_ms: float | None, start: float,
              observe: bool = True) -> Mapping[str, np.ndarray]:
        """Stage ``st``'s backend call on ``x``. With a ``budget_ms`` (counted from ``start``) on a runtime
        that can cancel, the run is stopped when what is left at the call, less the time to return and
        the latency model's cancel lead, runs out (:class:`DeadlineExceededError`); how late the run
        ended after that timer, when it did, teaches the cancel lead."""
        if budget_ms is None or st.run_within is None:
            return st.session.run(x)
        latency, clock = self.latency, self._clock
        called = clock()
        timer_ms = max(0.0, budget_ms - (called - start) * 1e3 - latency.return_overhead() - latency.cancel_lead())
        try:
            return st.run_within(x, timer_ms / 1e3)
        finally:
            late = (clock() - called) * 1e3 - timer_ms
            if observe and late > 0:
                latency.observe_overshoot(late)

    def _skipped(self, begin: int, end: int, left: float, reason: str) -> list[StageRecord]:
        latency, stages = self.latency, self._stages
        return [StageRecord(stages[j].name, "skipped_budget", None, None, None, latency.predict(j), None, left,
                            latency.needed(j, reason == "over_budget" and stages[j].run_within is not None), reason)
                for j in range(begin, end)]

    @staticmethod
    def _decide(st: _Stage, logits: np.ndarray, total: np.ndarray | None,
                runs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The stage's own probabilities (its softmax, computed once), its deciding probabilities and
        the updated running sum of probabilities (``runs``: how many stages the sum holds)."""
        own = softmax(logits, st.temperature)
        total = own if total is None else total + own
        return own, (total / runs if st.combine == "mean_probs" else own), total

    def _start_stage(self, left_ms: float) -> int:
        """Budget plan for a cascade whose later stages read the image: where to start.

        A path that starts at stage ``s`` (one that reads the image) and goes on in order
        reaches the deepest stage ``m`` whose needs, summed from ``s``, fit in ``left_ms``. The
        plan starts where the deepest stage is reachable, and at the earliest such start (so
        early exits and combined probabilities still help); it is stage 0 unless skipping
        cheap stages is the only way for a more accurate one to fit. With nothing that fits,
        stage 0 runs alone.
        """
        latency = self.latency
        margin, ret = latency.margin(), latency.return_overhead()
        needs = [latency.predict(k) * margin for k in range(len(self._stages))]
        best_start, best_reach = 0, -1
        router = self.router
        for s in range(len(self._stages)):
            if s and not router.reads_image(s):
                continue  # a carry stage cannot start a path
            used, reach = ret, -1
            for j in range(s, len(self._stages)):
                source = router.fed_by(j)
                if j > s and source is not None and source < s:
                    break
                used += needs[j]
                if used > left_ms:
                    break
                reach = j
            if reach > best_reach:
                best_start, best_reach = s, reach
        return best_start

    def predict_batch(self, images: Iterable[Any], operating_point: str | None = None, max_batch: int = 64,
                      budget_ms: float | None = None, mean_budget_ms: float | None = None) -> list[Prediction]:
        """Classify many images with per-sample routing; same answers as ``predict`` one by one.

        Images go through in chunks of at most ``max_batch`` (memory stays bounded however
        many images are given); within a chunk, samples that exit leave the batch.

        ``budget_ms`` is a deadline per chunk, counted from when the chunk starts: a stage after
        the first runs only if one image's predicted need fits in what is left, and is cancelled
        (where the runtime can) when the chunk's budget runs out; the undecided samples then
        answer with their best stage so far, flagged ``budget_limited``. ``mean_budget_ms`` (or
        :meth:`set_mean_budget`) picks each chunk's operating point with the average-budget
        controller, fed with every sample's share of the stage times.
        """
        max_batch = positive_count("max_batch", max_batch)
        images = list(images)
        if len(images) > max_batch:
            return [p for i in range(0, len(images), max_batch)
                    for p in self.predict_batch(images[i:i + max_batch], operating_point, max_batch, budget_ms,
                                                mean_budget_ms)]
        start = self._clock()
        if mean_budget_ms is not None and (self.controller is None or self.controller.budget_ms != mean_budget_ms):
            self.set_mean_budget(mean_budget_ms)
        controller = self.controller if operating_point is None else None
        if not images:
            return []
        point = self._point(operating_point) if controller is None else self._controlled(controller)
        results = self._run_batch([load_image(im) for im in images], point, budget_ms, start)
        if controller is not None:
            for prediction in results:
                controller.update(sum(r.latency_ms or 0.0 for r in prediction.trace), prediction.trace[0].score)
        for listener in self._listeners:
            for prediction in results:
                listener(prediction)
        return results

    def _run_batch(self, imgs: list[np.ndarray], point: _Point, budget_ms: float | None,
                   start: float) -> list[Prediction]:
        clock, latency, router = self._clock, self.latency, self.router
        n = len(imgs)
        active = np.arange(n)
        carries = Carries(n)
        total: np.ndarray | None = None
        last = len(self._stages) - 1
        exit_stage = np.full(n, -1)  # the stage each sample answered at
        exit_ms = np.zeros(n)
        probs_all: np.ndarray | None = None
        scores_all = np.zeros(n)
        ran: list[tuple] = []  # rows, scores, labels, done, ms, patch boxes (or None)
        limited = False
        for k, st in enumerate(self._stages):
            if not len(active):
                break
            t0 = clock()
            if budget_ms is not None and k:
                left = budget_ms - (t0 - start) * 1e3
                if latency.needed(k, cancellable=st.run_within is not None) > left:
                    limited = True
                    break
            x = router.input(k, imgs, carries, active)
            try:
                out = self._call(st, x, budget_ms if k else None, start)
            except DeadlineExceededError:
                limited = True
                break
            logits = out[st.logits]
            own = softmax(logits, st.temperature)
            if total is None:
                total = np.zeros((n, own.shape[1]))
                probs_all = np.zeros((n, own.shape[1]))
            total[active] += own
            probs = total[active] / (k + 1) if st.combine == "mean_probs" else own
            scores = exit_scores(st.score, probs, logits, st.temperature, total[active], k, st.exit_model, own)
            router.keep(k, out, carries, active)
            done = np.ones(len(active), bool) if k == last else scores >= point.thresholds[k]
            ms = (clock() - t0) * 1e3
            probs_all[active] = probs
            scores_all[active] = scores
            exit_stage[active] = k
            exit_ms[active[done]] = (clock() - start) * 1e3
            ran.append((active, scores, probs.argmax(1), done, ms, router.box(k, carries, active)))
            active = active[~done]
        if len(active):
            exit_ms[active] = (clock() - start) * 1e3
        return self._batch_predictions(ran, exit_stage, exit_ms, probs_all, scores_all, point, limited, budget_ms)

    def _batch_predictions(self, ran: list, exit_stage: np.ndarray, exit_ms: np.ndarray, probs: np.ndarray,
                           scores: np.ndarray, point: _Point, limited: bool, budget_ms: float | None) -> list[Prediction]:
        """One :class:`Prediction` per sample from the per-stage arrays of :meth:`_run_batch`."""
        last = len(self._stages) - 1
        traces: list[list[StageRecord]] = [[] for _ in exit_stage]
        for k, (rows, stage_scores, labels, done, ms, boxes) in enumerate(ran):
            st, shown = self._stages[k], point.shown[k]
            decisions = ["last" if k == last else ("exit" if d else "continue") for d in done.tolist()]
            for j, (i, decision, score, label) in enumerate(zip(rows.tolist(), decisions, stage_scores.tolist(),
                                                                labels.tolist())):
                traces[i].append(StageRecord(st.name, decision, score, label, ms, None, shown,
                                             box=None if boxes is None else _box(boxes[j:j + 1])))
        labels = probs.argmax(1).tolist()
        return [Prediction(label, self.classes[label], score, stage, ms, tuple(trace), row,
                           limited and trace[-1].decision == "continue", budget_ms, point.name)
                for label, score, stage, ms, trace, row in zip(labels, scores.tolist(), exit_stage.tolist(),
                                                               exit_ms.tolist(), traces, probs)]

    def close(self) -> None:
        """Release the sessions and any temporary files of a ``.swb`` bundle."""
        self._stages = []
        self.bundle.close()

    def __enter__(self) -> "Cascade":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _box(boxes: np.ndarray | None) -> tuple[float, float, float, float] | None:
    """The first row of a stage's patch boxes as a trace shows it."""
    return None if boxes is None else tuple(float(v) for v in boxes[0])


def _exit_model(root: Path | None, spec: StageSpec) -> Any:
    try:
        return load_exit_model(root, spec.exit)
    except (ValueError, OSError, KeyError, EOFError) as exc:
        raise BundleError(f"stage {spec.name}: cannot read its learned exit score model ({exc}); rebuild the "
                          "bundle or recalibrate it with another --score") from exc


def stage_io(spec: StageSpec) -> StageIO:
    """The tensor names of a manifest stage."""
    return StageIO(spec.input.tensor, spec.outputs.names())


def profile_name(runtime: str, threads: int | None, device: str = "CPU") -> str:
    """The name under which a latency profile for this configuration is stored."""
    return f"{runtime}-{device.lower()}-{threads or 'default'}t"


def load(path: str | Path, backend: str = "auto", device: str = "CPU", threads: int | None = None,
         prefer: Sequence[str] | None = None, warmup: bool = True,
         options: RuntimeOptions | Mapping[str, Any] | None = None, mean_budget_ms: float | None = None,
         profile: str | None = None, latency: dict | None = None,
         trusted_keys: Sequence[Any] | None = None) -> Cascade:
    """Open a bundle (directory or ``.swb``) on a runtime and return a ready :class:`Cascade`.

    ``backend`` is ``"onnxruntime"``, ``"openvino"``, ``"litert"`` or ``"auto"`` (the first
    of ``prefer`` that is installed and that the bundle carries artifacts for; ``prefer`` defaults to
    ``$STAGEWISE_PREFER`` or onnxruntime, openvino, litert) or a comma-separated preference list such
    as ``"openvino,onnxruntime"``. ``device`` is the runtime's device (OpenVINO: CPU, GPU, NPU, AUTO). ``threads`` sets
    the runtime's intra-op threads; ``options`` are the runtime's own settings, its options dataclass
    (:mod:`stagewise.runtimes.options`) or a dict of them: an unknown key raises
    :class:`~stagewise.errors.UnknownOptionError` listing the valid ones.
    ``mean_budget_ms`` starts the average-budget mode (see :meth:`Cascade.set_mean_budget`);
    ``profile`` names the device profile that seeds the latency model (default: the one for
    this runtime, device and thread count); ``latency`` passes :class:`LatencyModel` options.
    ``trusted_keys``: Ed25519 public keys (PEM files or bytes); the bundle must be signed by one
    of them (see :func:`stagewise.bundle.read_bundle`).
    """
    if threads is not None:
        threads = positive_count("threads", threads)
    if mean_budget_ms is not None:
        positive_number("mean_budget_ms", mean_budget_ms)
    bundle = read_bundle(path, trusted_keys=trusted_keys)
    try:
        runtime = resolve_runtime(backend, bundle.formats(), prefer)
        settings = runtime.options.from_mapping(options)
        load_options = LoadOptions(threads=threads, device=device, runtime_options=settings)
        opener = runtime.opener()
        sessions = []
        for k, spec in enumerate(bundle.manifest.stages):
            key = spec.artifacts[runtime.artifact_format].files[0].sha256  # the bundle verified it: no second hash
            sessions.append(opener(bundle.artifact_paths(k, runtime.artifact_format), stage_io(spec),
                                   replace(load_options, content_key=key)))
        check_stages(bundle.manifest, sessions)
        cascade = Cascade(bundle, sessions, runtime.name, threads, device, mean_budget_ms=mean_budget_ms,
                          latency=latency, profile=profile)
    except BaseException:
        bundle.close()
        raise
    if warmup:
        cascade.warm_up()
    return cascade
