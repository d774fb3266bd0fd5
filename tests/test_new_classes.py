"""New classes on a pretrained backbone: refused without the flag, every stage on the folder's classes with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from toy_images import make_image_folder
from new_class_models import functional_net, pretrained_toy
from stagewise import load
from stagewise.bundle import read_bundle
from stagewise.cli import cli, main
from stagewise.converters import convert, cut_points
from stagewise.converters.devices import resolve_device
from stagewise.converters.features import FeatureStore
from stagewise.converters.new_classes import feature_cut
from stagewise.converters.torch_source import TorchSource, count_macs
from stagewise.converters.torch_cuts import split_model
from stagewise.datasets import open_image_set
from stagewise.errors import ConversionError
from stagewise.images import Preprocess

MODELS = str(Path(__file__).with_name("new_class_models.py"))
PRE = Preprocess(mean=(128.0,) * 3, std=(64.0,) * 3, resize="stretch")


@pytest.fixture(scope="module")
def new_images(tmp_path_factory) -> Path:
    """Four classes named as no model output is (the toy backbone answers ten others)."""
    root = make_image_folder(tmp_path_factory.mktemp("new"), classes=4, per_class=30, seed=3)
    for k, name in enumerate(["accordion", "bonsai", "cougar", "dalmatian"]):
        (root / f"class{k}").rename(root / name)
    return root


def _convert(args: list[str]) -> object:
    return CliRunner().invoke(cli, ["convert", f"{MODELS}:pretrained_toy", *args], catch_exceptions=False)


def _refused(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(["convert", f"{MODELS}:pretrained_toy", *args])
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_classes_that_are_not_the_models_outputs_are_refused_naming_the_flag(tmp_path, new_images, capsys):
    out = tmp_path / "never.swb"
    err = _refused(["--exits", "layer1", "--data", str(new_images), "--out", str(out)], capsys)
    assert "--new-classes" in err and "4 classes" in err and "answers 10" in err
    assert not out.exists()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, new_images) -> dict[str, Path]:
    """The new-class bundle with an exit after layer1, and without exits (the last-layer classifier)."""
    made = {}
    for name, exits in (("early", ["--exits", "layer1"]), ("last", [])):
        out = tmp_path_factory.mktemp("bundles") / f"{name}.swb"
        result = _convert([*exits, "--new-classes", "--data", str(new_images), "--out", str(out), "--target-drop", "2"])
        assert result.exit_code == 0, result.output
        made[name] = out
    return made


@pytest.mark.parametrize("name", ["early", "last"])
def test_every_stage_answers_the_folder_classes(bundles, new_images, name):
    out, exits = bundles[name], name == "early"
    manifest = read_bundle(out).manifest
    assert list(manifest.task.classes) == ["accordion", "bonsai", "cougar", "dalmatian"]
    assert len(manifest.stages) == (2 if exits else 1)
    final = manifest.stages[-1].head
    assert final["after"] == "pool" and final["classes"] == "new"  # the penultimate (pooled) features
    images = open_image_set(new_images)
    sample = images.take_per_class(3, seed=1)
    with load(out) as cascade:
        logits = cascade.stage_logits([sample.image(i) for i in range(len(sample))])
        assert [z.shape[1] for z in logits] == [4] * len(manifest.stages)
        for z in logits:  # the colour task is easy: every stage knows the new classes
            assert (z.argmax(1) == sample.targets).mean() >= 0.9
        answer = cascade.predict(sample.image(0), operating_point="full")
        assert answer.name == "accordion"


def test_bench_puts_a_reference_bundle_beside_the_bundle(bundles, new_images, tmp_path):
    result = CliRunner().invoke(cli, ["bench", str(bundles["early"]), "--data", str(new_images), "--limit", "12",
                                      "--reference", str(bundles["last"]), "--json", str(tmp_path / "b.json")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    reference = next(r for r in rows if r["kind"] == "reference")
    assert reference["name"] == "last" and reference["n"] == 12 and reference["exit_histogram"] == [12]
    assert all("speedup_vs_equal_accuracy_single" in r or "more_accurate_than_every_single" in r
               for r in rows if r["kind"] == "operating_point")


def test_round_robin_rotates_the_order():
    from stagewise.runtimes.bench import round_robin

    calls = []
    round_robin({name: (lambda image, name=name: calls.append(name)) for name in "abc"}, [0, 1, 2])
    assert calls == list("abc" "bca" "cab")


def test_python_and_toml_take_new_classes_and_savchenko_heads(tmp_path, new_images):
    out = convert(pretrained_toy(), out=tmp_path / "py.swb", data=new_images, exits=["layer1"], new_classes=True,
                  head="savchenko", target_drop=2.0, cache=tmp_path / "cache", device="cpu")
    heads = [s.head for s in read_bundle(out).manifest.stages]
    assert [h["classifier"] for h in heads] == ["linear_svm_squared_hinge"] * 2
    assert any((tmp_path / "cache").glob("*.npz"))
    config = tmp_path / "job.toml"
    config.write_text(f'model = "{MODELS}:pretrained_toy"\nexits = ["layer1"]\nnew_classes = true\n'
                      f'data = "{new_images}"\nout = "toml.swb"\ncache = "cache"\n[build]\ntarget_drop = 2.0\n')
    result = CliRunner().invoke(cli, ["convert", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "the backbone ran on 0 images" in result.output  # every feature came from the Python run's cache
    assert list(read_bundle(tmp_path / "toml.swb").manifest.task.classes)[0] == "accordion"


def test_automatic_placement_with_new_classes(tmp_path, new_images):
    out = tmp_path / "auto.swb"
    result = _convert(["--exits", "auto:1", "--new-classes", "--data", str(new_images), "--out", str(out),
                       "--target-drop", "2"])
    assert result.exit_code == 0, result.output
    manifest = read_bundle(out).manifest
    placement = manifest.stages[0].head["placement"]
    assert all(c["macs"] > 0 for c in placement["candidates"])
    assert manifest.stages[-1].head["after"] == "pool" and len(manifest.task.classes) == 4


def test_features_are_extracted_once_for_all_cuts_and_cached(tmp_path, new_images):
    images = open_image_set(new_images)
    model = pretrained_toy()
    store = FeatureStore(TorchSource(), model, PRE, (16, 16), cache=tmp_path)
    both = store.features(["layer1", "pool"], images)
    assert store.computed == len(images)
    assert store.features(["layer1"], images)["layer1"] is not None and store.computed == len(images)
    again = FeatureStore(TorchSource(), model, PRE, (16, 16), cache=tmp_path)
    reread = again.features(["layer1", "pool"], images)
    assert again.computed == 0
    np.testing.assert_array_equal(reread["pool"], both["pool"])
    expected = model.pool(model.layer2(model.down(model.layer1(model.stem(
        torch.from_numpy(PRE.tensor([images.image(0)], (16, 16))))))))
    np.testing.assert_allclose(both["pool"][0], expected.flatten().detach().numpy(), rtol=1e-5, atol=1e-6)


def test_feature_cut_is_the_classifiers_input():
    model = pretrained_toy()
    assert feature_cut(TorchSource(), model, (16, 16)) == "pool"


def test_functional_convolutions_are_counted():
    """Convolutions called through F.conv2d (EfficientNet-Lite's same-padding layers) count in cuts and segments."""
    points = {c.name: c.macs for c in cut_points(functional_net(), 16)}
    stem = 16 * 16 * 8 * 3 * 9
    block = 8 * 8 * 16 * 8 * 9
    assert points["stem"] == stem and points["block"] == stem + block
    first, rest = split_model(functional_net(), ["stem"])
    assert count_macs(first, torch.zeros(1, 3, 16, 16)) == stem
    assert count_macs(rest, torch.zeros(1, 8, 16, 16)) == block + 16 * 5


def test_attention_is_counted():
    class Attention(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.scaled_dot_product_attention(x, x, x)

    # two products of 10 x 10 x 16 per head
    assert count_macs(Attention(), torch.zeros(1, 4, 10, 16)) == 2 * 4 * 10 * 10 * 16


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the refusal where CUDA is absent; this machine has CUDA")
def test_cuda_is_refused_clearly_where_absent(tmp_path, new_images, capsys):
    with pytest.raises(ConversionError, match="sees no CUDA GPU; use --device cpu"):
        resolve_device("cuda")
    err = _refused(["--new-classes", "--device", "cuda", "--data", str(new_images), "--out", str(tmp_path / "x")],
                   capsys)
    assert "no CUDA GPU" in err and not (tmp_path / "x").exists()


def test_device_names_are_checked():
    with pytest.raises(ConversionError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    assert resolve_device("cpu") == "cpu"


def test_progress_lines_when_not_a_terminal(tmp_path, new_images, capsys, monkeypatch):
    monkeypatch.delenv("STAGEWISE_QUIET", raising=False)
    images = open_image_set(new_images)
    FeatureStore(TorchSource(), pretrained_toy(), PRE, (16, 16), batch=16).features(["layer1"], images)
    err = capsys.readouterr().err
    assert "backbone features of 120 images at 1 cuts: started (8 steps)" in err and ": done in" in err


def test_a_keras_backbone_takes_new_classes(tmp_path, new_images):
    pytest.importorskip("keras")
    from keras_toy_models import residual_net

    with pytest.raises(ConversionError, match="--new-classes"):
        convert(residual_net(), out=tmp_path / "never.swb", data=new_images, exits=["block1_out"])
    out = convert(residual_net(), out=tmp_path / "keras.swb", data=new_images, exits=["block1_out"], new_classes=True,
                  target_drop=2.0)
    manifest = read_bundle(out).manifest
    assert list(manifest.task.classes) == ["accordion", "bonsai", "cougar", "dalmatian"]
    assert [s.head["after"] for s in manifest.stages][0] == "block1_out" and len(manifest.stages) == 2
    images = open_image_set(new_images).take_per_class(3, seed=1)
    with load(out) as cascade:
        logits = cascade.stage_logits([images.image(i) for i in range(len(images))])
    assert [z.shape[1] for z in logits] == [4, 4]
    assert all((z.argmax(1) == images.targets).mean() >= 0.9 for z in logits)
