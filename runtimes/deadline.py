"""Hard deadlines for running stages: one watchdog thread per process cancels the runs that are late.

ONNX Runtime stops a run between two graph nodes once that run's own ``RunOptions.terminate``
is set; the :class:`Watchdog` sets it from its thread when the run's deadline passes. Every
armed deadline is an entry of one heap, so any number of requests (threads) may wait on
their own deadlines at once and a cancel reaches only the run it was armed for. OpenVINO
needs no thread (``start_async`` + ``wait_for`` + ``cancel`` of the request's own infer
request). LiteRT's interpreter has no cancel API: a LiteRT stage is only not started when it
is predicted not to fit.

A timeout of :data:`FOREVER_S` or more (a budget of ``1e308`` or ``10**400`` ms) arms
nothing: no run is stopped that late, and a deadline that far needs no thread.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Callable

FOREVER_S = 7 * 24 * 3600.0
"""Timeouts from this many seconds on (a week) are not armed: the run is left to finish."""


def finite_timeout(timeout_s: float) -> float | None:
    """``timeout_s`` clamped at 0, or ``None`` for a timeout too far away to arm (see :data:`FOREVER_S`)."""
    if not timeout_s < FOREVER_S:  # also NaN, inf
        return None
    return max(0.0, timeout_s)


class Deadline:
    """One armed deadline (see :meth:`Watchdog.arm`): ``fired`` once its cancel ran."""

    __slots__ = ("at", "cancel", "fired", "live")

    def __init__(self, at: float, cancel: Callable[[], None]):
        self.at, self.cancel, self.fired, self.live = at, cancel, False, True

    def __lt__(self, other: "Deadline") -> bool:
        return self.at < other.at


class Watchdog:
    """Calls each armed deadline's ``cancel`` once it passes, from one daemon thread (started on first use).

    ``arm(timeout_s, cancel)`` before the run returns a :class:`Deadline` (``None`` when the
    timeout is too far to arm); ``disarm(deadline)`` after it returns whether the cancel fired. A
    cancel runs under the watchdog's lock, so after ``disarm`` it never runs: the caller may reuse
    what the cancel touches. Arming costs a lock, a heap push and a notify, never a thread.
    """

    def __init__(self) -> None:
        self._wake = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()
        self._dead = 0  # disarmed entries still in the heap
        self._thread: threading.Thread | None = None

    def arm(self, timeout_s: float, cancel: Callable[[], None]) -> Deadline | None:
        timeout_s = finite_timeout(timeout_s)
        if timeout_s is None:
            return None
        deadline = Deadline(time.monotonic() + timeout_s, cancel)
        with self._wake:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._watch, name="stagewise-deadline", daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, (deadline.at, next(self._order), deadline))
            if self._heap[0][2] is deadline:
                self._wake.notify()
        return deadline

    def disarm(self, deadline: Deadline | None) -> bool:
        if deadline is None:
            return False
        with self._wake:
            if deadline.live:
                deadline.live = False
                self._dead += 1
                if self._dead > 64 and self._dead > len(self._heap) // 2:  # drop disarmed entries now and then
                    self._heap = [entry for entry in self._heap if entry[2].live]
                    heapq.heapify(self._heap)
                    self._dead = 0
            return deadline.fired

    def pending(self) -> int:
        """How many deadlines are armed and not yet due or disarmed."""
        with self._wake:
            return sum(entry[2].live for entry in self._heap)

    def _watch(self) -> None:
        heap = self._heap
        with self._wake:
            while True:
                heap = self._heap
                while heap and not heap[0][2].live:
                    heapq.heappop(heap)
                    self._dead -= 1
                if not heap:
                    self._wake.wait()
                    continue
                left = heap[0][0] - time.monotonic()
                if left > 0:
                    self._wake.wait(min(left, 3600.0))
                    continue
                deadline = heapq.heappop(heap)[2]
                deadline.live = False
                deadline.fired = True
                try:
                    deadline.cancel()
                except Exception:  # a failing cancel must not stop the watchdog for every other run
                    pass


WATCHDOG = Watchdog()
"""The process's watchdog: every runtime adapter that stops runs from a timer arms its deadlines here."""

