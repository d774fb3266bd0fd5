"""Toy reproductions of real-architecture failures: each now converts or is refused with a clear message."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from toy_images import make_image_folder
from stagewise.converters import convert
from stagewise.converters.source import AMBIGUOUS
from stagewise.converters.torch_cuts import cut_candidates, list_cut_points, split_model
from stagewise.errors import ConversionError, InvalidCutPointError


class DataDependent(nn.Module):
    """Branches on a tensor value, which ``torch.fx`` cannot trace (as timm's EfficientViT/MobileViT blocks)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        if x.mean() > 1e9:
            return x
        return torch.relu(self.conv(x))


class LeafNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = DataDependent()
        self.head = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.head(self.block(self.stem(x))).mean((2, 3)))


def test_timm_leaf_modules_are_honoured_when_tracing(monkeypatch):
    with pytest.raises(ConversionError, match="fx-traceable"):
        list_cut_points(LeafNet().eval())
    # timm's registry of non-traceable modules (timm.models.get_notrace_modules), as timm exposes it
    timm, models = types.ModuleType("timm"), types.ModuleType("timm.models")
    models.get_notrace_modules = lambda: [DataDependent]
    models.get_notrace_functions = lambda: []
    timm.models = models
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "timm.models", models)
    model = LeafNet().eval()
    assert list_cut_points(model) == ["stem", "block", "head"]
    x = torch.randn(2, 3, 8, 8)
    first, rest = split_model(model, ["block"])
    torch.testing.assert_close(rest(first(x)), model(x))


class ChannelsLastCube(nn.Module):
    """A Swin-like stage whose channels-last carry has side = channels (8 x 8 x 8)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.norm(self.embed(x).permute(0, 2, 3, 1))
        return self.fc(x.mean((1, 2)))


def test_a_channels_last_cube_carry_is_marked_ambiguous_and_refused_clearly(tmp_path):
    model = ChannelsLastCube().eval()
    points = {c.name: c for c in cut_candidates(model, torch.zeros(1, 3, 32, 32))}
    assert points["norm"].layout == AMBIGUOUS
    # at another size the layout is plain again
    assert {c.name: c for c in cut_candidates(model, torch.zeros(1, 3, 48, 48))}["norm"].layout == "NHWC"
    model.stagewise_input = {"mean": [128] * 3, "std": [64] * 3, "resize": "stretch"}
    data = make_image_folder(tmp_path / "images", classes=3, per_class=10, size=32)
    with pytest.raises(ConversionError, match="channels-last with its side equal to its channel count"):
        convert(model, out=tmp_path / "never.swb", data=data, exits=["norm"], input_size=32)
    assert not (tmp_path / "never.swb").exists()


def test_a_channels_first_cube_carry_stays_channels_first():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 2)).eval()
    points = {c.name: c for c in cut_candidates(model, torch.zeros(1, 3, 32, 32))}
    assert points["1"].shape == (8, 8, 8) and points["1"].layout == "NCHW"


def test_long_cut_lists_are_shortened_and_skip_identities():
    layers = []
    for _ in range(30):
        layers += [nn.Conv2d(4, 4, 1), nn.Dropout(0.1)]
    model = nn.Sequential(nn.Conv2d(3, 4, 1), *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    with pytest.raises(InvalidCutPointError) as error:
        split_model(model, ["nope"])
    message = str(error.value)
    assert "(first 20 of 33; `stagewise cuts MODEL` lists all)" in message  # 30 dropouts left out
    listed = message.split("order: ")[1].split(" (first")[0].split(", ")
    assert listed[:4] == ["0", "1", "3", "5"] and len(listed) == 20


keras = pytest.importorskip("keras")


def _keras_add_model():
    from keras import layers

    inp = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, padding="same", name="c1")(inp)
    y = x + layers.Conv2D(8, 3, padding="same", name="c2")(x)  # an op layer named "add", not a keras layer
    z = layers.GlobalAveragePooling2D(name="gap")(layers.Conv2D(8, 3, padding="same", name="c3")(y))
    return keras.Model(inp, layers.Dense(3, name="fc")(z))


def test_keras_op_layer_cuts_split():
    from stagewise.converters.keras_source import KerasSource

    model = _keras_add_model()
    source = KerasSource()
    assert "add" in [c.name for c in source.cut_points(model, (16, 16)) if c.single_tensor]
    first, rest = source.split(model, ["add"])
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(source.run(rest, source.run(first, x)[0])[0], source.run(model, x)[0], atol=1e-5)


def test_keras_grouped_convolutions_are_refused_for_onnx_naming_the_formats_that_work():
    from keras import layers

    from stagewise.converters.keras_source import KerasSource

    inp = keras.Input((16, 16, 4))
    x = layers.Conv2D(8, 3, padding="same", groups=2, name="grouped")(inp)
    model = keras.Model(inp, layers.Dense(3)(layers.GlobalAveragePooling2D()(x)))
    with pytest.raises(ConversionError, match="grouped.*--format openvino or --format tflite"):
        KerasSource().check_formats(model, ("onnx",))
    KerasSource().check_formats(model, ("openvino", "tflite"))


class _UnstableBN(torch.nn.Module):
    """A conv whose first channel is nearly constant, normalised by a running variance near zero: the network
    itself amplifies float rounding (a BatchNorm-unstable checkpoint), whatever exports it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 3)
        with torch.no_grad():
            self.conv.weight[0] *= 1e-4
            self.conv.bias[0] = 10.0
            self.bn.running_mean[0] = 10.0
            self.bn.running_var[0] = 1e-12
            self.bn.weight[0] = 100.0  # gain 100 / sqrt(eps) = 3.2e4

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def test_a_batchnorm_unstable_network_is_named_as_such_not_as_an_exporter_difference(tmp_path):
    from stagewise.converters.export import StageInputs, export_stage, exporter
    from stagewise.converters.options import BuildOptions
    from stagewise.converters.plans import cascade_plans
    from stagewise.converters.torch_source import TorchSource
    from stagewise.errors import VerificationError

    model = _UnstableBN().eval()
    assert [name for name, _ in TorchSource().unstable_normalisation(model)] == ["bn"]
    x = np.random.default_rng(0).normal(0, 1, (16, 3, 8, 8)).astype(np.float32)
    plan = cascade_plans([("only", model, (8, 8))])[0]
    with pytest.raises(VerificationError, match=r"not the exporter: its batch-normalisation layer\(s\) bn \("):
        export_stage(exporter("onnx"), plan, tmp_path, StageInputs(x, x, x), BuildOptions())
    with torch.no_grad():
        model.bn.running_var[0] = 1.0
    assert TorchSource().unstable_normalisation(model) == []
