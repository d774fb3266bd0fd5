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
