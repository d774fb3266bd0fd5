"""Progress bars for long work (rich); silent when ``STAGEWISE_QUIET`` is set."""

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
