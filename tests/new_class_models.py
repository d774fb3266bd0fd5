"""Toy "pretrained" torch backbones for the new-classes tests (loadable by the CLI as new_class_models.py:factory)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from toy_models import ResidualNet


def pretrained_toy() -> nn.Module:
    """A 10-class ResidualNet with its own labels, standing in for an ImageNet-pretrained network."""
    torch.manual_seed(0)
    model = ResidualNet(classes=10).eval()
    model.stagewise_labels = [f"imagenet_{k}" for k in range(10)]
    return model


class SamePadConv(nn.Conv2d):
    """A convolution whose forward calls ``F.conv2d`` itself (as EfficientNet-Lite's ``Conv2dStaticSamePadding``)."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class FunctionalNet(nn.Module):
    """stem (functional 3x3 conv) -> block (functional conv) -> pool -> fc."""

    stagewise_input = {"mean": [128, 128, 128], "std": [64, 64, 64], "resize": "stretch"}

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = SamePadConv(3, 8, 3)
        self.block = SamePadConv(8, 16, 3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = torch.relu(self.block(torch.relu(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


def functional_net() -> nn.Module:
    torch.manual_seed(0)
    return FunctionalNet().eval()
