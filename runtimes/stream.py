"""Frames from any iterable at a target frame rate, each under a per-frame deadline.

Frame ``i`` of a stream at ``fps`` frames per second is *due* at ``i * T`` (``T = 1000 / fps``
ms after the stream starts) and must be answered by ``due + budget`` (the per-frame budget,
by default one frame period). The helper

* waits until a frame is due when it is ahead (``pace=True``), so a file or a folder plays at
  the target rate; a live camera paces itself and can run with ``pace=False``;
* gives each frame what is left of its deadline as the ``budget_ms`` of
  :meth:`Cascade.predict`, so later stages run only when they fit;
* when it is behind, either **drops** frames (``on_late="drop"``, the default, like live
  video: it skips to the newest frame that is due and, when even the first stage would not fit
  in that frame's deadline but fits in a fresh frame's, waits for the next one) or
  **degrades** (``on_late="degrade"``: every frame is processed with whatever is left of its
  budget, so late frames get only the first stage; frames are dropped only when the backlog
  exceeds ``max_lag_frames`` periods).

Frames may be HxWx3 uint8 RGB arrays, PIL images, paths, or zero-argument callables returning
one of those (decoded only when the frame is processed: a dropped frame costs nothing).
:func:`folder_frames` and :func:`video_frames` make such iterables from a folder of images
and from a video file or camera (OpenCV, the optional ``video`` extra).

Every frame yields a :class:`FrameResult` (dropped ones too), with the prediction and its
per-stage trace; :class:`StreamStats` sums a run up.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from stagewise.deprecation import deprecated
from stagewise.errors import StagewiseError
from stagewise.extras import require

from .executor import Cascade, Prediction, StageRecord
from .records import PREDICTION_KEYS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class FrameResult:
    """What happened to one frame. Times are ms since the stream started.

    ``status``: ``"ok"`` (answered within its deadline by the cascade's normal exit rule),
    ``"budget_limited"`` (answered in time, later stages skipped to meet the deadline),
    ``"late"`` (answered after its deadline) or ``"dropped"`` (not processed).
    """

    index: int
    status: str
    due_ms: float
    deadline_ms: float
    start_ms: float | None = None
    end_ms: float | None = None
    budget_ms: float | None = None
    prediction: Prediction | None = None

    @property
    def trace(self) -> tuple[StageRecord, ...]:
        return self.prediction.trace if self.prediction else ()

    @property
    def latency_ms(self) -> float | None:
        """From the frame being due to its answer (``None`` when dropped)."""
        return None if self.end_ms is None else self.end_ms - self.due_ms

    def to_dict(self, stage_names: list[str] | None = None, trace: bool = True) -> dict:
        """A JSON-ready record of the frame (one line of a frame log): ``frame``, ``status``, ``due_ms``,
        ``start_ms``, ``end_ms``, ``budget_ms`` and the prediction's JSON
        (:meth:`~stagewise.runtimes.Prediction.to_dict`; its keys ``None`` for a dropped frame, which has no
        trace). ``stage_names`` is deprecated: the prediction names its stage itself."""
        if stage_names is not None:
            deprecated("FrameResult.to_dict(stage_names)", "FrameResult.to_dict() (the prediction names its stage)")
        p = self.prediction
        answer = p.to_dict(trace=trace) if p else dict(dict.fromkeys(PREDICTION_KEYS), **({"trace": []} if trace else {}))
        return {"frame": self.index, "status": self.status, "due_ms": self.due_ms, "start_ms": self.start_ms,
                "end_ms": self.end_ms, **answer, "budget_ms": self.budget_ms}


@dataclass
class StreamStats:
    """Totals of a stream run."""

    frames: int = 0
    processed: int = 0
    dropped: int = 0
    late: int = 0
    budget_limited: int = 0
    duration_ms: float = 0.0
    exit_histogram: list[int] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)

    def add(self, r: FrameResult) -> None:
        self.frames += 1
        if r.status == "dropped":
            self.dropped += 1
            return
        self.processed += 1
        self.late += r.status == "late"
        self.budget_limited += r.prediction.budget_limited
        k = r.prediction.stage_index
        self.exit_histogram.extend([0] * (k + 1 - len(self.exit_histogram)))
        self.exit_histogram[k] += 1
        self.latencies_ms.append(r.latency_ms)
        self.duration_ms = max(self.duration_ms, r.end_ms)

    @property
    def deadline_hit_rate(self) -> float:
        """Share of processed frames answered by their deadline."""
        return 1.0 - self.late / self.processed if self.processed else 1.0

    @property
    def fps(self) -> float:
        """Processed frames per second of stream time."""
        return 1e3 * self.processed / self.duration_ms if self.duration_ms > 0 else 0.0

    def summary(self) -> dict:
        lat = np.array(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return {"frames": self.frames, "processed": self.processed, "dropped": self.dropped, "late": self.late,
                "budget_limited": self.budget_limited, "deadline_hit_rate": self.deadline_hit_rate,
                "processed_fps": self.fps, "exit_histogram": self.exit_histogram,
                "latency_p50_ms": float(np.median(lat)), "latency_p95_ms": float(np.quantile(lat, 0.95))}


class StreamError(StagewiseError):
    """A stream cannot be set up (bad rate, budget or policy, or no video support)."""


class Stream:
    """Runs ``cascade`` over frames at ``fps`` with a per-frame ``budget_ms`` (default: one period).

    ``clock`` and ``sleep`` default to the cascade's clock and :func:`time.sleep` (tests pass fakes).
    Iterate :meth:`run` for per-frame results; :attr:`stats` holds the totals.
    """

    def __init__(self, cascade: Cascade, fps: float, budget_ms: float | None = None, on_late: str = "drop",
                 max_lag_frames: float = 2.0, pace: bool = True, operating_point: str | None = None,
                 clock: Callable[[], float] | None = None, sleep: Callable[[float], None] = time.sleep):
        if fps <= 0:
            raise StreamError(f"fps must be positive, got {fps}")
        if on_late not in ("drop", "degrade"):
            raise StreamError(f"on_late must be 'drop' or 'degrade', got {on_late!r}")
        self.cascade = cascade
        self.period_ms = 1e3 / fps
        self.budget_ms = self.period_ms if budget_ms is None else float(budget_ms)
        if self.budget_ms <= 0:
            raise StreamError(f"per-frame budget must be positive, got {budget_ms}")
        self.on_late = on_late
        self.max_lag_ms = max_lag_frames * self.period_ms
        self.pace = pace
        self.operating_point = operating_point
        self._clock = clock or cascade._clock
        self._sleep = sleep
        self.stats = StreamStats()

    def _first_stage_needs(self) -> float:
        return self.cascade.latency.needed(0)

    def run(self, frames: Iterable[Any]) -> Iterator[FrameResult]:
        """Process ``frames`` in order; yields one :class:`FrameResult` per frame."""
        self.stats = StreamStats()
        clock, period = self._clock, self.period_ms
        t0 = clock()

        def now() -> float:
            return (clock() - t0) * 1e3

        for i, frame in enumerate(frames):
            due = i * period
            deadline = due + self.budget_ms
            t = now()
            if t < due:
                if self.pace:
                    self._sleep((due - t) / 1e3)
                    t = now()
            elif self._should_drop(i, t, due, deadline):
                result = FrameResult(i, "dropped", due, deadline)
                self.stats.add(result)
                yield result
                continue
            start = t
            image = frame() if callable(frame) else frame
            left = max(deadline - now(), 0.0)  # already late: the first stage alone
            prediction = self.cascade.predict(image, budget_ms=left, operating_point=self.operating_point)
            end = now()
            status = "late" if end > deadline else ("budget_limited" if prediction.budget_limited else "ok")
            result = FrameResult(i, status, due, deadline, start, end, left, prediction)
            self.stats.add(result)
            yield result

    def _should_drop(self, i: int, t: float, due: float, deadline: float) -> bool:
        period = self.period_ms
        newest = int(math.floor(t / period))  # the newest frame already due now
        if self.on_late == "degrade":
            return t - due > self.max_lag_ms and newest > i
        if newest > i:
            return True  # a newer frame is already due: skip to it
        needs = self._first_stage_needs()
        # Even the first stage would miss this frame's deadline, but a fresh frame would make it: wait for that one.
        return t + needs > deadline and needs <= self.budget_ms

    def __call__(self, frames: Iterable[Any]) -> Iterator[FrameResult]:
        return self.run(frames)


def stream(cascade: Cascade, frames: Iterable[Any], fps: float, budget_ms: float | None = None,
           on_late: str = "drop", **options: Any) -> Iterator[FrameResult]:
    """Shortcut: ``Stream(cascade, fps, budget_ms, on_late, **options).run(frames)``."""
    return Stream(cascade, fps, budget_ms, on_late, **options).run(frames)


def folder_frames(folder: str | Path, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> list[Path]:
    """The image files of ``folder`` in name order (decoded only when processed)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StreamError(f"not a folder of frames: {folder}")
    wanted = {s.lower() for s in suffixes}
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in wanted)
    if not files:
        raise StreamError(f"no image files ({', '.join(sorted(wanted))}) in {folder}")
    return files


