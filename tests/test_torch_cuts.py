"""Cut points and splitting of PyTorch models into stages (stagewise.converters.torch_cuts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stagewise.converters.torch_cuts import list_cut_points, split_model
from stagewise.errors import ConversionError, InvalidCutPointError


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.conv2(self.relu(self.conv1(x))))


class ResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.layer1 = nn.Sequential(Residual(8), Residual(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.size(0)  # used at the very end, like EfficientNet's forward
        return self.fc(self.pool(self.layer1(self.stem(x))).view(batch, -1))


class Dense(nn.Module):
    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(channels, growth, 1)
        self.b = nn.Conv2d(channels + growth, growth, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([x, self.a(x)], 1)
        return torch.cat([y, self.b(y)], 1)


class ConcatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.dense1 = Dense(4, 4)
        self.trans = nn.Conv2d(12, 6, 1)
        self.dense2 = Dense(6, 4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(14, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        x = self.dense2(self.trans(self.dense1(self.stem(x))))
        return self.fc(self.drop(x.mean((2, 3)).reshape(batch, -1)))


# layer1.1 is layer1's last child: the same tensor crosses after both, so it is listed once, as layer1
RESIDUAL_CUTS = ["stem", "layer1.0", "layer1", "pool"]
CONCAT_CUTS = ["stem", "dense1", "trans", "dense2", "drop"]


def compose(segments: list[torch.fx.GraphModule], x: torch.Tensor) -> torch.Tensor:
    for segment in segments:
        x = segment(x)
    return x


@pytest.mark.parametrize("net, expected", [(ResidualNet, RESIDUAL_CUTS), (ConcatNet, CONCAT_CUTS)])
def test_cut_points_are_whole_blocks_in_forward_order(net, expected):
    assert list_cut_points(net()) == expected


@pytest.mark.parametrize("net, cuts", [
    (ResidualNet, ["stem"]),
    (ResidualNet, ["layer1.0", "pool"]),
    (ResidualNet, ["stem", "layer1.0", "layer1", "pool"]),
    (ConcatNet, ["dense1"]),
    (ConcatNet, ["stem", "dense1", "trans", "dense2", "drop"]),
])
def test_segments_compose_to_the_model(net, cuts):
    torch.manual_seed(0)
    model = net().eval()
    x = torch.randn(3, 3, 16, 16)
    segments = split_model(model, cuts)
    assert len(segments) == len(cuts) + 1
    assert not any(segment.training for segment in segments)
    with torch.no_grad():
        torch.testing.assert_close(compose(segments, x), model(x))


def test_segments_take_carry_and_hold_only_their_parameters():
    first, middle, last = split_model(ResidualNet(), ["stem", "layer1"])
    inputs = [[n.name for n in s.graph.nodes if n.op == "placeholder"] for s in (first, middle, last)]
    assert inputs == [["x"], ["carry"], ["carry"]]
    assert set(dict(first.named_parameters())) == {"stem.weight", "stem.bias"}
    assert {name.split(".")[0] for name, _ in middle.named_parameters()} == {"layer1"}
    assert set(dict(last.named_parameters())) == {"fc.weight", "fc.bias"}


def test_tracing_uses_eval_mode_and_restores_training_flags():
    model = ConcatNet().train()
    model.dense1.eval()
    segments = split_model(model, ["dense2"])
    assert model.training and model.drop.training and not model.dense1.training
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(compose(segments, x), model.eval()(x))


@pytest.mark.parametrize("net, bad", [
    (ResidualNet, "layer1.0.conv1"),  # the skip tensor crosses too
    (ResidualNet, "layer1.1.relu"),  # called twice: its nodes are not contiguous
    (ResidualNet, "fc"),  # produces the final output
    (ConcatNet, "dense1.a"),  # the block input is concatenated after it
])
def test_invalid_cut_point_message_lists_every_valid_cut(net, bad):
    """... but identity modules (dropout at eval: the same cut as the one before them)."""
    with pytest.raises(InvalidCutPointError) as error:
        split_model(net(), [bad])
    message = str(error.value)
    assert repr(bad) in message and "not a valid cut point" in message
    valid = RESIDUAL_CUTS if net is ResidualNet else CONCAT_CUTS
    listed = message.split("order: ")[1].rstrip(".").split(", ")
    assert listed == [name for name in valid if name != "drop"]


@pytest.mark.parametrize("cuts, complaint", [
    (["stem", "layer9"], "'layer9' is not a submodule"),
    (["layer1", "stem"], "'stem' does not come after 'layer1'"),
    (["stem", "stem"], "'stem' does not come after 'stem'"),
    (["layer1", "layer1.1"], "'layer1.1' does not come after 'layer1'"),  # same cut, two names
])
def test_unknown_or_misordered_cuts_are_rejected(cuts, complaint):
    with pytest.raises(InvalidCutPointError, match=complaint) as error:
        split_model(ResidualNet(), cuts)
    assert all(name in str(error.value) for name in RESIDUAL_CUTS)


def test_model_input_crossing_a_cut_makes_it_invalid():
    class InputSkip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 3, 1)
            self.b = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x)) * x

    assert list_cut_points(InputSkip()) == []


def test_model_must_return_a_single_tensor():
    class TwoOutputs(ResidualNet):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.layer1(self.stem(x))
            return features, self.fc(self.pool(features).flatten(1))

    with pytest.raises(InvalidCutPointError, match="not a single tensor"):
        list_cut_points(TwoOutputs())


def test_untraceable_model_raises_conversion_error():
    class DataDependent(ResidualNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            if x.sum() > 0:
                x = self.layer1(x)
            return self.fc(self.pool(x).flatten(1))

    with pytest.raises(ConversionError, match="must be fx-traceable") as error:
        split_model(DataDependent(), ["stem"])
    assert "symbolically traced variables cannot be used as inputs to control flow" in str(error.value)


def test_segment_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = ResidualNet().eval()
    _, tail = split_model(model, ["layer1"])
    carry = torch.randn(2, 8, 8, 8)
    path = tmp_path / "tail.onnx"
    torch.onnx.export(tail, (carry,), path)
    session = ort.InferenceSession(str(path))
    assert [i.name for i in session.get_inputs()] == ["carry"]
    (logits,) = session.run(None, {"carry": carry.numpy()})
    np.testing.assert_allclose(logits, tail(carry).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_cut_point_records_without_data():
    from stagewise.converters import cut_points

    records = cut_points(ResidualNet(), input_size=16)
    by_name = {r.name: r for r in records}
    assert [r.name for r in records if r.single_tensor] == RESIDUAL_CUTS
    assert "layer1.1" not in by_name  # one record per crossing tensor, named by the outer module
    assert by_name["stem"].shape == (8, 8, 8) and by_name["stem"].reduction == 2 and by_name["stem"].channels == 8
    assert by_name["stem"].macs == 8 * 8 * 8 * 3 * 9
    assert by_name["layer1"].macs == by_name["stem"].macs + 4 * 8 * 8 * 8 * 8 * 9
    assert not by_name["layer1.0.conv1"].single_tensor  # the residual's input crosses it too
    macs = [r.macs for r in records]
    assert macs == sorted(macs)  # graph order


class Masked(nn.Module):
    """A forward with an optional argument (as attention blocks have): bound as a constant when tracing."""

    def __init__(self) -> None:
        super().__init__()
        self.body = ResidualNet()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.body(x)
        if mask is not None:  # traced as a tensor, the mask would cross every cut
            logits = logits.masked_fill(mask, 0.0)
        return logits


def test_optional_forward_arguments_do_not_block_cuts():
    assert "body.layer1" in list_cut_points(Masked())


def test_cuts_command_lists_records(tmp_path):
    import json

    from click.testing import CliRunner

    from stagewise.cli import cli

    spec = str(Path(__file__).parent / "toy_models.py") + ":residual_net"
    result = CliRunner().invoke(cli, ["cuts", spec, "--input-size", "16", "--json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    assert [r["name"] for r in records] == ["stem.0", "stem", "layer1", "down.0", "down", "layer2", "pool"]
    assert all(r["single_tensor"] for r in records) and records[2]["shape"] == [8, 16, 16]
    table = CliRunner().invoke(cli, ["cuts", spec, "--input-size", "16"])
    assert table.exit_code == 0 and "layer2" in table.output and "single tensor" in table.output
