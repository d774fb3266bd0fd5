"""Hard deadlines for a running stage: one watchdog thread per session that cancels a late run.

ONNX Runtime stops a run between two graph nodes once its ``RunOptions.terminate`` is set; the
:class:`Watchdog` sets it from its own thread when the deadline passes. OpenVINO needs no
thread (``start_async`` + ``wait_for`` + ``cancel``). LiteRT's interpreter has no cancel API:
a LiteRT stage is only not started when it is predicted not to fit.
"""

from __future__ import annotations

import threading
import time
from typing import Callable


class Watchdog:
    """Calls ``cancel`` once an armed deadline passes, from one daemon thread (started on first use).

    ``arm(timeout_s, cancel)`` before the run, ``disarm()`` after it: ``disarm`` returns whether
    the cancel fired. Arming costs a lock and a notify, not a thread per run.
    """

    def __init__(self) -> None:
        self._wake = threading.Condition()
        self._deadline: float | None = None
        self._cancel: Callable[[], None] | None = None
        self._fired = False
        self._thread: threading.Thread | None = None

    def arm(self, timeout_s: float, cancel: Callable[[], None]) -> None:
        with self._wake:
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="stagewise-deadline", daemon=True)
                self._thread.start()
            self._deadline, self._cancel, self._fired = time.monotonic() + timeout_s, cancel, False
            self._wake.notify()

    def disarm(self) -> bool:
        with self._wake:
            fired = self._fired
            self._deadline = self._cancel = None
            return fired

    def _watch(self) -> None:
        with self._wake:
            while True:
                if self._deadline is None:
                    self._wake.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._wake.wait(left)
                    continue
                self._cancel()
                self._fired, self._deadline, self._cancel = True, None, None
