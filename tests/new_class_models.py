"""Toy "pretrained" torch backbones for the new-classes tests (loadable by the CLI as new_class_models.py:factory)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PretrainedToy(nn.Module):
    """stem -> layer1 -> down -> layer2 -> pool -> fc over 10 classes of its own, standing in for an
    ImageNet-pretrained network (it declares its labels, as the zoo's models do)."""

    stagewise_input = {"mean": [128, 128, 128], "std": [64, 64, 64], "resize": "stretch"}

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)
        self.stagewise_labels = [f"imagenet_{k}" for k in range(classes)]

    def forward(self, x):
        return self.fc(self.pool(self.layer2(self.down(self.layer1(self.stem(x))))).flatten(1))


def pretrained_toy() -> nn.Module:
    torch.manual_seed(0)
    return PretrainedToy().eval()


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
