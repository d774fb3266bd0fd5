"""Progress bars and notes for long work (rich, on stderr); silent when ``STAGEWISE_QUIET`` is set."""

from __future__ import annotations

import os
from typing import Iterable, Sequence, TypeVar

from rich.progress import track

T = TypeVar("T")


def progress_bar(items: Sequence[T] | Iterable[T], description: str) -> Iterable[T]:
    """Iterate ``items`` with a transient progress bar on stderr."""
    if os.environ.get("STAGEWISE_QUIET"):
        return items
    from rich.console import Console

    return track(items, description=description, transient=True, console=Console(stderr=True))


def note(message: str) -> None:
    """One line on stderr about a decision taken during long work (e.g. a stage kept in fp32)."""
    if not os.environ.get("STAGEWISE_QUIET"):
        from rich.console import Console

        Console(stderr=True, highlight=False).print(message)


class ProgressTask:
    """A progress bar whose description can change as work goes on (e.g. running accuracies).

    Use as a context manager; :meth:`advance` moves it one step and sets the description. Silent
    when ``STAGEWISE_QUIET`` is set.
    """

    def __init__(self, total: int, description: str):
        self._progress = None
        self._task = None
        if not os.environ.get("STAGEWISE_QUIET"):
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self._task = self._progress.add_task(description, total=total)

    def __enter__(self) -> "ProgressTask":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, description: str | None = None) -> None:
        """One step done; ``description`` replaces the bar's text when given."""
        if self._progress is not None:
            self._progress.update(self._task, advance=1, **({"description": description} if description else {}))
