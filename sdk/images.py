"""Image loading and the preprocessing a manifest describes (resize, crop, normalise, layout)."""

from __future__ import annotations

import functools
import io
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageInputError, ImageTooLargeError, InvalidOptionError

ImageLike = Union[np.ndarray, Image.Image, str, os.PathLike, io.IOBase]

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST}
RESIZERS = ("pillow", "opencv")
"""The libraries a stage's resize can run in (a manifest's ``input.resizer``)."""


def load_image(image: Any, max_pixels: int | None = None) -> np.ndarray:
    """Return ``image`` as a contiguous HxWx3 uint8 RGB array.

    Accepts an HxWx3 uint8 RGB array, a PIL image, a path, or a binary file object. Files and PIL
    images are turned upright by their EXIF orientation and converted to RGB from any mode:
    16-bit images (``I;16``, and ``I`` holding 0-65535 as Pillow reads 16-bit PNGs and TIFFs) are
    scaled to 0-255, float images (``F``) are read as 0-1 intensities and scaled to 0-255. Files
    larger than Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) are refused
    before they are decoded. Anything else that cannot be read — a wrong type, shape or dtype, an
    empty image, a truncated or corrupt file, integer values outside 16 bits, floats outside 0-1 —
    raises :class:`ImageInputError` saying what to do. ``max_pixels`` refuses a file with more
    pixels (width x height, read from its header before anything is decoded) with
    :class:`~stagewise.errors.ImageTooLargeError`; a decoded RGB image costs 3-7 bytes per pixel.
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
        with _decoding("the PIL image"):
            return _to_rgb(ImageOps.exif_transpose(image), "the PIL image")
    if isinstance(image, (str, os.PathLike, io.IOBase)):
        source = f"image {image!s}"
        with _decoding(source), Image.open(image) as im:
            _refuse_bomb(im, source, max_pixels)
            ImageOps.exif_transpose(im, in_place=True)
            return _to_rgb(im, source)
    raise ImageInputError(
        f"unsupported image type {type(image).__name__}; pass an HxWx3 uint8 RGB numpy array, "
        "a PIL image or a file path")


@contextmanager
def _decoding(source: str) -> Iterator[None]:
    """Map what Pillow raises for a missing, oversized, truncated or corrupt image to ImageInputError."""
    try:
        yield
    except ImageInputError:
        raise
    except FileNotFoundError as exc:
        raise ImageInputError(f"{source}: file not found") from exc
    except Image.DecompressionBombError as exc:
        raise ImageInputError(_too_large(source, str(exc))) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise ImageInputError(f"cannot decode {source} (truncated, corrupt or not an image): {exc}") from exc


def _too_large(source: str, detail: str) -> str:
    return (f"{source} is too large to decode safely ({detail}); if images this large are intended, raise "
            "PIL.Image.MAX_IMAGE_PIXELS (None turns the limit off), otherwise resize the image first")


def _refuse_bomb(im: Image.Image, source: str, max_pixels: int | None = None) -> None:
    """Refuse an opened file over ``max_pixels`` or Pillow's decompression-bomb limit before its pixels are decoded.

    Pillow itself raises ``DecompressionBombError`` only above twice the limit and merely warns
    between once and twice; checking here makes both an error without touching warning filters
    (which are process-wide and not thread-safe).
    """
    width, height = im.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(f"{source} is {width}x{height} = {width * height} pixels, over the limit of "
                                 f"{max_pixels} pixels per image; send a smaller image (resize it first)")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageInputError(_too_large(source, f"{width}x{height} = {width * height} pixels, "
                                                 f"over the limit of {limit}"))


def _to_rgb(im: Image.Image, source: str) -> np.ndarray:
    """An HxWx3 uint8 RGB array of ``im``, with 16-bit and float modes scaled rather than clipped."""
    if im.width < 1 or im.height < 1:
        raise ImageInputError(f"{source} is {im.width}x{im.height} pixels; an image needs at least one pixel each way")
    if im.mode == "F" or im.mode == "I" or im.mode.startswith("I;16"):
        grey = _scaled_to_8bit(np.asarray(im), im.mode, source)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    try:
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # no second decoded copy of an RGB image
    except ValueError as exc:
        raise ImageInputError(f"{source} has image mode {im.mode}, which cannot be converted to RGB ({exc}); "
                              "save it as an 8-bit RGB or greyscale image") from exc


def _scaled_to_8bit(values: np.ndarray, mode: str, source: str) -> np.ndarray:
    low, high = values.min(), values.max()
    if mode == "F":
        if not (0.0 <= low and high <= 1.0):  # NaN fails both comparisons
            raise ImageInputError(f"{source} is a float image with values in [{low:g}, {high:g}]; stagewise reads "
                                  "float images as intensities in 0-1: scale it to 0-1 or convert it to 8-bit first")
        return np.rint(values * 255.0).astype(np.uint8)
    if low < 0 or high > 65535:
        raise ImageInputError(f"{source} is an integer image with values in [{low}, {high}]; stagewise reads "
                              "integer images as 8- or 16-bit: convert it to 8- or 16-bit first")
    return np.rint(values / 257.0).astype(np.uint8)


@dataclass(frozen=True)
class Preprocess:
    """How an RGB uint8 image becomes a model input tensor (all values from the manifest).

    ``resize`` is ``"shorter_crop"`` (resize the shorter side to ``size / crop_fraction`` then
    centre-crop ``size``) or ``"stretch"`` (resize straight to ``size``). ``mean`` and ``std``
    are in 0-255 units: ``x = (pixel - mean) / std``.

    ``resizer`` is the library the crop box is resized with, recorded in the manifest so that the
    device resizes exactly as calibration did:

    * ``"pillow"`` (the default, and what bundles without the key mean): one
      ``PIL.Image.resize(box=...)`` call on the exact (sub-pixel) box, antialiased;
    * ``"opencv"``: the box rounded to whole pixels, halved with ``cv2.pyrDown`` (a Gaussian
      low-pass, so large downscales do not alias) while it is at least twice the stage size, then
      one ``cv2.resize``. 6-9 times faster than Pillow on a 500x375 photo (0.12-0.21 against 1.1-1.3 ms
      here); its pixels differ from Pillow's by about one grey level. Needs OpenCV
      (``pip install "stagewise[opencv]"``).
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layout: str = "NCHW"
    resize: str = "shorter_crop"
    crop_fraction: float = 0.875
    interpolation: str = "bilinear"
    resizer: str = "pillow"

    def __post_init__(self) -> None:
        if self.resizer not in RESIZERS:
            raise InvalidOptionError(f"unknown resizer {self.resizer!r}; choose one of {', '.join(RESIZERS)}")

    @classmethod
    def from_manifest(cls, spec: dict) -> "Preprocess":
        return cls(mean=tuple(spec["mean"]), std=tuple(spec["std"]), layout=spec["layout"],
                   resize=spec["resize"], crop_fraction=spec.get("crop_fraction", 1.0),
                   interpolation=spec.get("interpolation", "bilinear"), resizer=spec.get("resizer", "pillow"))

    def to_manifest(self) -> dict:
        """The manifest's ``input`` record (``resizer`` only when it is not Pillow, so that runtimes from
        before the key existed still read the bundles that do not need it)."""
        spec = {"color": "RGB", "layout": self.layout, "dtype": "float32", "mean": list(self.mean),
                "std": list(self.std), "resize": self.resize, "crop_fraction": self.crop_fraction,
                "interpolation": self.interpolation}
        if self.resizer != "pillow":
            spec["resizer"] = self.resizer
        return spec

    def check_resizer(self) -> None:
        """Import the resizer's library now (at load, not on the first image); a missing one raises
        :class:`~stagewise.errors.MissingExtraError` naming the install command."""
        if self.resizer == "opencv":
            _opencv()

    def crop_box(self, height: int, width: int, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The region of a ``height`` x ``width`` image that becomes the stage input of ``size`` = (h, w).

        One rule for every input size: ``"stretch"`` takes the whole image; ``"shorter_crop"``
        takes the centred box that, scaled so the shorter side is ``max(size) / crop_fraction``,
        is ``size`` (an image already at ``size`` is centre-cropped like any other).
        Returned as PIL's ``(left, top, right, bottom)`` in source pixels.
        """
        h, w = size
        if self.resize == "stretch":
            return 0.0, 0.0, float(width), float(height)
        scale = max(h, w) / self.crop_fraction / min(height, width)
        box_w, box_h = min(width, w / scale), min(height, h / scale)
        left, top = (width - box_w) / 2, (height - box_h) / 2
        return left, top, left + box_w, top + box_h

    def resized(self, image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """The crop box of an HxWx3 uint8 image resized to ``size`` = (height, width), in one resize call.

        Returns ``image`` itself (no copy) when the box is the whole image and it is already at ``size``.
        """
        h, w = size
        box = self.crop_box(image.shape[0], image.shape[1], size)
        if image.shape[:2] == (h, w) and box == (0.0, 0.0, float(w), float(h)):
            return image
        return self.crop_resized(image, box, size)

    def crop_resized(self, image: np.ndarray, box: tuple[float, float, float, float],
                     size: tuple[int, int]) -> np.ndarray:
        """The ``box`` (PIL's left, top, right, bottom, source pixels) of an HxWx3 uint8 image resized
        to ``size`` = (height, width) with this preprocessing's resizer and interpolation."""
        if self.resizer == "opencv":
            return _opencv_resized(image, box, size, self.interpolation)
        return np.asarray(Image.fromarray(image).resize((size[1], size[0]), _RESAMPLE[self.interpolation],
                                                        box=tuple(float(v) for v in box)))

    def patches(self, images: list[np.ndarray], boxes: np.ndarray, size: tuple[int, int], pixels: bool) -> np.ndarray:
        """What a patch stage reads: ``boxes[i]`` of ``images[i]`` resized to ``size``, as uint8 NHWC
        pixels (``pixels``) or the normalised float tensor."""
        batch = np.empty((len(images), size[0], size[1], 3), dtype=np.uint8)
        for i, (im, box) in enumerate(zip(images, boxes)):
            batch[i] = self.crop_resized(im, box, size)
        return batch if pixels else self.normalised(batch)

    def pixels(self, images: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
        """A uint8 NHWC batch of the resized images (a view of the image when one is already prepared)."""
        if len(images) == 1:
            return self.resized(images[0], size)[None]
        batch = np.empty((len(images), size[0], size[1], 3), dtype=np.uint8)
        for i, im in enumerate(images):
            batch[i] = self.resized(im, size)
        return batch

    def tensor(self, images: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
        """A float32 batch in the model's layout, normalised, from uint8 RGB images."""
        return self.normalised(self.pixels(images, size))

    def normalised(self, pixels: np.ndarray) -> np.ndarray:
        """A uint8 NHWC batch as the model's float32 input: normalised, in the model's layout."""
        batch = pixels.astype(np.float32)
        batch -= np.asarray(self.mean, dtype=np.float32)
        batch /= np.asarray(self.std, dtype=np.float32)
        if self.layout == "NCHW":
            batch = batch.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(batch)

    def stage_input(self, images: list[np.ndarray], size: tuple[int, int], pixels: bool) -> np.ndarray:
        """What an image stage reads: the uint8 NHWC :meth:`pixels` when it normalises in its graph
        (``pixels``), else the float :meth:`tensor`."""
        return self.pixels(images, size) if pixels else self.tensor(images, size)


@functools.cache
def _opencv() -> Any:
    from .extras import require

    return require("cv2", "opencv", "a bundle that resizes with OpenCV (input.resizer = opencv)")


def _opencv_resized(image: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int],
                    interpolation: str) -> np.ndarray:
    """The ``"opencv"`` resizer: the whole-pixel ``box`` halved by ``cv2.pyrDown`` while it is at least
    twice ``size`` = (height, width), then one ``cv2.resize``."""
    cv2 = _opencv()
    h, w = size
    left, top, right, bottom = (int(round(v)) for v in box)
    crop = image[top:max(bottom, top + 1), left:max(right, left + 1)]
    while crop.shape[0] >= 2 * h and crop.shape[1] >= 2 * w:
        crop = cv2.pyrDown(crop)
    flags = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}[interpolation]
    return cv2.resize(crop, (w, h), interpolation=flags)
