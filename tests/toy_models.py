"""Tiny torch classifiers for converter tests (also loadable by the CLI as toy_models.py:factory)."""

from __future__ import annotations

import torch
from torch import nn


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.bn(self.conv1(x)))))


class ResidualNet(nn.Module):
    """stem -> layer1 (residual) -> down -> layer2 (residual) -> pool -> fc."""

    stagewise_input = {"mean": [128, 128, 128], "std": [64, 64, 64], "resize": "stretch"}

    def __init__(self, classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.layer1 = Residual(8)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.layer2 = Residual(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.layer2(self.down(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


class Branches(nn.Module):
    """Inception-like: two branches concatenated along channels."""

    def __init__(self, c: int):
        super().__init__()
        self.a = nn.Conv2d(c, c, 1)
        self.b = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU())

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


class ConcatNet(nn.Module):
    """stem -> block1 (concat) -> block2 (concat, dense skip from block1's input) -> pool -> fc."""

    stagewise_input = {"mean": [128, 128, 128], "std": [64, 64, 64], "resize": "stretch"}

    def __init__(self, classes: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.block1 = Branches(6)
        self.block2 = Branches(12)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = self.block2(self.block1(x))
        return self.fc(self.pool(x).flatten(1))


def residual_net() -> nn.Module:
    torch.manual_seed(0)
    return ResidualNet().eval()


def concat_net() -> nn.Module:
    torch.manual_seed(0)
    return ConcatNet().eval()
