"""The cascade a service runs, swapped for a new bundle without dropping requests.

Workers take the current cascade for each batch with :meth:`ModelSlot.acquire`; :meth:`reload`
loads and checks the new bundle first (every artifact's sha256 is verified on load and each
stage runs on a warm-up image), then switches, and closes the old cascade only after the
batches still running on it have finished. A bundle that fails to load leaves the old one
serving.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from ..executor import Cascade


class ModelSlot:
    """Holds the served :class:`Cascade`; ``loader(path)`` opens a bundle for :meth:`reload`."""

    def __init__(self, cascade: Cascade, loader: Callable[[str], Cascade], source: str):
        self._cascade = cascade
        self._loader = loader
        self.source = source
        self.generation = 1
        self._users: dict[int, int] = {}
        self._cond = threading.Condition()
        self._reload_lock = threading.Lock()

    @property
    def current(self) -> Cascade:
        return self._cascade

    @contextmanager
    def acquire(self) -> Iterator[Cascade]:
        """The current cascade, kept open until the ``with`` block ends."""
        with self._cond:
            cascade = self._cascade
            self._users[id(cascade)] = self._users.get(id(cascade), 0) + 1
        try:
            yield cascade
        finally:
            with self._cond:
                self._users[id(cascade)] -= 1
                self._cond.notify_all()

    def reload(self, source: str | None = None) -> Cascade:
        """Load ``source`` (default: the path served now, read again), switch to it, close the old one.

        Blocks until the batches running on the old cascade are done. Errors of loading (a
        :class:`~stagewise.errors.StagewiseError` saying what is wrong) leave the old cascade in place.
        """
        with self._reload_lock:
            path = source or self.source
            new = self._loader(path)
            with self._cond:
                old, self._cascade = self._cascade, new
                self.source = path
                self.generation += 1
                self._cond.wait_for(lambda: self._users.get(id(old), 0) == 0)
                self._users.pop(id(old), None)
            old.close()
            return new

    def close(self) -> None:
        """Close the served cascade (when the service stops)."""
        with self._cond:
            self._cond.wait_for(lambda: self._users.get(id(self._cascade), 0) == 0)
        self._cascade.close()
