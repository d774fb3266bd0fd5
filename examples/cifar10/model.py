"""A small ResNet for CIFAR-10 (32x32 RGB), the model of the real-data example.

Layout (NCHW float32 input, 32x32)::

    stem    conv3x3(3->32) + BN + ReLU                       32x32
    layer1  2 x BasicBlock(32)                               32x32
    layer2  2 x BasicBlock(64),  first with stride 2         16x16
    layer3  2 x BasicBlock(128), first with stride 2          8x8
    pool    AdaptiveAvgPool2d(1) -> flatten -> fc Linear(128 -> 10)

The residual groups are the top-level modules ``layer1``, ``layer2`` and ``layer3`` so that the
converter can cut the network after ``layer1`` and ``layer2`` with ``torch.fx``; the forward has
no data-dependent control flow.

Inputs are RGB images normalised per channel as ``(pixel - MEAN) / STD`` with ``MEAN`` and
``STD`` in 0-255 units (the usual CIFAR-10 training-set statistics); the model declares them as
``stagewise_input``, so ``stagewise convert`` needs no ``--mean``/``--std``.

This module imports only ``torch`` and the standard library (``resnet_cifar_exits`` also stagewise's
converter), so the CLI can load it as
``examples/cifar10/model.py:resnet_cifar``. Trained weights live next to it in
``resnet_cifar.pt``; ``train.py`` in the same folder writes them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["MEAN", "STD", "NUM_CLASSES", "WEIGHTS", "EXIT_WEIGHTS_FILE", "BasicBlock", "ResNetCifar", "resnet_cifar",
           "resnet_cifar_exits", "resnet_cifar_small", "SMALL_WEIGHTS"]

#: Per-channel RGB mean of CIFAR-10 in 0-255 units.
MEAN: tuple[float, float, float] = (125.3, 123.0, 113.9)
#: Per-channel RGB standard deviation of CIFAR-10 in 0-255 units.
STD: tuple[float, float, float] = (63.0, 62.1, 66.7)
#: Number of output classes (airplane ... truck, sorted by name).
NUM_CLASSES: int = 10
#: The committed trained weights (fp32 state_dict), written by ``train.py``.
WEIGHTS: Path = Path(__file__).resolve().with_name("resnet_cifar.pt")
#: The committed smaller static network (widths 16, 32, 64), written by ``train.py --widths 16,32,64``.
SMALL_WEIGHTS: Path = Path(__file__).resolve().with_name("resnet_cifar_small.pt")
#: The committed jointly fine-tuned network with its exit heads, written by ``train_exits.py``.
EXIT_WEIGHTS_FILE: Path = Path(__file__).resolve().with_name("resnet_cifar_exits.pt")


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a skip connection, then ReLU.

    The skip is the identity, or a 1x1 convolution + BN when the stride or the channel count
    changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """Stem + three residual groups (``layer1``..``layer3``) + global average pool + ``fc``."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), blocks: int = 2,
                 num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.stem = nn.Sequential(
            nn.Conv2d(3, w1, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(w1),
            nn.ReLU(inplace=True),
        )
        self.layer1 = self._group(w1, w1, blocks, stride=1)
        self.layer2 = self._group(w1, w2, blocks, stride=2)
        self.layer3 = self._group(w2, w3, blocks, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)
        self._init_weights()

    @staticmethod
    def _group(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Start each residual branch at zero so every block begins as (almost) the identity.
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet_cifar(pretrained: bool = True, weights: str | Path | None = None) -> ResNetCifar:
    """Build the CIFAR-10 ResNet, in eval mode.

    Args:
        pretrained: load trained weights (the committed ``resnet_cifar.pt`` next to this file
            unless ``weights`` names another file). ``False`` returns a freshly initialised
            network (what ``train.py`` starts from).
        weights: path of a ``state_dict`` file to load instead of the committed one; implies
            ``pretrained``.

    Raises:
        FileNotFoundError: the weights file does not exist (run ``examples/cifar10/train.py``
            to create it).
    """
    model = ResNetCifar()
    if pretrained or weights is not None:
        path = Path(weights) if weights is not None else WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(
                f"CIFAR-10 weights not found: {path}. Train them with "
                "`python examples/cifar10/train.py` (it writes examples/cifar10/resnet_cifar.pt), "
                "or call resnet_cifar(pretrained=False) for an untrained network.")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    # the normalisation it was trained with, read by `stagewise convert` (a centred square, no crop margin)
    model.stagewise_input = {"mean": list(MEAN), "std": list(STD), "size": 32, "resize": "shorter_crop",
                             "crop_fraction": 1.0}
    return model.eval()


def resnet_cifar_small(weights: str | Path | None = None) -> ResNetCifar:
    """The smaller static CIFAR-10 ResNet (widths 16, 32, 64; a quarter of the MACs), trained with the
    same recipe as :func:`resnet_cifar` (``train.py --widths 16,32,64``), in eval mode."""
    path = Path(weights) if weights is not None else SMALL_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"small CIFAR-10 weights not found: {path}. Train them with "
                                "`python examples/cifar10/train.py --widths 16,32,64 --out examples/cifar10/resnet_cifar_small.pt`.")
    model = ResNetCifar(widths=(16, 32, 64))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.stagewise_input = resnet_cifar(pretrained=False).stagewise_input
    return model.eval()


def resnet_cifar_exits(weights: str | Path | None = None) -> ResNetCifar:
    """The CIFAR-10 ResNet fine-tuned together with conv exit heads after ``layer1.0``, ``layer1``,
    ``layer2.0`` and ``layer2`` (``train_exits.py``), in eval mode.

    The heads ride along as ``model.stagewise_exits``, so ``stagewise convert ... --exits
    layer1,layer2`` (any of those cuts) exports them instead of training new ones.
    """
    from stagewise.converters.torch_training import attach_exits

    path = Path(weights) if weights is not None else EXIT_WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"jointly trained CIFAR-10 weights not found: {path}. Train them with "
                                "`python examples/cifar10/train_exits.py`.")
    model = attach_exits(resnet_cifar(pretrained=False), torch.load(path, map_location="cpu", weights_only=True))
    model.stagewise_input = resnet_cifar(pretrained=False).stagewise_input
    return model