class _VideoFrame:
    """A grabbed but not yet decoded frame of an OpenCV capture (valid until the next grab)."""

    __slots__ = ("_cap", "_cv2")

    def __init__(self, cap: Any, cv2: Any):
        self._cap, self._cv2 = cap, cv2

    def __call__(self) -> np.ndarray:
        ok, bgr = self._cap.retrieve()
        if not ok:
            raise StreamError("could not decode a video frame")
        return self._cv2.cvtColor(bgr, self._cv2.COLOR_BGR2RGB)


def video_frames(source: str | Path | int, limit: int | None = None) -> Iterator[_VideoFrame]:
    """Frames of a video file (or camera index) through OpenCV, decoded only when processed.

    Needs ``opencv-python-headless`` (``pip install "stagewise[video]"``).
    """
    cv2 = require("cv2", "video", "reading video (a folder of frames works without it)")
    cap = cv2.VideoCapture(source if isinstance(source, int) else str(source))
    if not cap.isOpened():
        raise StreamError(f"cannot open video {source}")
    try:
        n = 0
        while (limit is None or n < limit) and cap.grab():
            yield _VideoFrame(cap, cv2)
            n += 1
    finally:
        cap.release()


def video_fps(source: str | Path) -> float | None:
    """The frame rate a video file declares (``None`` if unknown or OpenCV is missing)."""
    try:
        import cv2
    except ImportError:
        return None
    cap = cv2.VideoCapture(str(source))
    try:
        fps = cap.get(cv2.CAP_PROP_FPS)
        return float(fps) if fps and fps > 0 else None
    finally:
        cap.release()
