"""Exit heads as torch modules: pooling by carry layout, linear, convolutional and MLP heads.

Every head maps a carry (the tensor crossing a cut) to logits and pools it by the carry's
*layout*: ``auto`` (inferred from the carry's shape by :func:`carry_layout` when the head runs),
``NCHW`` (convolutional feature maps, averaged over H and W), ``NHWC`` (channels-last
feature maps such as Swin's, averaged over H and W), ``tokens`` (N x T x C transformer tokens,
averaged over T) or ``flat`` (N x C, passed through).

Head kinds (``--head``):

* ``gap_linear`` / ``savchenko``: pool -> [L2 normalise] -> linear (:class:`Head`); on a frozen
  backbone these are fitted with L-BFGS by :mod:`.heads`, in joint training with SGD.
* ``conv``: one 3x3 convolution with stride 2 (carry channels -> ``width``), BatchNorm, ReLU, then
  pooling and a linear layer, as the internal classifiers of Shallow-Deep Networks
  (:class:`ConvHead`; needs a feature map).
* ``mlp``: pool -> linear(``width``) -> ReLU -> linear (:class:`MLPHead`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from stagewise.errors import ConversionError

from .heads import LinearHead

LAYOUTS = ("auto", "NCHW", "NHWC", "tokens", "flat")


def carry_layout(shape: Sequence[int], image_size: Sequence[int] | None = None) -> str:
    """The layout of a carry of per-sample ``shape`` (no batch axis).

    3-D shapes are feature maps. They are channels-last (``NHWC``) when the first two axes are the
    spatial ones: equal to each other, unequal to the last, or proportional to ``image_size``
    while the last is not; otherwise channels-first (``NCHW``). 2-D shapes are tokens, 1-D flat.
    """
    if len(shape) == 1:
        return "flat"
    if len(shape) == 2:
        return "tokens"
    if len(shape) != 3:
        raise ConversionError(f"an exit head cannot pool a carry of shape {tuple(shape)}; cut where the output is "
                              "a feature map (C x H x W or H x W x C), tokens (T x C) or a vector")
    a, b, c = (int(d) for d in shape)
    if image_size is not None:
        h, w = (int(d) for d in image_size)
        first_spatial = h % a == 0 and w % b == 0 and h // a == w // b
        last_spatial = h % b == 0 and w % c == 0 and h // b == w // c
        if first_spatial != last_spatial:
            return "NHWC" if first_spatial else "NCHW"
    return "NHWC" if a == b and b != c else "NCHW"


class Pool(torch.nn.Module):
    """Average a carry over its spatial axes or tokens, by ``layout``; a flat carry passes."""

    def __init__(self, layout: str = "auto"):
        super().__init__()
        if layout not in LAYOUTS:
            raise ConversionError(f"unknown carry layout {layout!r}; one of {', '.join(LAYOUTS)}")
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = carry_layout(tuple(x.shape[1:])) if self.layout == "auto" else self.layout
        if layout == "NCHW":
            return x.mean(dim=(2, 3))
        if layout == "NHWC":
            return x.mean(dim=(1, 2))
        if layout == "tokens":
            return x.mean(dim=1)
        return x.flatten(1)


class Head(torch.nn.Module):
    """``pool -> [L2 normalise] -> linear``; :meth:`from_linear` loads a fitted :class:`LinearHead`."""

    def __init__(self, channels: int, classes: int, layout: str = "auto", normalise: bool = False):
        super().__init__()
        self.pool = Pool(layout)
        self.normalise = normalise
        self.linear = torch.nn.Linear(channels, classes)

    @classmethod
    def from_linear(cls, head: LinearHead, layout: str = "auto") -> "Head":
        module = cls(head.channels, head.classes, layout, head.normalise)
        with torch.no_grad():
            module.linear.weight.copy_(torch.from_numpy(np.asarray(head.weight, dtype=np.float32)))
            module.linear.bias.copy_(torch.from_numpy(np.asarray(head.bias, dtype=np.float32)))
        return module.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        if self.normalise:
            x = torch.nn.functional.normalize(x, dim=1, eps=1e-12)
        return self.linear(x)


class ConvHead(torch.nn.Module):
    """3x3 convolution (stride 2) + BatchNorm + ReLU, then pooling and a linear layer."""

    def __init__(self, channels: int, classes: int, layout: str = "NCHW", width: int | None = None):
        super().__init__()
        if layout not in ("NCHW", "NHWC"):
            raise ConversionError(f"a conv head needs a feature-map carry (C x H x W or H x W x C), not {layout}; "
                                  "use --head gap_linear or mlp at this cut")
        width = width or channels
        self.channels_last = layout == "NHWC"
        self.conv = torch.nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(width)
        self.pool = Pool("NCHW")
        self.linear = torch.nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        x = torch.relu(self.bn(self.conv(x)))
        return self.linear(self.pool(x))


class MLPHead(torch.nn.Module):
    """``pool -> linear(width) -> ReLU -> linear``."""

    def __init__(self, channels: int, classes: int, layout: str = "NCHW", width: int | None = None):
        super().__init__()
        width = width or 2 * channels
        self.pool = Pool(layout)
        self.hidden = torch.nn.Linear(channels, width)
        self.linear = torch.nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.relu(self.hidden(self.pool(x))))


def make_head(kind: str, shape: Sequence[int], classes: int, layout: str, width: int | None = None) -> torch.nn.Module:
    """A freshly initialised head of ``kind`` for a carry of per-sample ``shape`` and ``layout``."""
    channels = {"NCHW": shape[0], "NHWC": shape[-1], "tokens": shape[-1], "flat": int(np.prod(shape))}[layout]
    if kind in ("gap_linear", "savchenko"):
        return Head(int(channels), classes, layout, normalise=kind == "savchenko")
    if kind == "conv":
        return ConvHead(int(channels), classes, layout, width)
    if kind == "mlp":
        return MLPHead(int(channels), classes, layout, width)
    raise ConversionError(f"unknown exit head {kind!r}; choose from gap_linear, savchenko, conv, mlp")
