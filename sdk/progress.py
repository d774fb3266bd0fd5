"""Progress for long work, on stderr; silent when ``STAGEWISE_QUIET`` is set.

On a terminal: transient rich progress bars. When stderr is not a terminal (output going to a
log file, CI), bars would print nothing useful, so each piece of work prints plain lines instead:
one when it starts, one at most every :data:`LOG_INTERVAL_S` seconds while it runs (done/total,
elapsed, estimated time left), and one when it ends; :func:`phase` adds a line per conversion
phase with its wall time.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")

#: Seconds between two progress lines of the same work when stderr is not a terminal.
LOG_INTERVAL_S = 30.0


def _quiet() -> bool:
    return bool(os.environ.get("STAGEWISE_QUIET"))


def _terminal() -> bool:
    return sys.stderr.isatty()


def _line(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class _LogLines:
    """Plain progress lines: start, every :data:`LOG_INTERVAL_S` seconds, end."""

    def __init__(self, total: int | None, description: str):
        self.total, self.description, self.done = total, description, 0
        self.start = self.last = time.monotonic()
        _line(f"{description}: started" + (f" ({total} steps)" if total else ""))

    def step(self, description: str | None = None) -> None:
        self.done += 1
        self.description = description or self.description
        now = time.monotonic()
        if now - self.last >= LOG_INTERVAL_S:
            self.last = now
            elapsed = now - self.start
            left = f", about {elapsed * (self.total - self.done) / self.done:.0f} s left" if self.total else ""
            of = f"/{self.total}" if self.total else ""
            _line(f"{self.description}: {self.done}{of} after {elapsed:.0f} s{left}")

    def finish(self) -> None:
        _line(f"{self.description}: done in {time.monotonic() - self.start:.1f} s")


def progress_bar(items: Sequence[T] | Iterable[T], description: str) -> Iterable[T]:
    """Iterate ``items`` with a transient progress bar on stderr (progress lines when it is not a terminal)."""
    if _quiet():
        return items
    if not _terminal():
        return _logged(items, description)
    from rich.console import Console
    from rich.progress import track

    return track(items, description=description, transient=True, console=Console(stderr=True))


def _logged(items: Sequence[T] | Iterable[T], description: str) -> Iterator[T]:
    lines = _LogLines(len(items) if hasattr(items, "__len__") else None, description)
    for item in items:
        yield item
        lines.step()
    lines.finish()


#: ``(phase, wall seconds)`` of every :func:`phase` finished in this process, in order (benchmarks read it).
PHASE_TIMES: list[tuple[str, float]] = []


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """A named phase of long work, its wall time appended to :data:`PHASE_TIMES`; when stderr is not a
    terminal, a line at its start and one with its wall time."""
    lines = not (_quiet() or _terminal())
    start = time.monotonic()
    if lines:
        _line(f"phase {name}: started")
    yield
    PHASE_TIMES.append((name, time.monotonic() - start))
    if lines:
        _line(f"phase {name}: done in {PHASE_TIMES[-1][1]:.1f} s")


def note(message: str) -> None:
    """One line on stderr about a decision taken during long work (e.g. a stage kept in fp32)."""
    if not _quiet():
        from rich.console import Console

        Console(stderr=True, highlight=False, soft_wrap=True).print(message)


class ProgressTask:
    """A progress bar whose description can change as work goes on (e.g. running accuracies).

    Use as a context manager; :meth:`advance` moves it one step and sets the description. Silent
    when ``STAGEWISE_QUIET`` is set; progress lines when stderr is not a terminal.
    """

    def __init__(self, total: int, description: str):
        self._total, self._description = total, description
        self._progress = None
        self._task = None
        self._lines: _LogLines | None = None
        if not _quiet() and _terminal():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self._task = self._progress.add_task(description, total=total)

    def __enter__(self) -> "ProgressTask":
        if self._progress is not None:
            self._progress.start()
        elif not _quiet():
            self._lines = _LogLines(self._total, self._description)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._lines is not None:
            self._lines.finish()

    def advance(self, description: str | None = None) -> None:
        """One step done; ``description`` replaces the bar's text when given."""
        if self._progress is not None:
            self._progress.update(self._task, advance=1, **({"description": description} if description else {}))
        elif self._lines is not None:
            self._lines.step(description)
