"""The runtimes' model caches: where prepared models are kept, and entries that cannot poison a load.

A cache only saves load time, so nothing about it may make a valid bundle fail to load:

* an entry is keyed by the verified artifact's sha256 (the digest the manifest records, and a
  signature covers) plus whatever else the prepared model depends on (:func:`entry_key`);
* it is written to a private temporary file, flushed to disk (``fsync``) and renamed into place,
  then its record (``<key>.json``: the artifact's sha256, the entry's own sha256 and size) is
  published the same way; a failed or interrupted write publishes nothing, and temporary files
  of killed writers are removed by the next writer;
* it is read whole and checked against its record (size and sha256) before a runtime sees it, so
  a truncated, corrupt or swapped entry is a miss: it is evicted and the model is prepared again;
* a folder that cannot be written (read-only, full) is skipped with a :class:`CacheWarning`,
  and an entry another user could have written is never read: an entry is bound to the signed
  digest by its key and record, both written (mode 0600) and read only as the process's own user.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterable

from stagewise.bundle import process_alive

RECORD_FORMAT = "stagewise-model-cache"
MAX_RECORD_BYTES = 4096
STALE_PARTIAL_S = 3600
"""A temporary file whose writer cannot be identified is removed when untouched this long."""


class CacheWarning(UserWarning):
    """The model cache was skipped (the load went on without it); the message says why."""


def model_cache(setting: str | Path | bool | None, runtime: str) -> Path | None:
    """The directory where ``runtime`` caches prepared models, created; ``None`` when caching is off.

    ``setting`` is the runtime's ``cache_dir`` option: ``None`` gives ``$STAGEWISE_CACHE_DIR/<runtime>``
    or ``~/.cache/stagewise/<runtime>``, ``False``/``""`` no cache. A directory that cannot be
    created turns the cache off with a :class:`CacheWarning` (a load never fails over it).
    """
    if setting is None:
        root = os.environ.get("STAGEWISE_CACHE_DIR")
        base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stagewise"
        setting = base / runtime
    if not setting:
        return None
    try:
        Path(setting).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _warn(f"cannot create the {runtime} model cache {setting} ({exc.strerror or exc}); loading without it")
        return None
    return Path(setting)


def entry_key(content_sha256: str, *context: object) -> str:
    """The key of a cache entry: the artifact's verified sha256 and the ``context`` the prepared model depends on."""
    return hashlib.sha256("|".join([content_sha256, *map(repr, context)]).encode()).hexdigest()[:32]


def _warn(message: str) -> None:
    warnings.warn(message, CacheWarning, stacklevel=3)


def _read_private(path: Path, limit: int | None = None) -> bytes | None:
    """The bytes of ``path`` if only this process's user (or root) can have written it (owned by it, not group or
    other writable), checked on the open file; ``None`` otherwise."""
    with open(path, "rb") as f:
        info = os.fstat(f.fileno())
        if info.st_uid not in (os.getuid(), 0) or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return None
        return f.read(limit) if limit is not None else f.read()


class ModelCache:
    """The entries of one runtime's cache folder for one artifact (``source_sha256``) under ``key``."""

    def __init__(self, folder: Path, key: str, source_sha256: str, suffix: str):
        self.folder = folder
        self.source_sha256 = source_sha256
        self.entry = folder / f"{key}{suffix}"
        self.record = folder / f"{key}.json"

    def read(self) -> bytes | None:
        """The entry's bytes if it is present, private and matches its record; else ``None`` (a miss).

        A present entry that fails the check is evicted (with a :class:`CacheWarning`).
        """
        try:
            if not self.record.is_file():
                return None
            record, data = _read_private(self.record, MAX_RECORD_BYTES), _read_private(self.entry)
            if record is None or data is None:
                _warn(f"model cache {self.folder}: {self.entry.name} could have been written by another user; not "
                      "using it (the cache's files must be writable by this user only)")
                return None
            record = json.loads(record)
        except (OSError, ValueError) as exc:
            return self._bad(f"unreadable ({exc})")
        if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
            return self._bad("its record is not a stagewise cache record")
        if record.get("source_sha256") != self.source_sha256:
            return self._bad("its record names another model")
        if record.get("bytes") != len(data) or record.get("sha256") != hashlib.sha256(data).hexdigest():
            return self._bad("it does not match its record (truncated, corrupt or replaced)")
        return data

    def _bad(self, why: str) -> None:
        _warn(f"model cache entry {self.entry} is not usable: {why}; preparing the model again")
        self.evict()
        return None

    def evict(self) -> None:
        """Remove the entry and its record (a later load prepares and caches the model again)."""
        for path in (self.record, self.entry):
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass

    def reserve(self) -> Path | None:
        """A new private temporary file in the folder for the runtime to write the entry to; ``None``
        (with a :class:`CacheWarning`) when the folder cannot be written. Removes killed writers' leftovers."""
        _remove_stale(self.folder.glob("*.partial"))
        try:
            fd, name = tempfile.mkstemp(dir=self.folder, prefix=f".{self.entry.stem}.{os.getpid()}.", suffix=".partial")
        except OSError as exc:
            _warn(f"cannot write to the model cache {self.folder} ({exc.strerror or exc}); loading without it")
            return None
        os.close(fd)
        return Path(name)

    def failed(self, exc: Exception) -> None:
        """Say that the runtime could not write or open the entry, and evict it (the load goes on without it)."""
        _warn(f"the model cache entry {self.entry} failed ({exc}); loading without the cache")
        self.evict()

    def publish(self, written: Path) -> None:
        """Make ``written`` (a :meth:`reserve` file the runtime filled) the entry, durably, with its record;
        on any failure (e.g. a full disk) nothing is published and a :class:`CacheWarning` says so."""
        record = written.with_name(written.name[:-len(".partial")] + ".record.partial")
        try:
            data = written.read_bytes()
            if not data:
                raise OSError("the runtime wrote an empty model")
            _sync(written)
            with open(os.open(record, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(json.dumps({"format": RECORD_FORMAT, "source_sha256": self.source_sha256,
                                    "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}).encode())
            _sync(record)
            os.replace(written, self.entry)
            os.replace(record, self.record)
            _sync(self.folder)
        except OSError as exc:
            _warn(f"cannot write the model cache entry {self.entry} ({getattr(exc, 'strerror', None) or exc}); "
                  "loading without it")
            self.evict()
        finally:
            discard(written, record)


def discard(*paths: Path) -> None:
    """Remove temporary files (those already renamed into place are gone)."""
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale(partials: Iterable[Path]) -> None:
    """Remove this user's temporary cache files whose writer is dead (or unknown and idle for an hour)."""
    now = time.time()
    for path in partials:
        parts = path.name.split(".")
        pid = int(parts[2]) if len(parts) > 3 and parts[2].isdigit() else None
        try:
            info = path.lstat()
            if info.st_uid != os.getuid():
                continue
            if (pid is not None and not process_alive(pid)) or (pid is None and now - info.st_mtime > STALE_PARTIAL_S):
                path.unlink()
        except OSError:
            pass
