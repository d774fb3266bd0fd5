"""The sequential executor: a loaded bundle (:class:`Cascade`) and its one stage loop.

``Cascade.predict`` handles one image, optionally under a latency budget (a stage whose
predicted latency does not fit in what is left is skipped and the best answer so far is
returned). ``Cascade.predict_batch`` routes per sample: samples that exit leave the batch and
only the undecided ones are sent to the next stage. ``predict``, ``predict_batch``,
``predict_stage`` and ``run_all_stages`` all go through one loop (:meth:`Cascade._run`; one image
is a batch of one). Each request takes a set of stage runners (:class:`~stagewise.runtimes.base.StageRunner`:
the runtime's own IO buffers and cancellation, reused by later requests), so requests on
several threads neither share buffers nor cancel each other, and a carry passes from one stage
to the next inside the runtime's buffers.

Per stage, the Python work of the loop is the backend call, a clock read, the exit score and a
compare. A stage whose graph outputs its exit decision (:class:`~stagewise.runtimes.base.GraphDecision`:
exported ONNX stages, every OpenVINO stage) hands over its score and answer, read as two values;
otherwise, with up to :data:`FAST_CLASSES` classes, the own-probability scores (``max_softmax``,
``max_logit``) of a single image are computed on the logits as Python floats, and else in numpy. The
answering stage's probabilities are computed once, at the end.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from stagewise.bundle import Bundle
from stagewise.checks import index, nonnegative_budget, positive_count, positive_number
from stagewise.errors import (BundleError, CascadeClosedError, DeadlineExceededError, StageOutputError,
                             UnknownOperatingPointError, UnknownOptionError)
from stagewise.exits import SCORES, deciding_probabilities, exit_scores, load_exit_model, softmax
from stagewise.images import load_image
from stagewise.manifest import Manifest, StageSpec

from .base import RUNTIMES, StageIO, StageRunner, StageSession, runner_for, stage_io
from .budget import cancel_timer_s, plan_start, skipped
from .controller import MeanBudgetController
from .latency import LatencyModel, profile_name
from .patches import PatchChoice
from .records import Prediction, Step
from .routing import Carries, StageRouter, run_chain

FAST_CLASSES = 64
"""Up to this many classes, a single image's ``max_softmax``/``max_logit`` score is computed in Python
floats (cheaper than numpy's per-call cost at this size)."""


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
    cancellable: bool = False  # the runtime can stop a run (the session has run_within)
    fast: bool = False  # a single image's score from its own logits, in Python floats
    decision: tuple[str, str] | None = None  # the graph's exit score and answer outputs (GraphDecision)
    ran_on: str | None = None  # where the runtime runs it (execution provider, device, delegate)


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
        return cls(name, values, tuple(None if k == last or not math.isfinite(t) else t for k, t in enumerate(values)))


def _fast_score(kind: str, logits: list[float], inverse_t: float) -> tuple[float, int]:
    """``max_softmax`` (at temperature ``1 / inverse_t``) or ``max_logit`` of one row of logits, and its argmax."""
    top = max(logits)
    label = logits.index(top)
    if kind == "max_logit":
        return top, label
    exp = math.exp
    return 1.0 / sum([exp((v - top) * inverse_t) for v in logits]), label


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
        # a stage's graph decides (or one image is scored in Python floats) unless some stage needs the running sum
        # of probabilities
        sums = sums_probabilities(m)
        fast = not sums and len(m.classes) <= FAST_CLASSES
        fmt = RUNTIMES[runtime].artifact_format if runtime in RUNTIMES else None
        self._stages = [self._plan(spec, session, bundle.root, fast, stage_io(spec, fmt, not sums))
                        for spec, session in zip(m.stages, sessions)]
        self._names = tuple(st.name for st in self._stages)
        self._cancellable = tuple(st.cancellable for st in self._stages)
        self._patch = tuple(s.source == "patch" for s in self.router.inputs)
        self._keeps = tuple(c is not None or m is not None  # the stage hands on a carry or a CAM
                            for c, m in zip(self.router.carry_outputs, self.router.cam_outputs))
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
        self._observing = threading.Lock()  # the latency model is fed by every request's thread
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
        self._idle: list[list[StageRunner]] = []  # runner sets free for the next request
        self._closed = False

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
    def _plan(spec: StageSpec, session: StageSession, root: Path | None, fast: bool, io: StageIO) -> _Stage:
        fast = fast and spec.exit.score in ("max_softmax", "max_logit")
        decided = io.decision is not None and session.decides
        return _Stage(name=spec.name, session=session, io=io, logits=spec.outputs.logits,
                      score=spec.exit.score, temperature=spec.exit.temperature, combine=spec.exit.combine,
                      exit_model=_exit_model(root, spec), cancellable=session.cancellable, fast=fast,
                      decision=(io.decision.output, io.decision.label) if decided else None,
                      ran_on=session.ran_on)

    @property
    def stage_names(self) -> list[str]:
        return list(self._names)

    @property
    def ran_on(self) -> list[str | None]:
        """Where the runtime runs each stage (execution provider, device or delegate; ``None``: not reported)."""
        return [st.ran_on for st in self._stages]

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

    # -- runners -------------------------------------------------------------------------------
    def _acquire(self) -> list[StageRunner]:
        """A set of stage runners for one request (a free one, else new ones)."""
        try:
            return self._idle.pop()
        except IndexError:
            if self._closed:
                raise CascadeClosedError("this cascade was closed; load the bundle again to classify") from None
            return [runner_for(st.session) for st in self._stages]

    def _release(self, runners: list[StageRunner]) -> None:
        if self._closed:
            for runner in runners:
                runner.close()
        else:
            self._idle.append(runners)

    def warm_up(self, runs: int = 1) -> None:
        """Call every stage's backend ``runs`` times on a grey input of its own size; the last
        run's times seed the latency model.

        Only the backend calls: no decode, no resize, no exit rule, so warming up costs one
        backend pass per stage (and prepares the runners' buffers for one image).
        """
        clock = self._clock
        runners = self._acquire()
        try:
            for _ in range(runs):
                carries = Carries(1)
                times = []
                for k, runner in enumerate(runners):
                    x = self.router.warm_input(k, carries)
                    t0 = clock()
                    out = runner.run(x)
                    times.append((clock() - t0) * 1e3)
                    self.router.keep(k, out, carries)
        finally:
            self._release(runners)
        for k, ms in enumerate(times):
            self.latency.seed(k, max(ms, self.latency.predict(k)))

    # -- answers -------------------------------------------------------------------------------
    def predict(self, image: Any, budget_ms: float | None = None, operating_point: str | None = None,
                mean_budget_ms: float | None = None) -> Prediction:
        """Classify one image (HxWx3 uint8 RGB array, PIL image or path).

        ``budget_ms`` is a per-request deadline, counted from this call: a stage after the
        first runs only if ``elapsed + needed <= budget_ms``, where ``needed`` is the stage's
        predicted step time (a high quantile of its recent live measurements) times a safety
        margin learned from past prediction errors, plus the time to return (see
        :mod:`stagewise.runtimes.latency` and :mod:`stagewise.runtimes.budget`). Otherwise the
        best answer so far is returned with ``budget_limited``. On runtimes that can cancel a run
        (ONNX Runtime, OpenVINO) a stage after the first is admitted when its *median* step time
        plus the time to return fits, and if it is still running when the budget (less the time
        to return) runs out it is cancelled and the best answer so far returned (decision
        ``"cancelled_budget"``); the cancellation stops this request's run only.
        The first stage always runs to the end (without it there is no answer);
        ``deadline_missed`` tells whether the answer came late anyway. Any finite budget of at
        least 0 is accepted: a whole number too large for a float (``10**400``) means no deadline.

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
        prediction = self._run([load_image(image)], point, budget_ms, start)[0]
        if controller is not None:
            controller.observe(prediction)
        for listener in self._listeners:
            listener(prediction)
        return prediction

    def predict_batch(self, images: Iterable[Any], operating_point: str | None = None, max_batch: int = 64,
                      budget_ms: float | None = None, mean_budget_ms: float | None = None) -> list[Prediction]:
        """Classify many images with per-sample routing; same answers as ``predict`` one by one.

        Images go through in chunks of at most ``max_batch`` (memory stays bounded however
        many images are given); within a chunk, samples that exit leave the batch.

        ``budget_ms`` is a deadline per chunk, counted from when the chunk starts, planned with
        the rules of :meth:`predict` on one image's predicted needs: a later stage runs only if
        it fits in what is left, and is cancelled (where the runtime can) when the chunk's budget
        runs out; the undecided samples then answer with their best stage so far, flagged
        ``budget_limited``. Chunk times do not feed the latency model (it holds one image's step
        times). ``mean_budget_ms`` (or :meth:`set_mean_budget`) picks each chunk's operating point
        with the average-budget controller, fed with every sample's stage times.
        """
        max_batch = positive_count("max_batch", max_batch)
        if budget_ms is not None:
            budget_ms = nonnegative_budget("budget_ms", budget_ms)
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
        results = self._run([load_image(im) for im in images], point, budget_ms, start)
        if controller is not None:
            for prediction in results:
                controller.update(sum(r.latency_ms or 0.0 for r in prediction.trace), prediction.trace[0].score)
        for listener in self._listeners:
            for prediction in results:
                listener(prediction)
        return results

    def predict_stage(self, image: Any, stage: int) -> Prediction:
        """The answer of the single network that ends at ``stage``, on its own probabilities.

        For a stage that reads the image this runs that stage alone (one model of a cascade);
        for a carry stage it runs the chain of stages feeding it (a truncated network).
        """
        start = self._clock()
        stage = index("stage", stage, len(self._stages))
        return self._run([load_image(image)], self._all, None, start, self.router.chain(stage), observe=False,
                         alone=True)[0]

    def run_all_stages(self, image: Any) -> Prediction:
        """Run every stage on one image regardless of thresholds (for profiling and inspection)."""
        return self._run([load_image(image)], self._all, None, self._clock(), observe=False)[0]

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

    # -- the stage loop ------------------------------------------------------------------------
    def _run(self, images: list[np.ndarray], point: _Point, budget_ms: float | None, start: float,
             order: Sequence[int] | None = None, observe: bool = True, alone: bool = False) -> list[Prediction]:
        """The one stage loop: ``images`` (decoded) through the stages in ``order`` (default: all, or
        from where the budget plan starts) under ``point``'s thresholds and ``budget_ms`` (counted from
        ``start``). Rows that exit leave the batch. ``observe``: one image's step times feed the latency
        model; ``alone``: every stage decides on its own probabilities (a truncated network)."""
        runners = self._acquire()
        try:
            return self._loop(runners, images, point, budget_ms, start, order, observe and len(images) == 1, alone)
        finally:
            self._release(runners)

    def _loop(self, runners: list[StageRunner], images: list[np.ndarray], point: _Point, budget_ms: float | None,
              start: float, order: Sequence[int] | None, observe: bool, alone: bool) -> list[Prediction]:
        clock, latency, router, stages = self._clock, self.latency, self.router, self._stages
        thresholds, shown = point.thresholds, point.shown
        n = len(images)
        carries = Carries(n)
        steps: list[list[Step]] = [[] for _ in range(n)]
        best: list[Any] = [None] * n  # per row: (stage, its deciding probabilities or None, its logits, row, score)
        exit_ms = [0.0] * n
        rows: np.ndarray | None = None  # the rows still undecided (None: all of them)
        live = list(range(n))
        total: np.ndarray | None = None  # running sum of own probabilities (n x C), for mean_probs and learned
        runs = 0
        timed: list[tuple[int, float]] = []  # an unbudgeted request's step times, for the latency model
        jumped = stopped = False
        now = clock()
        if order is None:
            first = 0
            if budget_ms is not None and self._can_jump:
                left = budget_ms - (now - start) * 1e3
                first = plan_start(latency, router, left)
                if first:
                    jumped = True
                    planned = skipped(latency, self._cancellable, range(first), left, "planned_skip")
                    for i in live:
                        steps[i].extend(planned)
            order = range(first, len(stages))
        first, last = order[0], order[-1]
        keeps, patch = self._keeps, self._patch
        predicted = left = needed = None
        reason = "no_budget"
        cancel = False
        for k in order:
            st, runner = stages[k], runners[k]
            if budget_ms is not None:
                predicted = latency.predict(k)  # what the plan expected (and learns from)
                left = budget_ms - (now - start) * 1e3
                cancel = k != first and st.cancellable
                needed = latency.needed(k, cancel)
                if k != first and needed > left:
                    stopped = True
                    rest = skipped(latency, self._cancellable, order[order.index(k):], left, "over_budget")
                    for i in live:
                        steps[i].extend(rest)
                    break
                reason = "fits" if k != first else "first"
            t0 = now
            x = router.input(k, images, carries, rows)
            try:
                if cancel:
                    called = clock()
                    timeout_s = cancel_timer_s(latency, budget_ms, (called - start) * 1e3)
                    try:
                        out = runner.run(x, timeout_s)
                    finally:
                        late = (clock() - called) * 1e3 - timeout_s * 1e3
                        if observe and late > 0:
                            with self._observing:
                                latency.observe_overshoot(late)
                else:
                    out = runner.run(x)
            except DeadlineExceededError:
                now = clock()
                ms = (now - t0) * 1e3
                stopped = True
                if observe:  # a lower bound of the stage's time: it teaches the model the stage got slower
                    with self._observing:
                        latency.observe(k, ms, predicted)
                cancelled = (k, "cancelled_budget", None, None, ms, predicted, None, left, needed, "cancelled", None,
                             st.ran_on)
                rest = skipped(latency, self._cancellable, order[order.index(k) + 1:], left, "over_budget")
                for i in live:
                    steps[i].append(cancelled)
                    steps[i].extend(rest)
                break
            runs = 1 if alone else runs + 1
            logits = out[st.logits]
            m = len(live)
            if st.decision is not None:  # the graph's own exit score and answer: read, not computed
                score_name, label_name = st.decision
                scores, labels, decider = out[score_name].ravel().tolist(), out[label_name].ravel().tolist(), None
            elif m == 1 and st.fast:
                score, label = _fast_score(st.score, logits[0].tolist(), 1.0 / st.temperature)
                scores, labels, decider = (score,), (label,), None
            else:
                own = softmax(logits, st.temperature)
                if total is None or alone:
                    total = np.zeros((n, own.shape[1]))
                if rows is None:
                    total += own
                    summed = total
                else:
                    total[rows] += own
                    summed = total[rows]
                decider = deciding_probabilities(own, summed, runs, st.combine)
                scores = exit_scores(st.score, decider, logits, st.temperature, summed, runs - 1, st.exit_model,
                                     own).tolist()
                labels = decider.argmax(1).tolist()
            if keeps[k]:
                router.keep(k, out, carries, rows)
            now = clock()
            ms = (now - t0) * 1e3
            if observe:
                if budget_ms is None:  # fed after the loop, under one lock: no later stage of this request plans
                    timed.append((k, ms))
                else:
                    with self._observing:
                        latency.observe(k, ms, predicted)
            threshold, is_last, ran_on, limit = thresholds[k], k == last, st.ran_on, shown[k]
            boxes = router.box(k, carries, rows) if patch[k] else None
            keep = []
            for j, i in enumerate(live):
                score = scores[j]
                if score != score:  # NaN: a stage whose outputs are not finite numbers answers nothing
                    raise StageOutputError(f"stage {st.name} gave a NaN exit score (its logits are not finite): its "
                                           "model is broken; rebuild the bundle, or check the runtime's device")
                done = is_last or score >= threshold
                best[i] = (k, decider, logits, j, score)
                steps[i].append((k, "last" if is_last else ("exit" if done else "continue"), score, labels[j], ms,
                                 predicted, limit, left, needed, reason,
                                 None if boxes is None else tuple(float(v) for v in boxes[j]), ran_on))
                if done:
                    exit_ms[i] = (now - start) * 1e3
                else:
                    keep.append(i)
            if len(keep) != m:
                live = keep
                if not keep:
                    break
                rows = np.asarray(keep)
        end = clock()
        if observe:
            with self._observing:
                for k, ms in timed:
                    latency.observe(k, ms)
                latency.observe_return((end - now) * 1e3)
        end_ms = (end - start) * 1e3
        for i in live:  # undecided when a budget stopped the loop
            exit_ms[i] = end_ms
        if n == 1:
            exit_ms[0] = end_ms
        undecided = set(live) if stopped else ()
        return [self._answer(row_steps, best[i], exit_ms[i], jumped or i in undecided, budget_ms, point.name)
                for i, row_steps in enumerate(steps)]

    def _answer(self, steps: list[Step], best: tuple, elapsed_ms: float, limited: bool, budget_ms: float | None,
                point: str | None) -> Prediction:
        """One row's :class:`Prediction` from its steps and its best stage ``(stage, deciding probabilities or
        None, logits, row, score)``; the probabilities of a fast-scored stage are computed here, once."""
        k, decider, logits, j, score = best
        probs = decider[j] if decider is not None else softmax(logits[j:j + 1], self._stages[k].temperature)[0]
        label = int(probs.argmax())
        return Prediction.from_steps(label, self.classes[label], score, k, elapsed_ms, steps, self._names, probs,
                                     limited, budget_ms, point)

    # -- closing -------------------------------------------------------------------------------
    def close(self) -> None:
        """Close every stage's runners and session and any temporary files of a ``.swb`` bundle; a later
        request raises :class:`~stagewise.errors.CascadeClosedError`. Requests still running finish
        first on their own runners, which are closed when they end."""
        self._closed = True
        while self._idle:
            for runner in self._idle.pop():
                runner.close()
        for st in self._stages:
            st.session.close()
        self.bundle.close()

    def __enter__(self) -> "Cascade":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sums_probabilities(manifest: Manifest) -> bool:
    """Whether some stage decides on more than its own probabilities (``mean_probs``, or a score that reads the
    earlier stages' too, such as ``learned``): the executor then keeps the running sum and scores every stage itself."""
    return any(s.exit.combine == "mean_probs" or SCORES[s.exit.score].reads_earlier for s in manifest.stages)


def _exit_model(root: Path | None, spec: StageSpec) -> Any:
    try:
        return load_exit_model(root, spec.exit)
    except (ValueError, OSError, KeyError, EOFError) as exc:
        raise BundleError(f"stage {spec.name}: cannot read its learned exit score model ({exc}); rebuild the "
                          "bundle or recalibrate it with another --score") from exc
