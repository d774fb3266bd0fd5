"""Exit-aware training: joint fine-tuning, conv/mlp heads, heads a model carries, token and channels-last carries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stagewise.converters.build import stage_inputs
from stagewise.converters.export import StageInputs, export_stage, exporter
from stagewise.converters.heads import FineTuning, HeadTraining
from stagewise.converters.options import BuildOptions
from stagewise.converters.plans import early_exit_plans
from stagewise.converters.torch_heads import carry_layout
from stagewise.converters.torch_source import TorchSource
from stagewise.converters.torch_training import attach_exits, exit_checkpoint
from stagewise.datasets import open_image_set
from stagewise.errors import ConversionError
from stagewise.images import Preprocess
from toy_models import ChannelsLastNet, ResidualNet, TokenNet, residual_net

PRE = Preprocess(mean=(128, 128, 128), std=(64, 64, 64), resize="stretch", crop_fraction=1.0)
FAST = FineTuning(epochs=3, batch_size=16, augment="none")


def stripes(root, per_class: int = 60, size: int = 16, seed: int = 0):
    """Four classes of faint stripes (vertical/horizontal x period 2/4) in strong noise: the GAP of an
    untrained early layer cannot separate them, trained features can."""
    rng = np.random.default_rng(seed)
    for c in range(4):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            period = (2, 4)[c // 2]
            line = (((np.arange(size) + rng.integers(0, period)) % period) < period // 2) * 20.0
            img = np.repeat(line[None, :], size, 0) if c % 2 == 0 else np.repeat(line[:, None], size, 1)
            img = img[..., None] + rng.integers(0, 160, (size, size, 3))
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return open_image_set(root).split([0.5, 0.5], seed=0)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny batches train faster on one thread, and much faster when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stripe_splits(tmp_path_factory):
    return stripes(tmp_path_factory.mktemp("stripes"))


def exit_accuracy(plans, images) -> float:
    x = PRE.tensor([images.image(i) for i in range(len(images))], (16, 16))
    _, logits = TorchSource().run(plans[0].module, x)
    return float((logits.argmax(1) == images.targets).mean())


def test_joint_training_beats_frozen_heads_at_an_early_exit(stripe_splits):
    train, test = stripe_splits
    accuracy = {}
    for mode in ("frozen", "joint"):
        torch.manual_seed(0)
        tuning = FineTuning(epochs=30, lr=0.05, head_lr=0.05, batch_size=16, augment="none")
        plans = early_exit_plans(ResidualNet(classes=4), ["layer1"], PRE, (16, 16), train,
                                 HeadTraining(mode=mode, max_iter=100, tuning=tuning), held_out=test)
        accuracy[mode] = exit_accuracy(plans, test)
    assert accuracy["frozen"] < 0.6
    assert accuracy["joint"] > accuracy["frozen"] + 0.25
    record = plans[0].head
    assert record["trained_on"] == "joint fine-tuning with the backbone" and record["after"] == "layer1"
    assert set(record["training"]["held_out"]["accuracy"]) == {"exit0", "final"}
    assert 0 <= record["training"]["held_out"]["original_final_accuracy"] <= 1


@pytest.mark.parametrize("kind", ["conv", "mlp", "gap_linear"])
def test_torch_trained_heads_export_and_agree_with_torch(tmp_path, image_folder, kind):
    train, calib = open_image_set(image_folder).split([0.5, 0.5], seed=0)
    mode = "joint" if kind == "gap_linear" else "frozen"
    plans = early_exit_plans(residual_net(), ["layer1"], PRE, (16, 16), train,
                             HeadTraining(kind=kind, mode=mode, tuning=FAST))
    assert plans[0].head["kind"] == kind and plans[0].head["macs"] > 0
    if kind == "conv":  # a 3x3 stride-2 conv from 8 to 8 channels at 8x8, then a linear layer
        assert plans[0].head["macs"] == 8 * 8 * 8 * 8 * 9 + 8 * 3
    x = stage_inputs(plans, PRE, [calib.image(i) for i in range(12)])[0]
    art, _, _ = export_stage(exporter("onnx"), plans[0], tmp_path, StageInputs(x, x, x), BuildOptions())
    assert art["verification"]["top1_agreement"] == 1.0
    assert max(art["verification"]["max_abs_diff"].values()) < 1e-4


def test_a_model_carrying_trained_heads_exports_them(image_folder):
    train, _ = open_image_set(image_folder).split([0.5, 0.5], seed=0)
    cuts, training = ["layer1"], HeadTraining(kind="conv", mode="joint", tuning=FAST)
    source = TorchSource()
    segments, heads, record = source.train_exits(source.split(residual_net(), cuts), train, PRE, (16, 16), 3, training)
    checkpoint = exit_checkpoint(segments, heads, cuts, training, 3, (16, 16), record)
    model = attach_exits(residual_net(), checkpoint)
    plans = early_exit_plans(model, cuts, PRE, (16, 16), train)  # auto: the carried heads
    assert plans[0].head["trained_on"] == "given with the model" and plans[0].head["kind"] == "conv"
    x = PRE.tensor([train.image(i) for i in range(8)], (16, 16))
    with torch.no_grad():
        expected = heads[0](segments[0](torch.from_numpy(x))).numpy()
    np.testing.assert_allclose(source.run(plans[0].module, x)[1], expected, atol=1e-5)
    with pytest.raises(ConversionError, match="carries exit heads at layer1, not at down"):
        early_exit_plans(model, ["down"], PRE, (16, 16), train)
    with pytest.raises(ConversionError, match="needs a model that carries trained exit heads"):
        early_exit_plans(residual_net(), cuts, PRE, (16, 16), train, HeadTraining(mode="given"))


def test_conv_heads_refuse_token_carries(image_folder):
    train, _ = open_image_set(image_folder).split([0.5, 0.5], seed=0)
    with pytest.raises(ConversionError, match="conv head needs a feature-map carry"):
        early_exit_plans(TokenNet(), ["block1"], PRE, (16, 16), train, HeadTraining(kind="conv", tuning=FAST))


@pytest.mark.parametrize("factory, cut, layout", [(TokenNet, "block1", "tokens"), (ChannelsLastNet, "block1", "NHWC")])
def test_heads_pool_token_and_channels_last_carries_over_the_right_axes(tmp_path, image_folder, factory, cut, layout):
    train, calib = open_image_set(image_folder).split([0.5, 0.5], seed=0)
    model = factory()
    point = next(c for c in TorchSource().cut_points(model, (16, 16)) if c.name == cut)
    assert point.layout == layout and point.channels == model.fc.in_features
    for training in (HeadTraining(max_iter=100), HeadTraining(kind="mlp", tuning=FAST)):
        plans = early_exit_plans(model, [cut], PRE, (16, 16), train, training)
        head = plans[0].module.head
        linear = head.linear if training.kind == "gap_linear" else head.hidden
        assert linear.in_features == model.fc.in_features  # pooled over tokens / H and W, not over channels
        x = stage_inputs(plans, PRE, [calib.image(i) for i in range(12)])[0]
        art, _, _ = export_stage(exporter("onnx"), plans[0], tmp_path, StageInputs(x, x, x), BuildOptions())
        assert art["verification"]["top1_agreement"] == 1.0


def test_carry_layouts():
    assert carry_layout((32, 16, 16)) == "NCHW"
    assert carry_layout((56, 56, 96)) == "NHWC"
    assert carry_layout((28, 28, 28), (112, 112)) == "NCHW"
    assert carry_layout((14, 7, 96), (224, 112)) == "NHWC"
    assert carry_layout((197, 768)) == "tokens"
    assert carry_layout((128,)) == "flat"
    with pytest.raises(ConversionError, match="cannot pool a carry"):
        carry_layout((2, 3, 4, 5))


def test_placement_prefers_the_cheap_confident_exit_and_respects_the_drop():
    from stagewise.converters.exit_placement import Candidate, rank_placements

    rng = np.random.default_rng(0)
    targets = rng.integers(0, 4, 400)
    sure = np.eye(4)[targets] * 8.0                     # always right, confident
    noisy = rng.normal(0, 1, (400, 4))                  # chance level
    wrong = np.eye(4)[(targets + 1) % 4] * 8.0          # confidently wrong
    candidates = [Candidate("early", 10, 1, 1.0, 0.25), Candidate("mid", 20, 1, 2.0, 1.0),
                  Candidate("bad", 15, 1, 1.5, 0.0)]
    logits = {"early": noisy, "mid": sure, "bad": wrong}
    ranked = rank_placements(candidates, logits, sure, 10.0, targets, 2, 0.005)
    assert ranked[0].cuts == ("mid",) and ranked[0].outcome.exit_rates[0] > 0.99
    assert ranked[0].outcome.mean_cost == pytest.approx(2.0, rel=0.02)
    assert all("bad" not in p.cuts or p.outcome.exit_rates[p.cuts.index("bad")] < 0.01 for p in ranked)
    alone = next(p for p in ranked if p.cuts == ())
    assert alone.outcome.mean_cost == 10.0 and all(p.outcome.mean_cost < 10.0 for p in ranked if "mid" in p.cuts)


def test_auto_exits_on_the_command_line_pick_valid_cuts_and_print_the_table(tmp_path, image_folder):
    from click.testing import CliRunner

    from stagewise.bundle import read_bundle
    from stagewise.cli import cli

    out = tmp_path / "auto.swb"
    model = f"{Path(__file__).with_name('toy_models.py')}:residual_net"
    result = CliRunner().invoke(cli, ["convert", model, "--exits", "auto:2", "--data", str(image_folder),
                                      "--out", str(out), "--target-drop", "5"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = result.output + (result.stderr if hasattr(result, "stderr") else "")
    assert "exit candidates" in text and "chosen exits:" in text
    manifest = read_bundle(out).manifest
    valid = {c.name for c in TorchSource().cut_points(residual_net(), (16, 16)) if c.single_tensor}
    chosen = [s.head["after"] for s in manifest.stages[:-1]]
    assert 1 <= len(chosen) <= 2 and set(chosen) <= valid
    placement = manifest.stages[0].head["placement"]
    assert list(placement["best"][0]["cuts"]) == chosen and {c["cut"] for c in placement["candidates"]} <= valid
