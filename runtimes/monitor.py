"""The drift monitor: is live traffic still what the thresholds were calibrated on?

:class:`DriftMonitor` listens to a :class:`~stagewise.runtimes.Cascade` (``Cascade.add_listener``)
and keeps, per operating point and stage, the live exit rates and exit-score histograms. It tests
them, and the distribution of the class each stage predicts, against the bundle's calibration record
(:mod:`stagewise.runtimes.monitor_reference`) with an anytime-valid sequential test
(:mod:`stagewise.runtimes.edetector`): at most ``false_alarms_per_10k`` false alarms per 10,000
in-distribution requests on average, however often it is read. With ``agreement > 0`` it also runs a
random share of answered requests through every stage (:mod:`stagewise.runtimes.agreement`) and
estimates the live accuracy loss without labels; a second e-detector raises a ``loss`` alarm when
the estimate exceeds the point's promised drop. On an alarm it calls the ``on_alarm`` callbacks and,
when ``fallback`` names an operating point, switches the cascade to it.

The listener only appends the prediction to a queue (well under a microsecond); every ``block``
requests, or when read, the queued predictions are binned and tested in one vectorised pass.
The alarm's ``request`` is the exact request at which the evidence crossed; it is reported at
the end of its block. See ``docs/monitor.md``::

    monitor = DriftMonitor.attach(cascade, MonitorSettings(agreement=0.05, fallback="drop-0pt"))
    monitor.on_alarm(lambda alarm: log.warning(alarm.message))
    p = cascade.predict(image)
    monitor.offer(image, p)          # with agreement > 0: keep the image if this request is sampled
    ...
    monitor.drain()                  # when idle: run the kept images through every stage
    print(monitor.report())
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from stagewise.checks import positive_count
from stagewise.errors import InvalidOptionError, UnknownOperatingPointError

from .agreement import AgreementSampler, Sample, estimate
from .edetector import EDetector, MultinomialBet, bernoulli_ratios, bets, tolerance
from .monitor_reference import ClassTest, RateTest, class_tests, rate_tests, reference_of
from .trace_log import write_sample

NO_REFERENCE = ("this bundle has no monitor reference (it was calibrated before stagewise recorded one); "
                "run `stagewise calibrate BUNDLE --data IMAGES ...` to add it. Exit rates are counted, not tested.")
#: Fractions of the promised drop the loss detector's alternatives lie above it (and its threshold's share).
LOSS_BETS = (0.05, 0.1, 0.2, 0.4, 0.8)
#: Share of the drift test's weight on the class tests (the rate tests share the rest), where the record has them.
CLASS_WEIGHT = 0.5


@dataclass(frozen=True)
class MonitorSettings:
    """How a :class:`DriftMonitor` watches.

    ``false_alarms_per_10k``: the drift test's average false-alarm rate bound (its threshold is
    ``10,000 / false_alarms_per_10k``); ``points``: the operating points tested (default: the
    cascade's default point when attached; each extra point costs ``log(len(points))`` of
    evidence); ``agreement``: the share of answered requests run through every stage (0: off),
    at most ``capacity`` waiting; ``window``: agreement samples per point the estimate uses (the
    most recent); ``fallback``: operating point to switch to on an alarm (``None``: only report);
    ``block``: requests per vectorised update; ``seed``: of the agreement sampling; ``log``: a file
    the agreement samples are appended to as JSON lines (what ``stagewise calibrate --from-log``
    re-calibrates on).
    """

    false_alarms_per_10k: float = 1.0
    points: tuple[str, ...] | None = None
    agreement: float = 0.0
    capacity: int = 64
    window: int = 5000
    fallback: str | None = None
    block: int = 128
    seed: int = 0
    log: str | None = None

    def __post_init__(self):
        if not (isinstance(self.false_alarms_per_10k, (int, float)) and 0 < self.false_alarms_per_10k < 1e4):
            raise InvalidOptionError(f"false_alarms_per_10k must lie in (0, 10000), got {self.false_alarms_per_10k!r}")
        positive_count("capacity", self.capacity)
        positive_count("window", self.window)
        positive_count("block", self.block)
        if not (isinstance(self.agreement, (int, float)) and 0.0 <= self.agreement <= 1.0):
            raise InvalidOptionError(f"agreement is the share of requests checked, in [0, 1], got {self.agreement!r}")

    @property
    def threshold(self) -> float:
        return 1e4 / self.false_alarms_per_10k


@dataclass(frozen=True)
class Alarm:
    """A raised alarm. ``kind``: ``"drift"`` (the live score or exit distribution left the calibration's)
    or ``"loss"`` (the agreement estimate of the accuracy loss exceeds the promised drop). ``request``:
    the request (drift) or agreement sample (loss) at which the evidence crossed, counted from the start."""

    kind: str
    request: int
    point: str
    evidence: float
    message: str
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "request": self.request, "point": self.point, "evidence": self.evidence,
                "message": self.message, **dict(self.detail)}


class _Counts:
    """Live counters of one operating point: requests, and per stage reached, exited and the score histogram."""

    def __init__(self, stages: int, edges: list[np.ndarray] | None):
        self.requests = 0
        self.reached = np.zeros(stages, np.int64)
        self.exited = np.zeros(stages, np.int64)
        self.histograms = [np.zeros(len(e) + 1, np.int64) for e in edges] if edges is not None else None


class DriftMonitor:
    """Watches a cascade's live traffic against its calibration record (see the module documentation).

    Build it with :meth:`attach` (or construct it on a manifest and feed :meth:`observe` yourself,
    e.g. replaying a trace log). Thread-safe: :meth:`observe` and :meth:`offer` may be called from
    any thread.
    """

    def __init__(self, manifest: Any, settings: MonitorSettings = MonitorSettings(), cascade: Any = None):
        self.settings = settings
        self.manifest = manifest
        self.cascade = cascade
        self.stage_names = list(manifest.stage_names)
        self.reference = reference_of(manifest)
        self._thresholds = {p.name: p.threshold_array for p in manifest.operating_points}
        self._promised = {p.name: _promised_drop(p.goal) for p in manifest.operating_points}
        default = cascade.operating_point if cascade is not None else manifest.default_operating_point
        self._edges = [np.asarray(e, dtype=np.float64) for e in self.reference["edges"]] if self.reference else None
        self._pending: deque = deque()
        self._lock = threading.RLock()
        self._callbacks: list[Callable[[Alarm], None]] = []
        self.alarms: list[Alarm] = []
        self.alarmed = False
        self.requests = 0
        self._samples: dict[str, deque[Sample]] = {}
        self._sampler = AgreementSampler(settings.agreement, self._record, settings.capacity, settings.seed)
        self._log = open(settings.log, "a") if settings.log else None
        if settings.fallback is not None and settings.fallback not in self._thresholds:
            raise UnknownOperatingPointError(f"the monitor's fallback {settings.fallback!r} is not an operating point "
                                             f"of this bundle; choose one of: {', '.join(self._thresholds)}")
        self._watch(tuple(settings.points or (default,)))

    @classmethod
    def attach(cls, cascade: Any, settings: MonitorSettings = MonitorSettings(),
               on_alarm: Callable[[Alarm], None] | None = None) -> "DriftMonitor":
        """A monitor of ``cascade``, listening to every answer of ``predict`` and ``predict_batch``."""
        monitor = cls(cascade.bundle.manifest, settings, cascade)
        if on_alarm is not None:
            monitor.on_alarm(on_alarm)
        cascade.add_listener(monitor.observe)
        return monitor

    def detach(self) -> None:
        """Stop listening to the cascade, forget the kept agreement images and close the sample log."""
        if self.cascade is not None:
            self.cascade.remove_listener(self.observe)
        self._sampler.clear()
        if self._log is not None:
            self._log.close()
            self._log = None

    def on_alarm(self, callback: Callable[[Alarm], None]) -> None:
        """Call ``callback(alarm)`` for every alarm (on the thread that processed the block: keep it short)."""
        self._callbacks.append(callback)

    # ---- the hot path ----------------------------------------------------------------------------

    def observe(self, prediction: Any) -> None:
        """Count one answer (the cascade listener): queued, tested every ``block`` requests."""
        pending = self._pending
        pending.append(prediction)
        if len(pending) >= self.settings.block:
            self.flush()

    def offer(self, image: Any, prediction: Any) -> bool:
        """With agreement sampling on: keep ``image`` if this request is drawn (then :meth:`drain` checks it)."""
        return self._sampler.offer(image, prediction, len(self.stage_names) - 1)

    def drain(self, limit: int | None = None, cascade: Any = None) -> int:
        """Run up to ``limit`` kept requests through every stage (of ``cascade``, default the attached one)."""
        return self._sampler.drain(cascade or self.cascade, limit)

    # ---- testing -----------------------------------------------------------------------------------

    def _watch(self, points: tuple[str, ...]) -> None:
        """(Re)start the drift test on ``points``."""
        unknown = [p for p in points if p not in self._thresholds]
        if unknown:
            raise UnknownOperatingPointError(f"cannot monitor unknown operating point(s) {', '.join(map(str, unknown))}; "
                                             f"this bundle defines: {', '.join(self._thresholds)}")
        self.watching = points
        self._start = self.requests
        self.tests: list[RateTest] = []
        columns: dict[str, np.ndarray] = {}
        if self.reference is not None:
            for point in points:
                found = rate_tests(self.reference, point, self._thresholds[point])
                columns[point] = np.arange(len(self.tests), len(self.tests) + len(found))
                self.tests.extend(found)
        self._columns = columns
        self.class_tests: list[ClassTest] = []
        if self.reference is not None:
            for point in points:
                self.class_tests.extend(class_tests(self.reference, point))
        classes = len(self.manifest.classes)
        self._bets = [MultinomialBet(np.pad(t.counts, (0, max(classes - len(t.counts), 0)))) for t in self.class_tests]
        share = CLASS_WEIGHT if self.class_tests and self.tests else (1.0 if self.class_tests else 0.0)
        stat, l0, l1, weight, direction = [], [], [], [], []
        per_point = {p: sum(1 for t in self.tests if t.point == p) for p in points}
        for s, t in enumerate(self.tests):
            made = bets(t.mean, tolerance(t.mean, t.n))
            for log0, log1, d in made:
                stat.append(s)
                l0.append(log0)
                l1.append(log1)
                direction.append(d)
                weight.append((1.0 - share) / (len(points) * per_point[t.point] * len(made)))
        per_point = {p: sum(1 for t in self.class_tests if t.point == p) for p in points}
        weight.extend(share / (len(points) * per_point[t.point]) for t in self.class_tests)
        self._stat, self._l0, self._l1 = np.array(stat, np.int64), np.array(l0), np.array(l1)
        self._direction = direction
        weight = np.array(weight)
        self.detector = EDetector(weight / weight.sum() if len(weight) else weight, self.settings.threshold)
        self._test_stage = np.array([t.stage for t in self.tests], np.int64)
        self._test_cut = np.array([t.cut for t in self.tests], np.float64)
        self._observed = np.zeros(len(self.tests), np.int64)
        self._hits = np.zeros(len(self.tests), np.int64)
        self._counts: dict[str | None, _Counts] = {}
        self._unbinned: list[tuple[dict, np.ndarray, np.ndarray]] = []
        self._loss: dict[str, EDetector] = {}

    def flush(self) -> list[Alarm]:
        """Test the queued answers now; the alarms they raised."""
        with self._lock:
            pending = self._pending
            batch = [pending.popleft() for _ in range(len(pending))]
            raised = self._process(batch) if batch else []
        self._react(raised)
        return raised

    def _process(self, batch: list) -> list[Alarm]:
        k = len(self.stage_names)
        n = len(batch)
        pad = [math.nan] * k
        rows, answers = [], []
        for p in batch:
            steps = p.stage_answers()
            row = [score for score, _ in steps]
            if None in row:  # a stage skipped or cancelled by a budget: what follows is not a calibration path
                row = row[:row.index(None)]
            answers.append([-1 if label is None else label for _, label in steps[:len(row)]] + [-1] * (k - len(row)))
            rows.append(row + pad[len(row):] if len(row) < k else row)
        scores = np.array(rows, dtype=np.float64)
        stage = np.fromiter([p.stage_index for p in batch], np.int64, n)
        points = [p.operating_point for p in batch]
        self.requests += n
        kinds = set(points)
        names = np.array(points, dtype=object) if len(kinds) > 1 else None
        groups = {point: (np.arange(n) if names is None else np.flatnonzero(names == point)) for point in kinds}
        self._unbinned.append((groups, scores, stage))
        if len(self._unbinned) >= 32:
            self._bin()
        if not len(self.detector.weight):
            return []
        block = np.full((n, len(self.tests)), -1, np.int8)
        for point, cols in self._columns.items():
            at = groups.get(point)
            if at is None or not len(cols):
                continue
            values = scores[np.ix_(at, self._test_stage[cols])]
            block[np.ix_(at, cols)] = np.where(np.isnan(values), -1, values >= self._test_cut[cols])
        self._observed += (block >= 0).sum(axis=0)
        self._hits += (block == 1).sum(axis=0)
        ratios = bernoulli_ratios(block, self._stat, self._l0, self._l1)
        if self.class_tests:
            labels = np.array(answers, dtype=np.int64)
            labels[labels >= len(self._bets[0].p)] = -1  # a class this bundle does not have (a foreign trace log)
            columns = []
            for t, bet in zip(self.class_tests, self._bets):
                cells = np.full(n, -1, np.int64)
                at = groups.get(t.point)
                if at is not None:
                    cells[at] = labels[at, t.stage]
                columns.append(bet.log_ratios(cells))
            ratios = np.hstack([ratios, np.array(columns).T])
        raised = []
        for crossing in self.detector.update(ratios):
            at = self._start + crossing.index + 1
            evidence = _exp(crossing.log_evidence)
            if crossing.detector >= len(self._stat):
                raised.append(self._class_alarm(crossing.detector - len(self._stat), at, evidence))
                continue
            t = self.tests[self._stat[crossing.detector]]
            s = int(self._stat[crossing.detector])
            live = self._hits[s] / max(self._observed[s], 1)
            what = "exit rate" if t.kind == "exit" else f"share of scores >= {t.cut:.3f}"
            message = (f"drift at request {at} ({t.point}): stage {self.stage_names[t.stage]} "
                       f"{what} is {live:.3f} live vs {t.mean:.3f} at calibration (n={t.n}); e-value "
                       f"{evidence:.3g} >= {self.detector.threshold:g}")
            raised.append(Alarm("drift", at, t.point, evidence,
                                message, {"stage": self.stage_names[t.stage], "statistic": t.kind, "cut": t.cut,
                                          "direction": self._direction[crossing.detector], "live": float(live),
                                          "reference": t.mean}))
            self._observed[:] = 0
            self._hits[:] = 0
        return raised

    def _class_alarm(self, index: int, request: int, evidence: float) -> Alarm:
        """The alarm of class test ``index``: the classes whose live share moved most."""
        test, bet = self.class_tests[index], self._bets[index]
        live = bet.live / max(bet.live.sum(), 1e-12)
        moved = np.argsort(-np.abs(live - bet.p))[:3]
        classes = list(self.manifest.classes)
        shares = ", ".join(f"{classes[c] if c < len(classes) else c} {live[c]:.3f} vs {bet.p[c]:.3f}" for c in moved)
        message = (f"drift at request {request} ({test.point}): the classes stage {self.stage_names[test.stage]} "
                   f"predicts moved (recent share vs calibration: {shares}); e-value {evidence:.3g} >= "
                   f"{self.detector.threshold:g}")
        return Alarm("drift", request, test.point, evidence, message,
                     {"stage": self.stage_names[test.stage], "statistic": "classes",
                      "live": [float(v) for v in live], "reference": [float(v) for v in bet.p]})

    def _bin(self) -> None:
        """Fold the blocks processed since the last call into the live counters (in one go: cheaper per block)."""
        k = len(self.stage_names)
        for groups, scores, stage in self._unbinned:
            reached = ~np.isnan(scores)
            for point, at in groups.items():
                counts = self._counts.get(point)
                if counts is None:
                    counts = self._counts[point] = _Counts(k, self._edges)
                counts.requests += len(at)
                counts.reached += reached[at].sum(axis=0)
                counts.exited += np.bincount(stage[at], minlength=k)[:k]
                if counts.histograms is not None:
                    for j in range(k):
                        seen = scores[at, j][reached[at, j]]
                        counts.histograms[j] += np.bincount(np.searchsorted(self._edges[j], seen, side="right"),
                                                            minlength=len(self._edges[j]) + 1)
        self._unbinned.clear()

    # ---- agreement ----------------------------------------------------------------------------------

    def _record(self, sample: Sample) -> None:
        raised = []
        with self._lock:
            point = sample.point or ""
            window = self._samples.get(point)
            if window is None:
                window = self._samples[point] = deque(maxlen=self.settings.window)
            window.append(sample)
            if self._log is not None:
                write_sample(self._log, sample)
            promised = self._promised.get(point)
            if promised is not None:
                detector = self._loss.get(point)
                if detector is None:
                    detector = self._loss[point] = EDetector(np.full(len(LOSS_BETS), 1 / len(LOSS_BETS)),
                                                             self.settings.threshold)
                lam = np.array(LOSS_BETS) / (1.0 + promised)
                for crossing in detector.update(np.log1p(lam * (sample.loss - promised))[None, :]):
                    est = estimate(list(window))
                    raised.append(Alarm("loss", crossing.index + 1, point, _exp(crossing.log_evidence),
                                        f"accuracy loss at {point}: the agreement estimate {100 * est.loss:.2f} pt "
                                        f"(95% {100 * est.loss_interval[0]:.2f}..{100 * est.loss_interval[1]:.2f}, "
                                        f"n={est.n}) exceeds the promised {100 * promised:g} pt",
                                        {"promised_drop": promised, **est.to_dict()}))
        self._react(raised)

    def add_sample(self, sample: Sample) -> None:
        """Add an agreement sample made elsewhere (e.g. read from a trace log)."""
        self._record(sample)

    def estimate(self, point: str) -> dict | None:
        """The agreement estimate of ``point`` (see :func:`stagewise.runtimes.agreement.estimate`) with its promise."""
        with self._lock:
            samples = list(self._samples.get(point, ()))
        est = estimate(samples)
        if est is None:
            return None
        promised = self._promised.get(point)
        return {**est.to_dict(), "promised_drop": promised,
                "exceeds_promise": None if promised is None else est.loss_interval[0] > promised}

    # ---- reaction and report --------------------------------------------------------------------------

    def _react(self, raised: list[Alarm]) -> None:
        if not raised:
            return
        with self._lock:
            self.alarms.extend(raised)
            self.alarmed = True
        for alarm in raised:
            for callback in self._callbacks:
                callback(alarm)
        fallback = self.settings.fallback
        cascade = self.cascade
        if fallback and cascade is not None and cascade.operating_point != fallback:
            cascade.use(fallback)
            with self._lock:
                if self.settings.points is None:
                    self._watch((fallback,))  # a new run: the safer point has its own reference

    def acknowledge(self) -> None:
        """Clear the raised flag (the alarms stay listed)."""
        with self._lock:
            self.alarmed = False

    def report(self) -> dict:
        """Everything the monitor knows, JSON-ready (``/v1/monitor`` serves it)."""
        self.flush()
        with self._lock:
            self._bin()
            doc: dict[str, Any] = {
                "reference": self.reference is not None, "requests": self.requests, "watching": list(self.watching),
                "false_alarms_per_10k": self.settings.false_alarms_per_10k, "threshold": self.detector.threshold,
                "evidence": _exp(self.detector.log_evidence), "alarm": self.alarmed,
                "alarm_count": len(self.alarms), "alarms": [a.to_dict() for a in self.alarms[-20:]],
                "operating_point": self.cascade.operating_point if self.cascade is not None else None,
                "agreement": {"fraction": self.settings.agreement, "pending": self._sampler.pending,
                              "dropped": self._sampler.dropped, "failed": self._sampler.failed},
                "points": {}}
            if self.reference is None:
                doc["message"] = NO_REFERENCE
            names = set(self._counts) | set(self._samples)
        for point in sorted(names, key=str):
            doc["points"][str(point)] = self._point_report(point)
        return doc

    def _point_report(self, point: str | None) -> dict:
        counts = self._counts.get(point)
        ref = (self.reference or {}).get("points", {}).get(point) if point is not None else None
        out: dict[str, Any] = {"requests": counts.requests if counts else 0, "stages": []}
        for k, name in enumerate(self.stage_names):
            stage: dict[str, Any] = {"stage": name}
            if counts is not None:
                stage.update(reached=int(counts.reached[k]),
                             exit_rate=float(counts.exited[k] / counts.requests) if counts.requests else None)
                if counts.histograms is not None:
                    stage["histogram"] = counts.histograms[k].tolist()
            if ref is not None:
                n = self.reference["points"][point]["reached"][0] or 1
                stage.update(reference_exit_rate=ref["exited"][k] / n, reference_histogram=list(ref["histograms"][k]))
            out["stages"].append(stage)
        agreement = self.estimate(point) if point is not None else None
        if agreement is not None:
            out["agreement"] = agreement
        return out


def _exp(log_value: float) -> float:
    """An e-value from its log, finite for JSON."""
    return math.exp(min(log_value, 700.0))


def _promised_drop(goal: Any) -> float | None:
    """The accuracy drop an operating point's goal promised (``None`` when it promised none)."""
    if goal and goal.get("kind") == "max_accuracy_drop":
        return float(goal["drop"])
    return None


def replay(monitor: DriftMonitor, predictions: Iterable[Any]) -> list[Alarm]:
    """Feed ``predictions`` to ``monitor`` in order; the alarms raised."""
    before = len(monitor.alarms)
    for p in predictions:
        monitor.observe(p)
    monitor.flush()
    return monitor.alarms[before:]
