"""Per-stage latency prediction from live measurements on this device.

The deadline rule the executor applies before running stage ``k`` under a budget of ``B`` ms,
with ``t`` ms already spent on the request (everything since ``predict`` was called)::

    run stage k  <=>  t + needed(k) <= B
    needed(k)    =  predict(k) * margin()  +  return_overhead()
    needed(k)    =  median(k)  +  return_overhead()  +  cancel_lead()      (a stage the runtime can cancel)

* ``predict(k)`` is a high quantile (default p95) of stage ``k``'s recent *step* times — the
  wall time from the moment the scheduler decides to run the stage until the stage's answer
  and exit decision are ready (input preparation such as the resize, the backend call, the
  softmax and exit score, the bookkeeping). Until ``min_samples`` live measurements exist it
  is the largest of the seed (the bundle's recorded device profile, or a warm-up run at load)
  and what was measured so far, so a cold start errs on the side of skipping. It is never
  below the stage's latest measurement (``follow_last``), so a sudden slowdown (another process
  taking the CPU) costs at most one misprediction per stage instead of the several it takes to
  move a window quantile.
* ``margin()`` (>= 1) is learned from the scheduler's own prediction errors: the
  ``1 - miss_rate`` quantile of ``actual / predicted`` over the last ``error_window`` stage
  runs, counting runs not yet seen as exact predictions (ratio 1). With the defaults (1%,
  256 runs) it is the third largest ratio of the last 256 runs: so one outlier — a garbage
  collection, the first run after a step change — does not make the scheduler timid, but when
  more than 1% of runs overshoot their prediction, the margin grows to cover them.
* ``return_overhead()`` is a high quantile of the time from the end of the last stage run to
  the return of the answer (building the result).
* A stage whose runtime can stop a run (ONNX Runtime, OpenVINO) is admitted on its ``median(k)``
  instead: the run is cancelled when the budget (less the time to return) runs out, so the
  deadline is kept by the cancellation and admission only has to make finishing likely; a
  cautious p95 x margin there would skip the stage on many requests it would have finished.
  Its timer is set to what is left of the budget at the call, less the return overhead and the
  ``cancel_lead()``: the ``1 - miss_rate`` quantile of how late recent cancellable runs ended after their timer
  (on a busy CPU the timer thread wakes, and the backend reaches its next check, milliseconds late).

**Device speed.** When another process takes the CPU every stage slows down together. The
first stage runs on every request, so its recent median (of the last ``speed_window`` runs)
against its reference time (its seed, else its first measurement) is a live *speed factor*
``f``. Every measurement is stored divided by the ``f`` of its moment and every prediction is
multiplied by the ``f`` of now: a stage that has not run for a while (because it did not fit)
is still predicted for the device as it is now, not as it was when it last ran, and the
seeds of a profile recorded on a quiet device scale to a busy one. ``track_speed=False``
turns this off.

Stage 0 is the exception: it always runs, because without it there is no answer at all.

Every operation is O(window) at worst in pointer moves and O(1) in Python work: each window is
kept sorted incrementally (``bisect``), so a quantile is one index, not a numpy call per image.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left, insort
from collections import deque
from typing import Iterable


class SortedWindow:
    """The last ``size`` values, kept both in arrival order and sorted (quantiles in O(1))."""

    __slots__ = ("_order", "_sorted", "_sum", "size")

    def __init__(self, size: int):
        if size < 1:
            raise ValueError("window size must be at least 1")
        self.size = size
        self._order: deque[float] = deque()
        self._sorted: list[float] = []
        self._sum = 0.0

    def __len__(self) -> int:
        return len(self._order)

    def add(self, value: float) -> None:
        value = float(value)
        if len(self._order) == self.size:
            old = self._order.popleft()
            del self._sorted[bisect_left(self._sorted, old)]
            self._sum -= old
        self._order.append(value)
        insort(self._sorted, value)
        self._sum += value

    def extend(self, values: Iterable[float]) -> None:
        for v in values:
            self.add(v)

    def clear(self) -> None:
        self._order.clear()
        self._sorted.clear()
        self._sum = 0.0

    def quantile(self, q: float) -> float:
        """Nearest-rank (upper) quantile: the smallest value with at least ``q`` of the window at or below it."""
        n = len(self._sorted)
        if not n:
            raise ValueError("empty window")
        return self._sorted[min(n - 1, max(0, math.ceil(q * n) - 1))]

    def mean(self) -> float:
        return self._sum / len(self._order)

    def max(self) -> float:
        return self._sorted[-1]

    def top(self, i: int) -> float:
        """The value with ``i`` larger ones above it (``top(0)`` is the maximum)."""
        return self._sorted[-1 - i]

    def last(self) -> float:
        return self._order[-1]

    def values(self) -> list[float]:
        return list(self._order)


class LatencyModel:
    """Predicts each stage's next step time, with a safety margin learned from its own errors.

    ``quantile`` over the last ``window`` measurements per stage; ``margin()`` is the
    ``1 - miss_rate`` quantile of actual/predicted over the last ``error_window`` runs
    (never below 1, and at most ``max_margin``).
    """

    def __init__(self, stages: int, window: int = 64, quantile: float = 0.95, min_samples: int = 5,
                 miss_rate: float = 0.01, error_window: int = 256, max_margin: float = 4.0,
                 follow_last: bool = True, track_speed: bool = True, speed_window: int = 7):
        if not 0 < quantile <= 1:
            raise ValueError("quantile must be in (0, 1]")
        if not 0 < miss_rate < 1:
            raise ValueError("miss_rate must be in (0, 1)")
        self.quantile = quantile
        self.min_samples = min_samples
        self.miss_rate = miss_rate
        self.max_margin = max_margin
        self.follow_last = follow_last
        self._recent = [SortedWindow(window) for _ in range(stages)]
        # step times not yet sorted into _recent (appending is what a request pays; readers fold them in first,
        # which leaves each window as if every value had been added when it came: it keeps the last `window`)
        self._pending = [deque(maxlen=window) for _ in range(stages)]
        self._folding = threading.Lock()
        self._seed: list[float | None] = [None] * stages
        self._errors = SortedWindow(error_window)
        self._return = SortedWindow(window)
        self._return_seed = 0.0
        self._overshoot = SortedWindow(window)  # how far cancellable runs ended past their timer
        self.track_speed = track_speed
        self._speed = SortedWindow(speed_window)  # the first stage's latest step times
        self._ref: float | None = None  # the first stage's reference time (speed factor 1)
        self._factor = 1.0  # speed(), updated when the first stage's window changes

    @property
    def stages(self) -> int:
        return len(self._recent)

    # -- feeding -------------------------------------------------------------------------------
    def seed(self, stage: int, ms: float) -> None:
        """Prior step time of ``stage`` before any live measurement (profile or warm-up)."""
        self._seed[stage] = float(ms)

    def seed_return(self, ms: float) -> None:
        """Prior time from the last stage's end to the answer's return."""
        self._return_seed = float(ms)

    def observe(self, stage: int, ms: float, predicted: float | None = None) -> None:
        """A measured step time of ``stage``; with the prediction made before it ran, also an error sample."""
        if stage == 0 and self.track_speed and ms > 0:
            if self._ref is None:
                self._ref = self._seed[0] or ms
            self._speed.add(ms)
            self._factor = self._speed.quantile(0.5) / self._ref
        self._pending[stage].append(ms / self._factor)
        if predicted is not None and predicted > 0:
            self._errors.add(ms / predicted)

    def observe_return(self, ms: float) -> None:
        self._return.add(ms)

    def observe_overshoot(self, ms: float) -> None:
        """A cancellable run ended ``ms`` after its timer went off (cancelled late, or finished anyway)."""
        self._overshoot.add(ms)

    def reset(self, stage: int | None = None) -> None:
        """Forget live measurements (of one stage, or all, the learned margin and the speed); seeds stay."""
        for k in range(self.stages) if stage is None else [stage]:
            self._recent[k].clear()
            self._pending[k].clear()
        if stage is None:
            self._errors.clear()
            self._return.clear()
            self._overshoot.clear()
            self._speed.clear()
            self._ref = None
            self._factor = 1.0

    # -- predicting ----------------------------------------------------------------------------
    def _window(self, stage: int) -> SortedWindow:
        """Stage ``stage``'s window of recent step times, with the pending ones sorted in."""
        recent, pending = self._recent[stage], self._pending[stage]
        if pending:
            with self._folding:
                while pending:
                    recent.add(pending.popleft())
        return recent

    def samples(self, stage: int) -> int:
        return len(self._window(stage))

    def speed(self) -> float:
        """How many times slower than its reference the device runs now (1 until the first stage has run)."""
        return self._factor

    def predict(self, stage: int) -> float:
        """Predicted milliseconds for the next step of ``stage`` (0 when nothing is known)."""
        recent = self._window(stage)
        if len(recent) >= self.min_samples:
            q = recent.quantile(self.quantile)
            return (max(q, recent.last()) if self.follow_last else q) * self.speed()
        seed = self._seed[stage]
        if len(recent):
            return (recent.max() if seed is None else max(seed, recent.max())) * self.speed()
        return 0.0 if seed is None else seed * self.speed()

    def mean(self, stage: int) -> float:
        """Expected (mean) step time of ``stage`` now: the window mean, else the seed."""
        recent = self._window(stage)
        if len(recent) >= self.min_samples:
            return recent.mean() * self.speed()
        return self.predict(stage)

    def margin(self) -> float:
        """Multiplicative safety factor (>= 1) from observed actual/predicted step ratios."""
        n = self._errors.size  # the window, topped up with exact predictions (ratio 1)
        above = n - math.ceil((1.0 - self.miss_rate) * n)  # how many ratios may exceed the margin
        if len(self._errors) <= above:
            return 1.0
        return min(self.max_margin, max(1.0, self._errors.top(above)))

    def return_overhead(self) -> float:
        if len(self._return) >= self.min_samples:
            return self._return.quantile(self.quantile)
        return max([self._return_seed] + self._return.values())

    def cancel_lead(self) -> float:
        """How much earlier than the deadline (less the return) to stop a cancellable run: the
        ``1 - miss_rate`` quantile of how late recent runs ended after their timer went off (waking the
        timer thread and reaching the backend's next check take time on a busy CPU); 0 until one ran late."""
        n = len(self._overshoot)
        if not n:
            return 0.0
        return self._overshoot.quantile(1.0 - self.miss_rate) if n >= self.min_samples else self._overshoot.max()

    def median(self, stage: int) -> float:
        """Typical (median) step time of ``stage`` now: the window median, else :meth:`predict`."""
        recent = self._window(stage)
        if len(recent) >= self.min_samples:
            return recent.quantile(0.5) * self._factor
        return self.predict(stage)

    def needed(self, stage: int, cancellable: bool = False) -> float:
        """Milliseconds to reserve before running ``stage``: its prediction with margin, plus returning.

        A ``cancellable`` stage (its runtime stops a run when the budget runs out) only needs its
        :meth:`median` plus returning plus the :meth:`cancel_lead`: it is run when finishing in
        time is likely, since a run that overruns is cancelled and the answer so far returned on time.
        """
        if cancellable:
            return self.median(stage) + self.return_overhead() + self.cancel_lead()
        return self.predict(stage) * self.margin() + self.return_overhead()

    def snapshot(self) -> dict:
        """The model's current state, for reports and the trace."""
        return {"predicted_ms": [self.predict(k) for k in range(self.stages)],
                "mean_ms": [self.mean(k) for k in range(self.stages)],
                "samples": [self.samples(k) for k in range(self.stages)],
                "margin": self.margin(), "return_ms": self.return_overhead(), "speed": self.speed(),
                "cancel_lead_ms": self.cancel_lead()}


def profile_name(runtime: str, threads: int | None, device: str = "CPU") -> str:
    """The name under which a latency profile for this configuration is stored."""
    return f"{runtime}-{device.lower()}-{threads or 'default'}t"
