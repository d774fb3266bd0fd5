"""Image sets read from a folder or an archive, and seeded stratified splits.

Two labelled layouts are understood, inside a directory or a ``.tar``/``.tar.gz``/``.zip`` archive
(optionally below one top-level folder):

* class folders: ``<class>/<image>.jpg`` — classes are the sorted folder names;
* a ``labels.tsv`` with columns ``index  wnid  name  file`` (the ImageNet sample layout):
  class ``index`` is the label, ``name`` the class name, ``file`` relative to the tsv.

Without labels (``open_image_set(path, labelled=False)``) any layout works, a flat folder too.
Images are decoded on demand with Pillow; nothing is downloaded.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np

from .errors import DatasetError
from .images import load_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class ImageSet:
    """Images with their integer ``targets`` (indices into ``classes``, the class names);
    ``sources`` are file paths or encoded bytes."""

    sources: tuple[Path | bytes, ...]
    targets: np.ndarray
    classes: tuple[str, ...]
    origin: str = ""

    def __len__(self) -> int:
        return len(self.sources)

    def image(self, i: int) -> np.ndarray:
        """Decode image ``i`` as an HxWx3 uint8 RGB array."""
        source = self.sources[i]
        return load_image(io.BytesIO(source) if isinstance(source, bytes) else source)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ImageSet":
        """The images at ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageSet(tuple(self.sources[i] for i in idx), self.targets[idx], self.classes, self.origin)

    def split(self, fractions: Sequence[float], seed: int = 0) -> list["ImageSet"]:
        """Stratified split: each class is shuffled with ``seed`` and cut by ``fractions``.

        Fractions must sum to at most 1; every part gets ``round(f * n_class)`` images of each
        class (the last part takes the rounding remainder when fractions sum to 1).
        """
        return [self.subset(part) for part in stratified_indices(self.targets, fractions, seed)]

    def take_per_class(self, n: int, seed: int = 0) -> "ImageSet":
        """At most ``n`` images of each class, chosen with ``seed``."""
        rng = np.random.default_rng(seed)
        picked = []
        for c in np.unique(self.targets):
            members = np.flatnonzero(self.targets == c)
            picked.extend(rng.permutation(members)[:n].tolist())
        return self.subset(sorted(picked))


def stratified_indices(targets: np.ndarray, fractions: Sequence[float], seed: int = 0) -> list[np.ndarray]:
    """Index arrays of a seeded stratified split of ``targets`` by ``fractions``.

    Each part gets ``round(f * N)`` images in all and, per class, the floor of its share plus
    one more for the classes whose share has the largest remainder (ties broken at random), so
    even a set with one image per class splits to the requested sizes.
    """
    if any(f < 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise ValueError(f"split fractions must be non-negative and sum to at most 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    classes = np.unique(targets)
    members = [rng.permutation(np.flatnonzero(targets == c)) for c in classes]
    left = np.array([len(m) for m in members])
    taken = np.zeros(len(classes), dtype=np.int64)
    whole = abs(sum(fractions) - 1) < 1e-9
    parts = []
    for k, f in enumerate(fractions):
        if whole and k == len(fractions) - 1:
            counts = left.copy()
        else:
            exact = f * np.array([len(m) for m in members])
            counts = np.minimum(np.floor(exact).astype(np.int64), left)
            extra = int(round(f * len(targets))) - int(counts.sum())
            order = rng.permutation(len(classes))
            order = order[np.argsort(-(exact - np.floor(exact))[order], kind="stable")]
            for c in order:
                if extra <= 0:
                    break
                if counts[c] < left[c]:
                    counts[c] += 1
                    extra -= 1
        parts.append(np.sort(np.concatenate([m[t:t + n] for m, t, n in zip(members, taken, counts)]).astype(np.int64)))
        taken += counts
        left -= counts
    return parts


UNLABELLED = "unlabelled"
"""The one class name of an image set opened with ``labelled=False``."""


def open_image_set(path: str | Path, labelled: bool = True) -> ImageSet:
    """Read an image set from a directory or an archive (see the module doc).

    With ``labelled=False`` every image under ``path`` is taken in path order, whatever the
    layout (a flat folder is fine; class folders or a ``labels.tsv`` are not read): every
    target is 0 and the one class is :data:`UNLABELLED`.
    """
    path = Path(path)
    files = _list_files(path)
    if labelled:
        return _from_listing(files, str(path))
    images = sorted(k for k in files if k.lower().endswith(IMAGE_SUFFIXES))
    if not images:
        raise DatasetError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return ImageSet(tuple(files[k] for k in images), np.zeros(len(images), dtype=np.int64), (UNLABELLED,), str(path))


def _list_files(path: Path) -> dict[str, Path | bytes]:
    """Every file of a directory (as its path) or of an archive (as its bytes), by relative name."""
    if not path.exists():
        raise DatasetError(f"image data not found: {path}. Give a folder of class sub-folders or an archive of one.")
    if path.is_dir():
        return {p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file()}
    name = path.name.lower()
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        with tarfile.open(path) as tar:
            files: dict[str, Path | bytes] = {}
            for member in tar.getmembers():
                if member.isfile():
                    handle = tar.extractfile(member)
                    if handle is not None:
                        files[member.name] = handle.read()
        return files
    if name.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            return {n: zf.read(n) for n in zf.namelist() if not n.endswith("/")}
    raise DatasetError(f"{path}: not a folder, .tar, .tar.gz or .zip archive of images")


def _from_listing(files: dict[str, Path | bytes], origin: str) -> ImageSet:
    tsv = sorted((k for k in files if PurePosixPath(k).name == "labels.tsv"), key=len)
    if tsv:
        return _from_labels_tsv(tsv[0], files, origin)
    images = sorted(k for k in files if k.lower().endswith(IMAGE_SUFFIXES))
    if not images:
        raise DatasetError(f"{origin}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    depth = min(len(PurePosixPath(k).parts) for k in images)
    if depth < 2:
        raise DatasetError(f"{origin}: images must sit in one folder per class (<class>/<image>.jpg)")
    class_level = depth - 2
    classes = sorted({PurePosixPath(k).parts[class_level] for k in images})
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[PurePosixPath(k).parts[class_level]] for k in images], dtype=np.int64)
    return ImageSet(tuple(files[k] for k in images), labels, tuple(classes), origin)


def _from_labels_tsv(tsv_key: str, files: dict[str, Path | bytes], origin: str) -> ImageSet:
    raw = files[tsv_key]
    text = raw.decode() if isinstance(raw, bytes) else Path(raw).read_text()
    base = PurePosixPath(tsv_key).parent
    rows = [line.split("\t") for line in text.splitlines()[1:] if line.strip()]
    try:
        rows.sort(key=lambda r: int(r[0]))
        names = {int(r[0]): r[2] for r in rows}
        classes = tuple(names.get(i, f"class_{i}") for i in range(max(names) + 1))
        sources, labels = [], []
        for r in rows:
            key = (base / r[3]).as_posix()
            sources.append(files[key])
            labels.append(int(r[0]))
    except (IndexError, ValueError, KeyError) as exc:
        raise DatasetError(f"{origin}: labels.tsv must have columns index, wnid, name, file ({exc})") from exc
    return ImageSet(tuple(sources), np.array(labels, dtype=np.int64), classes, origin)
