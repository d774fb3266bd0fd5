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


class FragileNet(nn.Module):
    """A net with one layer INT8 cannot take: ``amp`` blows channel 0 up by 1000 and ``mix`` undoes
    it, so a per-tensor scale on ``mix``'s input wipes out channels 1-3, which decide the class,
    unless ``mix`` stays float."""

    stagewise_input = {"mean": [128, 128, 128], "std": [64, 64, 64], "resize": "stretch"}

    def __init__(self, classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.amp = nn.Conv2d(8, 8, 1)
        self.mix = nn.Conv2d(8, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)
        with torch.no_grad():
            for conv, gain in ((self.amp, 1000.0), (self.mix, 1e-3)):
                conv.weight.copy_(torch.eye(8).reshape(8, 8, 1, 1))
                conv.weight[0, 0] *= gain
                conv.bias.zero_()
            stem = self.stem[0]
            stem.weight.zero_()
            stem.bias.zero_()
            stem.weight[0, :, 1, 1] = 1.0  # channel 0: brightness, the channel amp blows up
            for k in range(3):
                stem.weight[k + 1, k, 1, 1] = 1.0  # channels 1-3: red, green, blue
            self.fc.weight.zero_()
            self.fc.bias.zero_()
            for c in range(classes):
                self.fc.weight[c, c + 1] = 1.0  # class c: the image's dominant colour

    def forward(self, x):
        x = self.mix(self.amp(self.stem(x)))
        return self.fc(self.pool(x).flatten(1))


def fragile_net(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return FragileNet(classes).eval()


class PatchEmbed(nn.Module):
    """4x4 patches -> tokens (N x T x C)."""

    def __init__(self, c: int):
        super().__init__()
        self.proj = nn.Conv2d(3, c, 4, stride=4)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TokenBlock(nn.Module):
    """A transformer-like residual MLP over the channel axis of N x T x C tokens."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class TokenNet(nn.Module):
    """ViT-like: patch tokens -> two token blocks -> mean over tokens -> fc; carries are N x T x C."""

    stagewise_input = {"mean": [128, 128, 128], "std": [64, 64, 64], "resize": "stretch"}

    def __init__(self, classes: int = 3, c: int = 12):
        super().__init__()
        self.embed = PatchEmbed(c)
        self.block1 = TokenBlock(c)
        self.block2 = TokenBlock(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.block2(self.block1(self.embed(x))).mean(dim=1))


class ChannelsLastNet(nn.Module):
    """Swin-like: conv stem, then N x H x W x C carries (LayerNorm + Linear on the last axis)."""

    stagewise_input = {"mean": [128, 128, 128], "std": [64, 64, 64], "resize": "stretch"}

    def __init__(self, classes: int = 3, c: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.block1 = TokenBlock(c)
        self.block2 = TokenBlock(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        return self.fc(self.block2(self.block1(x)).mean(dim=(1, 2)))
