"""Cached frozen EfficientNet-Lite0 features of CIFAR-10 images (for the calibration benchmarks).

CPU is scarce, so the backbone runs once per image and everything the calibration benchmarks
need is cached under ``runs/calibration/`` (gitignored): the global-average-pooled features
after ``_blocks.4``, ``_blocks.7``, ``_blocks.10``, ``_blocks.14`` and the final 1280-channel
features (after ``_conv_head``/``_bn1``, before the ImageNet classifier), for

* ``user``: 200 images per class of the train part (2,000): the "user's images" of
  Savchenko's method (heads and thresholds) and the head-training set of the other benchmarks;
* ``calibration``: 150 per class of the calibration part (1,500): thresholds of the
  exit-score / calibration-method comparisons;
* ``test``: 250 per class of the test part (2,500): every number reported.

The parts come from ``open_image_set(cifar10-train.tar.gz).split([0.8, 0.1, 0.1], seed=0)`` like
the rest of the project; images (32x32) are stretched to 224x224 (bilinear) and normalised as
EfficientNet-Lite expects, ``(x - 127) / 128``.

    python -m benchmarks.lite0_cifar10_features        # fills the cache (about 15 min on 1 thread)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import harness

CACHE = harness.RUNS / "calibration"
SIZE = 224
CUTS = ("_blocks.4", "_blocks.7", "_blocks.10", "_blocks.14", "_avg_pooling")
PARTS = {"user": (0, 200), "calibration": (1, 150), "test": (2, 250)}


def preprocess():
    from stagewise.images import Preprocess

    return Preprocess(mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0), resize="stretch", crop_fraction=1.0)


def parts(data_dir: Path) -> dict:
    """The three labelled parts (ImageSets) used by the calibration benchmarks."""
    split = harness.cifar10_parts(data_dir)
    split = (split.train, split.calibration, split.test)
    return {name: split[i].take_per_class(per_class, seed=0) for name, (i, per_class) in PARTS.items()}


def cache_file(part: str) -> Path:
    return CACHE / f"lite0_{SIZE}_cifar10_{part}.npz"


def extract(images, threads: int = 1, batch: int = 32) -> dict[str, np.ndarray]:
    """Pooled features at every cut of :data:`CUTS` for every image of ``images``."""
    import torch

    from stagewise.converters.torch_cuts import split_model
    from stagewise.converters.torch_source import Pool
    from stagewise.converters.zoo import efficientnet_lite0

    harness.set_threads(torch=threads)
    segments = split_model(efficientnet_lite0(image_size=SIZE), list(CUTS))[:-1]
    pre = preprocess()
    feats: list[list[np.ndarray]] = [[] for _ in CUTS]
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(pre.tensor([images.image(j) for j in range(i, min(i + batch, len(images)))], (SIZE, SIZE)))
            for k, seg in enumerate(segments):
                x = seg(x)
                feats[k].append(Pool()(x).numpy().astype(np.float32))
            done = min(i + batch, len(images))
            if (i // batch) % 10 == 0:
                print(f"  {done}/{len(images)} images, {done / (time.time() - t0):.1f} img/s", file=sys.stderr, flush=True)
    return {cut: np.concatenate(f) for cut, f in zip(CUTS, feats)}


def load(data_dir: Path = harness.DEFAULT_DATA, threads: int = 1) -> dict[str, dict[str, np.ndarray]]:
    """``{part: {cut: features (N x C), "labels": N}}``, extracting what is not cached yet."""
    out = {}
    image_parts = None
    for part in PARTS:
        path = cache_file(part)
        if not path.exists():
            image_parts = image_parts or parts(data_dir)
            print(f"extracting Lite0@{SIZE} features of {len(image_parts[part])} {part} images -> {path}", file=sys.stderr)
            feats = extract(image_parts[part], threads)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, labels=image_parts[part].targets, **feats)
        with np.load(path, allow_pickle=False) as z:
            out[part] = {k: z[k] for k in z.files}
    return out


def main() -> None:
    args = harness.parser(__doc__).parse_args()
    for part, f in load(args.data, args.threads).items():
        print(part, {k: v.shape for k, v in f.items()})


if __name__ == "__main__":
    main()
