"""Choosing image patches from a class-activation map (AnchorNet's glance and focus), numpy only.

Every CAM cell maps back to a square patch of the original image: its centre is the cell's
centre (:class:`~stagewise.manifest.CamGrid`) on the region the glance stage saw, its side a
fraction of that region's shorter side, and it is moved inside the region where it would stick
out. :func:`select_patches` visits the cells from the highest activation down and keeps a patch
when its IoU with every kept patch is below the threshold (non-maximum suppression), up to a
count. :class:`PatchChoice` says whose scores order the cells: the CAM's, or, for the ablation,
seeded random ones (the same size, count and IoU rule; drawn per image from its pixels, so
batch and one-by-one runs pick the same patches).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from stagewise.manifest import CamGrid

Box = tuple[float, float, float, float]
"""(left, top, right, bottom) in original image pixels, as PIL's crop boxes."""


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one box (4,) with each of ``boxes`` (M x 4)."""
    width = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = width * height
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-12)


def cell_boxes(cam: CamGrid, input_size: tuple[int, int], view: Box, patch_fraction: float) -> np.ndarray:
    """The patch of every CAM cell (row-major, ``grid`` rows x columns) as boxes (cells x 4).

    ``input_size`` is the glance stage's (height, width); ``view`` the region of the original
    image that became that input (:meth:`~stagewise.images.Preprocess.crop_box`).
    """
    left, top, right, bottom = view
    scale_y, scale_x = (bottom - top) / input_size[0], (right - left) / input_size[1]
    ys, xs = cam.centres()
    side = patch_fraction * min(right - left, bottom - top)
    half = side / 2
    cx = np.clip(left + xs.ravel() * scale_x, left + half, right - half)
    cy = np.clip(top + ys.ravel() * scale_y, top + half, bottom - half)
    return np.stack([cx - half, cy - half, cx + half, cy + half], axis=1)


def cam_extent(cam: CamGrid, input_size: tuple[int, int], view: Box) -> Box:
    """The region of the original image that the CAM's cells cover (each cell one stride wide), for drawing."""
    left, top, right, bottom = view
    scale_y, scale_x = (bottom - top) / input_size[0], (right - left) / input_size[1]
    (y0, x0), (sy, sx) = cam.offset, cam.stride
    y1, x1 = y0 + sy * (cam.grid[0] - 1), x0 + sx * (cam.grid[1] - 1)
    return (left + (x0 - sx / 2) * scale_x, top + (y0 - sy / 2) * scale_y,
            left + (x1 + sx / 2) * scale_x, top + (y1 + sy / 2) * scale_y)


def select_patches(scores: np.ndarray, boxes: np.ndarray, count: int, iou: float) -> np.ndarray:
    """Indices of up to ``count`` boxes: by ``scores`` from the highest down, each kept when its IoU
    with every box kept before is below ``iou``.

    When fewer than ``count`` boxes pass the rule, the best boxes not yet kept fill the rest (in
    score order), so every step of a patch cascade has a patch.
    """
    order = np.argsort(-np.asarray(scores, dtype=np.float64).ravel(), kind="stable")
    kept: list[int] = []
    for i in order:
        if len(kept) == count:
            break
        if not kept or box_iou(boxes[i], boxes[kept]).max() < iou:
            kept.append(int(i))
    rest = [int(i) for i in order if i not in kept]
    return np.array(kept + rest[:count - len(kept)], dtype=np.int64)


@dataclass(frozen=True)
class PatchChoice:
    """Which scores order the cells: ``"cam"`` (the glance stage's CAM) or ``"random"`` (seeded by
    ``seed`` and the image's pixels)."""

    mode: str = "cam"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("cam", "random"):
            raise ValueError(f"patches are chosen by 'cam' or 'random', not {self.mode!r}")

    def scores(self, cam: np.ndarray, image: np.ndarray) -> np.ndarray:
        """The score of every cell of one image's ``cam`` (grid rows x columns)."""
        if self.mode == "cam":
            return cam
        rng = np.random.default_rng([self.seed, zlib.crc32(np.ascontiguousarray(image).data)])
        return rng.random(cam.shape)

    def boxes(self, cam: np.ndarray, image: np.ndarray, grid: CamGrid, input_size: tuple[int, int], view: Box,
              patch_fraction: float, count: int, iou: float) -> np.ndarray:
        """The chosen patches of one image (``count`` x 4 boxes, in the order the steps read them)."""
        candidates = cell_boxes(grid, input_size, view, patch_fraction)
        return candidates[select_patches(self.scores(cam, image), candidates, count, iou)]
