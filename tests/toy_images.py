"""Tiny seeded image sets the tests learn from: coloured class folders and textures of two contrasts."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from stagewise.datasets import ImageSet


def make_image_folder(root: Path, classes: int = 3, per_class: int = 40, size: int = 16, seed: int = 0) -> Path:
    """Class folders of noisy images whose dominant colour channel is the class (easy to learn)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 110, (size, size, 3)).astype(np.uint8)
            img[..., c % 3] += np.uint8(100 + 40 * (c // 3))
            Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


def texture_images(n: int, seed: int, size: int = 32) -> ImageSet:
    """Grey noise whose contrast is the class (std 25 or 50): downscaling averages the noise away,
    so a model trained at ``size`` sees weaker activations at a smaller size."""
    rng = np.random.default_rng(seed)
    sources, targets = [], []
    for i in range(n):
        c = i % 2
        img = np.clip(128 + rng.normal(0, (25, 50)[c], (size, size, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="PNG")
        sources.append(buffer.getvalue())
        targets.append(c)
    return ImageSet(tuple(sources), np.array(targets), ("smooth", "rough"))
