"""Pictures of glance and focus: the glance stage's class-activation map and the chosen patches on the image."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

Box = tuple[float, float, float, float]

_COLOURS = ((255, 64, 64), (64, 160, 255), (64, 220, 96), (255, 200, 0), (200, 96, 255))


def heat(cam: np.ndarray) -> np.ndarray:
    """A CAM (rows x columns) as an RGB heat map (uint8): blue at its minimum, red at its maximum."""
    low, high = float(cam.min()), float(cam.max())
    t = (cam - low) / (high - low) if high > low else np.zeros_like(cam, dtype=np.float64)
    rgb = np.stack([t, 1 - np.abs(2 * t - 1), 1 - t], axis=-1)
    return np.rint(255 * rgb).astype(np.uint8)


def draw_explanation(image: np.ndarray, cam: np.ndarray, extent: Box, boxes: Sequence[Box], path: str | Path,
                     alpha: float = 0.45) -> Path:
    """Write ``image`` (HxWx3 uint8) as a PNG with ``cam`` blended over ``extent`` (the region its cells
    cover, original pixels) and the patch ``boxes`` outlined and numbered in the order the steps read them."""
    base = Image.fromarray(image).convert("RGB")
    left, top, right, bottom = (int(round(v)) for v in extent)
    left, top = max(left, 0), max(top, 0)
    right, bottom = min(right, base.width), min(bottom, base.height)
    if right > left and bottom > top:
        overlay = Image.fromarray(heat(cam)).resize((right - left, bottom - top), Image.Resampling.BILINEAR)
        region = base.crop((left, top, right, bottom))
        base.paste(Image.blend(region, overlay, alpha), (left, top))
    draw = ImageDraw.Draw(base)
    width = max(2, round(min(base.size) / 150))
    for t, box in enumerate(boxes):
        colour = _COLOURS[t % len(_COLOURS)]
        draw.rectangle([float(v) for v in box], outline=colour, width=width)
        draw.text((box[0] + 2 * width, box[1] + width), str(t + 1), fill=colour)
    path = Path(path)
    base.save(path, format="PNG")
    return path
