"""Pooled backbone features at cut points: extracted once per image for all cuts, batched, cached.

Exit heads on a frozen backbone (and the probes of automatic exit placement) only need, for each
image, the carry after each cut pooled to a vector (and the network's own output, the
distillation teacher). :class:`FeatureStore` computes them in one pass per image for every cut
asked for at once (the backbone split at all of them, each segment run once), on the conversion's
torch device (:mod:`.devices`), keeps them in memory for the rest of the conversion, and with
``cache`` also on disk, so a re-run with the same model, input size and preprocessing reads them
instead of running the backbone again.

On disk: one ``.npz`` per (model weights, framework, input size, preprocessing, cut) under the
cache folder, holding the SHA-1 digests of the images' encoded bytes and one feature row per
image. A changed weight, size, preprocessing or image simply misses the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stagewise.datasets import ImageSet
from stagewise.errors import ConversionError
from stagewise.images import Preprocess
from stagewise.progress import phase, progress_bar

from .source import SourceAdapter

#: The key under which :meth:`FeatureStore.features` returns the network's own output (its logits).
OUTPUT = "<output>"


def image_digest(source: Path | bytes) -> str:
    """SHA-1 of an image's encoded bytes (its file's content for a path)."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return hashlib.sha1(data).hexdigest()


class FeatureStore:
    """Pooled features of ``model`` (prepared by ``source``) at its cuts, for images read with ``preprocess`` at ``size``.

    ``cache``: a folder for the on-disk cache (created when missing), or None for memory only.
    ``device``: where torch runs the backbone (see :func:`.devices.resolve_device`); Keras follows
    TensorFlow's own placement. ``batch``: images per forward pass.
    """

    def __init__(self, source: SourceAdapter, model: Any, preprocess: Preprocess, size: tuple[int, int],
                 cache: Path | None = None, device: str = "cpu", batch: int = 64):
        self.source, self.model, self.preprocess, self.size = source, model, preprocess, tuple(size)
        self.cache, self.device, self.batch = (Path(cache) if cache else None), device, batch
        self._memory: dict[str, dict[str, np.ndarray]] = {}
        self._prefix: str | None = None
        self.computed = 0  # images the backbone actually ran on (the rest came from memory or the cache)

    def _key(self, cut: str) -> str:
        if self._prefix is None:
            spec = json.dumps({"framework": self.source.framework, "weights": self.source.fingerprint(self.model),
                               "size": list(self.size), "preprocess": self.preprocess.to_manifest()}, sort_keys=True)
            self._prefix = hashlib.sha256(spec.encode()).hexdigest()
        return hashlib.sha256(f"{self._prefix}:{cut}".encode()).hexdigest()[:32]

    def _table(self, cut: str) -> dict[str, np.ndarray]:
        """The rows known for ``cut`` by image digest (memory first, then the disk cache)."""
        if cut not in self._memory:
            rows: dict[str, np.ndarray] = {}
            path = self.cache / f"{self._key(cut)}.npz" if self.cache else None
            if path is not None and path.exists():
                try:
                    with np.load(path) as stored:
                        rows = dict(zip(stored["digests"].tolist(), stored["features"]))
                except (OSError, ValueError, KeyError):
                    rows = {}  # a damaged cache file is recomputed and rewritten
            self._memory[cut] = rows
        return self._memory[cut]

    def _save(self, cut: str) -> None:
        if self.cache is None:
            return
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            rows = self._memory[cut]
            path = self.cache / f"{self._key(cut)}.npz"
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
            np.savez(tmp, digests=np.array(list(rows), dtype="U40"),
                     features=np.stack(list(rows.values())).astype(np.float32))
            os.replace(tmp, path)
        except OSError as exc:
            raise ConversionError(f"cannot write the feature cache in {self.cache}: {exc}; "
                                  "pass a writable --cache folder") from exc

    def features(self, cuts: Sequence[str], images: ImageSet, output: bool = False) -> dict[str, np.ndarray]:
        """``{cut: N x C pooled features}`` of ``images`` at every one of ``cuts`` (graph order), and with
        ``output`` the network's own output under :data:`OUTPUT`. Images already known at every cut
        asked for are not run again; the others run once through the backbone split at all the cuts."""
        cuts = list(cuts)
        keys = cuts + ([OUTPUT] if output else [])
        digests = [image_digest(s) for s in images.sources]
        tables = [self._table(k) for k in keys]
        missing = sorted({i for i, d in enumerate(digests) if any(d not in t for t in tables)})
        if missing:
            self._compute(cuts, images, missing, [digests[i] for i in missing], output)
            for k in keys:
                self._save(k)
        return {k: np.stack([t[d] for d in digests]) for k, t in zip(keys, tables)}

    def _compute(self, cuts: list[str], images: ImageSet, indices: list[int], digests: list[str],
                 output: bool) -> None:
        segments = self.source.split(self.model, cuts)
        if not output:
            segments = segments[:-1]  # the part after the last cut is not needed
        keys = cuts + ([OUTPUT] if output else [])
        with phase("backbone features"):
            for start in progress_bar(range(0, len(indices), self.batch),
                                      f"backbone features of {len(indices)} images at {len(cuts)} cuts"):
                chunk = indices[start:start + self.batch]
                x = self.preprocess.tensor([images.image(i) for i in chunk], self.size)
                pooled = self.source.pooled_features(segments, x, self.device, pool_last=not output)
                for key, values in zip(keys, pooled):
                    table = self._memory[key]
                    for d, row in zip(digests[start:start + self.batch], values):
                        table[d] = np.asarray(row, dtype=np.float32)
                self.computed += len(chunk)
