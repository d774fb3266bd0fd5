"""Image loading and the preprocessing a manifest describes (resize, crop, normalise, layout)."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageInputError

ImageLike = Union[np.ndarray, Image.Image, str, os.PathLike, io.IOBase]

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST}


def load_image(image: Any) -> np.ndarray:
    """Return ``image`` as a contiguous HxWx3 uint8 RGB array.

    Accepts an HxWx3 uint8 RGB array, a PIL image (any mode, converted to RGB), a path, or a
    binary file object. Anything else raises :class:`ImageInputError` saying what is expected.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ImageInputError(
                f"image array has dtype {image.dtype}; expected uint8 RGB values 0-255 "
                "(convert with (x * 255).clip(0, 255).astype(np.uint8) if it holds floats in 0-1)")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ImageInputError(
                f"image array has shape {image.shape}; expected HxWx3 RGB "
                "(stack grey images to 3 channels, drop alpha with image[..., :3], "
                "and transpose CHW arrays with image.transpose(1, 2, 0))")
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise ImageInputError(f"image array has shape {image.shape}; height and width must be positive")
        return np.ascontiguousarray(image)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, (str, os.PathLike, io.IOBase)):
        try:
            with Image.open(image) as im:
                return np.asarray(im.convert("RGB"))
        except FileNotFoundError as exc:
            raise ImageInputError(f"image file not found: {image}") from exc
        except (UnidentifiedImageError, OSError) as exc:
            raise ImageInputError(f"cannot decode image {image!s}: {exc}") from exc
    raise ImageInputError(
        f"unsupported image type {type(image).__name__}; pass an HxWx3 uint8 RGB numpy array, "
        "a PIL image or a file path")


@dataclass(frozen=True)
class Preprocess:
    """How an RGB uint8 image becomes a model input tensor (all values from the manifest).

    ``resize`` is ``"shorter_crop"`` (resize the shorter side to ``size / crop_fraction`` then
    centre-crop ``size``) or ``"stretch"`` (resize straight to ``size``). ``mean`` and ``std``
    are in 0-255 units: ``x = (pixel - mean) / std``.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layout: str = "NCHW"
    resize: str = "shorter_crop"
    crop_fraction: float = 0.875
    interpolation: str = "bilinear"

    @classmethod
    def from_manifest(cls, spec: dict) -> "Preprocess":
        return cls(mean=tuple(spec["mean"]), std=tuple(spec["std"]), layout=spec["layout"],
                   resize=spec["resize"], crop_fraction=spec.get("crop_fraction", 1.0),
                   interpolation=spec.get("interpolation", "bilinear"))

    def to_manifest(self) -> dict:
        return {"color": "RGB", "layout": self.layout, "dtype": "float32", "mean": list(self.mean),
                "std": list(self.std), "resize": self.resize, "crop_fraction": self.crop_fraction,
                "interpolation": self.interpolation}

    def resized(self, image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Resize (and crop) an HxWx3 uint8 image to ``size`` = (height, width)."""
        h, w = size
        if image.shape[:2] == (h, w):
            return image
        pil = Image.fromarray(image)
        resample = _RESAMPLE[self.interpolation]
        if self.resize == "stretch":
            return np.asarray(pil.resize((w, h), resample))
        scale = max(h, w) / self.crop_fraction / min(image.shape[:2])
        new_w = max(w, int(round(image.shape[1] * scale)))
        new_h = max(h, int(round(image.shape[0] * scale)))
        left, top = (new_w - w) // 2, (new_h - h) // 2
        return np.asarray(pil.resize((new_w, new_h), resample).crop((left, top, left + w, top + h)))

    def tensor(self, images: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
        """A float32 batch in the model's layout from uint8 RGB images."""
        batch = np.stack([self.resized(im, size) for im in images]).astype(np.float32)
        batch -= np.asarray(self.mean, dtype=np.float32)
        batch /= np.asarray(self.std, dtype=np.float32)
        if self.layout == "NCHW":
            batch = batch.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(batch)
