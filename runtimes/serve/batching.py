"""Micro-batching with per-sample routing, on worker threads so the event loop stays free.

Requests that arrive within ``window_ms`` of the first one waiting go to a worker together
(at most ``max_batch``); under load the window never delays anything, a worker takes whatever
has queued up while it was busy. Within a batch:

* requests without a latency budget are grouped by operating point and each group goes through
  :meth:`Cascade.predict_batch`, which routes per sample: images that exit after stage 1 leave
  the batch, only the undecided ones run the later stages;
* requests with a budget run one by one through :meth:`Cascade.predict` with what is left of
  their own deadline (``budget_ms`` minus the time they waited in the queue), because
  ``predict_batch`` has no per-sample budgets.

The queue is bounded: :meth:`MicroBatcher.submit` raises :class:`QueueFullError` when it would
overflow, which the service answers with 503 and ``Retry-After``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from stagewise.errors import StagewiseError

from ..executor import Prediction
from .errors import QueueFullError, ShuttingDownError
from .model import ModelSlot


@dataclass
class Job:
    """One image waiting to be classified; ``future`` receives its :class:`Answer`.

    ``arrived`` (a :func:`time.perf_counter` time) is when the request came in: its budget counts
    from there. ``queued`` is set when the job enters the queue.
    """

    image: np.ndarray
    budget_ms: float | None = None
    operating_point: str | None = None
    arrived: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)
    queued: float = 0.0


@dataclass(frozen=True)
class Answer:
    """A job's prediction, the cascade's stage names and operating point, how long the job waited in the
    queue (``waited_ms``) and how many jobs its batch held."""

    prediction: Prediction
    stage_names: tuple[str, ...]
    operating_point: str
    waited_ms: float
    batch_size: int


class MicroBatcher:
    """Runs queued :class:`Job` s on ``workers`` threads in micro-batches (see the module docstring).

    ``on_batch(size)`` is called for every batch a worker takes (for metrics); ``on_idle(cascade)``
    after a batch is answered when nothing waits (background work on the worker's cascade, e.g. the
    drift monitor's agreement checks: it delays only requests that arrive while it runs).
    """

    def __init__(self, slot: ModelSlot, max_batch: int = 8, window_ms: float = 3.0, queue_size: int = 64,
                 workers: int = 1, on_batch: Callable[[int], None] | None = None,
                 on_idle: Callable[[Any], None] | None = None):
        self.slot = slot
        self._on_idle = on_idle
        self.max_batch = max_batch
        self.window_s = window_ms / 1e3
        self.queue_size = queue_size
        self._on_batch = on_batch
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._threads = [threading.Thread(target=self._work, name=f"stagewise-worker-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    @property
    def depth(self) -> int:
        """Jobs waiting for a worker."""
        return len(self._queue)

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue ``jobs`` all together, or none of them when the queue has no room for all."""
        with self._cond:
            if self._closing:
                raise ShuttingDownError("the service is shutting down; send the request to another instance")
            if len(self._queue) + len(jobs) > self.queue_size:
                raise QueueFullError(f"the request queue is full ({self.queue_size} images waiting); retry shortly")
            now = time.perf_counter()
            for job in jobs:
                job.queued = now
            self._queue.extend(jobs)
            self._cond.notify()

    def close(self, timeout: float | None = None) -> None:
        """Take no new jobs, finish the queued ones, and stop the workers."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)

    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            batch = [self._queue.popleft()]
            # a budgeted job runs alone anyway: it does not wait for others, only takes those queued
            until = batch[0].queued + (self.window_s if batch[0].budget_ms is None else 0.0)
            while len(batch) < self.max_batch:
                if self._queue:
                    batch.append(self._queue.popleft())
                    continue
                left = until - time.perf_counter()
                if left <= 0 or self._closing:
                    break
                self._cond.wait(left)
            if self._queue:
                self._cond.notify()  # another worker may take the rest
            return batch

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            if self._on_batch:
                self._on_batch(len(batch))
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]
            try:
                with self.slot.acquire() as cascade:
                    self._run(cascade, live, len(batch))
                    if self._on_idle is not None and not self._queue:
                        self._on_idle(cascade)
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the error, the worker goes on
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(exc)

    @staticmethod
    def _run(cascade, jobs: list[Job], size: int) -> None:
        names = tuple(cascade.stage_names)
        groups: dict[str | None, list[Job]] = {}
        for job in jobs:
            if job.budget_ms is None:
                groups.setdefault(job.operating_point, []).append(job)
                continue
            now = time.perf_counter()
            waited = (now - job.queued) * 1e3
            try:
                p = cascade.predict(job.image, budget_ms=max(job.budget_ms - (now - job.arrived) * 1e3, 0.0),
                                    operating_point=job.operating_point)
            except StagewiseError as exc:
                job.future.set_exception(exc)
                continue
            job.future.set_result(Answer(p, names, job.operating_point or cascade.operating_point, waited, size))
        for point, group in groups.items():
            waited = [(time.perf_counter() - job.queued) * 1e3 for job in group]
            try:
                predictions = cascade.predict_batch([job.image for job in group], operating_point=point)
            except StagewiseError as exc:
                for job in group:
                    job.future.set_exception(exc)
                continue
            for job, p, w in zip(group, predictions, waited):
                job.future.set_result(Answer(p, names, point or cascade.operating_point, w, size))
