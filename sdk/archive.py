"""Reading ``.swb`` archives under limits: only what the manifest names is extracted, never more than it records.

A ``.swb`` is a zip file. Before anything is written, every member name is checked (no absolute
path, ``..``, backslash, symlink or duplicate), and ``manifest.json`` is read from the archive
itself, at most :data:`MAX_MANIFEST_BYTES`. Then only the files that manifest names (plus
``manifest.json`` and its signature) are extracted, each at most the size the manifest records
for it (``bytes``; :data:`MAX_ENTRY_BYTES` when it records none), all together at most
:data:`MAX_TOTAL_BYTES`, and none compressed more than :data:`MAX_COMPRESSION_RATIO` to one. The
limits are counted on the bytes actually decompressed, not on the sizes the zip headers claim.
Every zip or decompression error is a :class:`~stagewise.errors.BundleError`.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path, PurePosixPath
from contextlib import contextmanager
from typing import Callable, Iterator

from .errors import BundleError, StagewiseError, UnsafeArchiveError

MAX_MANIFEST_BYTES = 16 << 20
"""Largest ``manifest.json`` read (a real one is a few kB to a few hundred kB)."""
MAX_ENTRY_BYTES = 4 << 30
"""Largest file extracted when the manifest records no size for it."""
MAX_TOTAL_BYTES = 16 << 30
"""Largest total extracted from one archive."""
MAX_COMPRESSION_RATIO = 200
"""Largest uncompressed/compressed ratio of a member over 1 MiB (model weights compress about 1.1:1)."""
_RATIO_FLOOR = 1 << 20
_CHUNK = 1 << 20
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, NotImplementedError,
               RuntimeError, ValueError)


def _checked_members(archive: Path, zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    members: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        name = PurePosixPath(info.filename)
        mode = info.external_attr >> 16
        if name.is_absolute() or ".." in name.parts or "\\" in info.filename or (mode & 0o170000) == 0o120000:
            raise UnsafeArchiveError(
                f"{archive}: member {info.filename!r} would be written outside the bundle (absolute path, '..' "
                "or symlink); refusing to open it")
        if info.filename in members:
            raise UnsafeArchiveError(f"{archive}: member {info.filename!r} appears twice; zip tools disagree on "
                                     "which one counts, so the archive is refused. Repack the bundle")
        if not info.is_dir():
            members[info.filename] = info
    return members


def _copy(archive: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, write: Callable[[bytes], object]) -> int:
    """Decompress ``info`` through ``write``, refusing as soon as more than ``limit`` bytes come out."""
    if info.file_size > _RATIO_FLOOR and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
        raise UnsafeArchiveError(
            f"{archive}: member {info.filename!r} expands {info.file_size} bytes from {info.compress_size} (more "
            f"than {MAX_COMPRESSION_RATIO}:1); refusing a possible zip bomb")
    done = 0
    with zf.open(info) as src:
        while block := src.read(min(_CHUNK, limit - done + 1)):
            done += len(block)
            if done > limit:
                raise UnsafeArchiveError(
                    f"{archive}: member {info.filename!r} holds more than {limit} bytes, more than the manifest "
                    "records or the archive limit allows; refusing to extract it")
            write(block)
    return done


@contextmanager
def _opened(archive: Path) -> Iterator[tuple[zipfile.ZipFile, dict[str, zipfile.ZipInfo]]]:
    """The open archive and its checked members; any zip or decompression error becomes ``BundleError``."""
    try:
        with zipfile.ZipFile(archive) as zf:
            yield zf, _checked_members(archive, zf)
    except StagewiseError:
        raise
    except _ZIP_ERRORS as exc:
        raise BundleError(f"{archive} is not a readable .swb (zip) file ({exc}); re-copy or rebuild it") from exc


def has_member(archive: Path, name: str) -> bool:
    """Whether the archive holds a member called ``name`` (after the member checks)."""
    with _opened(archive) as (_, members):
        return name in members


def read_member(archive: Path, name: str, limit: int) -> bytes:
    """The content of member ``name`` (at most ``limit`` bytes), or ``BundleError`` if it is missing."""
    with _opened(archive) as (zf, members):
        if name not in members:
            raise BundleError(f"{archive} has no {name}: not a stagewise bundle")
        parts: list[bytes] = []
        _copy(archive, zf, members[name], limit, parts.append)
        return b"".join(parts)


def extract(archive: Path, dest: Path, wanted: dict[str, int | None]) -> None:
    """Extract the members named in ``wanted`` (name -> recorded size, or ``None``) into ``dest``, under the limits.

    A wanted member the archive lacks is skipped (verification then reports it missing);
    members not in ``wanted`` are never written.
    """
    total = 0
    with _opened(archive) as (zf, members):
        for name, recorded in wanted.items():
            if name not in members:
                continue
            limit = min(MAX_ENTRY_BYTES if recorded is None else recorded, MAX_TOTAL_BYTES - total)
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as out:
                total += _copy(archive, zf, members[name], limit, out.write)
