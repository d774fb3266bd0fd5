"""Keras source models: cuts at named layers, exit heads, cascades, and Keras -> TFLite / ONNX / OpenVINO.

TensorFlow is slow to import, so everything Keras lives in this one module with module-scoped
fixtures; each bundle is built once and checked by several tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("ai_edge_litert")

import keras_toy_models as toys  # noqa: E402
import tensorflow as tf  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import stagewise  # noqa: E402
from stagewise.cli import cli  # noqa: E402
from stagewise.converters.build import build_bundle  # noqa: E402
from stagewise.converters.export import StageInputs, export_stage, exporter  # noqa: E402
from stagewise.converters.heads import HeadTraining  # noqa: E402
from stagewise.converters.keras_source import (count_macs, keras, logits_model, run_model,  # noqa: E402
                                               split_model, valid_cut_points)
from stagewise.converters.options import BuildOptions  # noqa: E402
from stagewise.converters.plans import cascade_plans, early_exit_plans  # noqa: E402
from stagewise.converters.tflite_export import describe  # noqa: E402
from stagewise.datasets import open_image_set  # noqa: E402
from stagewise.errors import InvalidCutPointError  # noqa: E402
from stagewise.images import Preprocess  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

PRE = Preprocess(mean=(128, 128, 128), std=(64, 64, 64), layout="NHWC", resize="stretch", crop_fraction=1.0)
FAST_HEADS = HeadTraining(max_iter=100)
QUICK = dict(quantization_images=32, profile_images=3, threads=1)
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def splits(image_folder):
    return open_image_set(image_folder).split([0.5, 0.5], seed=0)


@pytest.fixture(scope="module")
def cli_bundle(tmp_path_factory, image_folder):
    """fp32 TFLite bundle of the toy Keras net with Savchenko heads, through ``stagewise convert``."""
    out = tmp_path_factory.mktemp("keras") / "toy.swb"
    result = CliRunner().invoke(cli, [
        "convert", str(HERE / "keras_toy_models.py") + ":factory", "--exits", "block1_out", "--head", "savchenko",
        "--backend", "tflite", "--data", str(image_folder), "--calibration-data", str(image_folder),
        "--out", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


@pytest.fixture(scope="module")
def multi_bundle(tmp_path_factory, splits):
    """INT8 bundle of the toy Keras net with TFLite (int8 I/O), ONNX and OpenVINO artifacts.

    Float input: integer-only TFLite (int8 in and out, no float op) needs it; with pixel input the
    model's first ops (cast, per-channel scale and offset) run in float before a QUANTIZE.
    """
    train, calib = splits
    plans = early_exit_plans(toys.residual_net(), ["block1_out"], PRE, (16, 16), train, FAST_HEADS)
    out = tmp_path_factory.mktemp("keras") / "multi"
    return build_bundle(out, "multi", plans, PRE, train.classes, calib,
                        BuildOptions(formats=("tflite", "onnx", "openvino"), int8=True, int8_io=True,
                                     int8_tolerance=0.0, pixel_input=False, **QUICK))


def test_cut_points_follow_the_layer_graph():
    model = toys.residual_net()
    valid = valid_cut_points(model)
    assert {"stem", "block1_out", "down", "block2_out", "pool"} <= set(valid)
    assert not {"block1_conv1", "block1_bn", "block2_dw", "predictions"} & set(valid)  # inside a residual, or the end
    with pytest.raises(InvalidCutPointError, match="block1_out, down"):
        split_model(model, ["block1_conv2"])
    with pytest.raises(InvalidCutPointError, match="no layer named"):
        split_model(model, ["nope"])
    logits = logits_model(model)
    x = np.random.default_rng(0).standard_normal((4, 16, 16, 3)).astype(np.float32)
    segments = split_model(logits, ["block1_out", "block2_out"])
    y = x
    for seg in segments:
        y = run_model(seg, y)[0]
    np.testing.assert_allclose(y, run_model(logits, x)[0], atol=1e-5)
    np.testing.assert_allclose(tf.nn.softmax(y).numpy(), run_model(model, x)[0], atol=1e-5)  # same weights, no softmax
    assert count_macs(logits) == (16 * 16 * 8 * 27 + 2 * 16 * 16 * 8 * 72 + 8 * 8 * 16 * 72 + 8 * 8 * 16 * 9
                                  + 8 * 8 * 16 * 16 + 16 * 3)


def test_keras_bundle_on_litert_agrees_with_keras(cli_bundle, image_folder):
    images = open_image_set(image_folder)
    pictures = [images.image(i) for i in range(len(images))]
    with stagewise.load(cli_bundle, runtime="litert", threads=1) as cascade:
        m = cascade.bundle.manifest
        assert m.producer["source_framework"] == "keras" and m.input.layout == "NHWC"
        assert m.stages[0].head["kind"] == "savchenko" and m.stages[0].head["after"] == "block1_out"
        assert all(s.artifacts["tflite"].precision == "fp32" for s in m.stages)
        got = cascade.stage_logits(pictures, batch_size=32)
        heads = [s.head for s in m.stages]
    # the same Keras stages, rebuilt through the API with the CLI's settings (heads trained on all the images)
    model = toys.factory()
    plans = early_exit_plans(model, ["block1_out"], PRE, (16, 16), images, HeadTraining(kind="savchenko"))
    assert plans[0].head["train_accuracy"] == pytest.approx(heads[0]["train_accuracy"])
    x = PRE.tensor(pictures, (16, 16))
    carry, exit_logits = run_model(plans[0].module, x)
    final_logits = run_model(plans[1].module, carry)[0]
    for lite, ref in zip(got, (exit_logits, final_logits)):
        assert np.mean(lite.argmax(1) == ref.argmax(1)) >= 0.995
        np.testing.assert_allclose(lite, ref, atol=1e-4)


def test_keras_int8_io_tflite_honours_quantization(multi_bundle, splits):
    with stagewise.load(multi_bundle, runtime="litert", threads=1) as cascade:
        stages = cascade.bundle.manifest.stages
        for k, stage in enumerate(stages):
            art = stage.artifacts["tflite"]
            assert art.precision == "int8" and art.quantization["io"] == "int8"
            info = describe(cascade.bundle.artifact_paths(k, "tflite")[0])
            assert {dtype for _, dtype in info["inputs"] + info["outputs"]} == {"int8"}
            assert "DEQUANTIZE" not in info["ops"] and "QUANTIZE" not in info["ops"]  # full integer
            assert cascade._stages[k].session.quantization == art.quantization["io_quantization"]
        x = PRE.tensor([splits[1].image(i) for i in range(8)], (16, 16))
        out = cascade._stages[0].session.run(x)
    q = stages[0].artifacts["tflite"].quantization["io_quantization"]
    # dequantized outputs lie on the model's own grid: scale * (integer - zero point)
    for name in ("carry", "logits"):
        steps = out[name] / q[name]["scale"] + q[name]["zero_point"]
        np.testing.assert_allclose(steps, np.rint(steps), atol=1e-3)
        assert steps.min() >= -128 - 1e-3 and steps.max() <= 127 + 1e-3


def test_keras_bundle_carries_onnx_and_openvino(multi_bundle, splits):
    images = [splits[1].image(i) for i in range(len(splits[1]))]
    manifest = json.loads((multi_bundle / "manifest.json").read_text())
    for stage in manifest["stages"]:
        for fmt in ("tflite", "onnx", "openvino"):
            art = stage["artifacts"][fmt]
            assert max(art["verification"]["max_abs_diff"].values()) < 1e-3  # the float model vs Keras
            assert 0.0 <= art["quantization"]["agreement_with_fp32"] <= 1.0
        assert stage["artifacts"]["onnx"]["verification"]["conversion"]["tool"] == "tf2onnx.convert.from_function"
        assert stage["artifacts"]["openvino"]["verification"]["conversion"]["route"] == "native"
    labels = {}
    for backend in ("litert", "onnxruntime", "openvino"):
        with stagewise.load(multi_bundle, runtime=backend, threads=1) as cascade:
            labels[backend] = np.array([p.label for p in cascade.predict_batch(images, operating_point="full")])
    # three independent INT8 quantizers of the same stages still mostly agree
    assert np.mean(labels["litert"] == labels["onnxruntime"]) >= 0.8
    assert np.mean(labels["litert"] == labels["openvino"]) >= 0.8


@pytest.mark.parametrize("name, build, cut", [
    ("MobileNetV2", lambda: keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None,
                                                           classes=5), "block_2_add"),
    ("ResNet50", lambda: keras.applications.ResNet50(input_shape=(32, 32, 3), weights=None, classes=5),
     "conv2_block3_out"),
    ("EfficientNetB0", lambda: keras.applications.EfficientNetB0(input_shape=(32, 32, 3), weights=None, classes=5),
     "block2b_add"),
])
def test_keras_applications_cut_and_convert(tmp_path, splits, name, build, cut):
    keras.utils.set_random_seed(0)
    model = build()
    assert cut in valid_cut_points(model)
    pre = Preprocess(mean=(127.5,) * 3, std=(127.5,) * 3, layout="NHWC", resize="stretch", crop_fraction=1.0)
    train = splits[0].subset(range(24))
    plans = early_exit_plans(model, [cut], pre, (32, 32), train, HeadTraining(max_iter=20))
    assert plans[0].macs > 0 and plans[1].macs > plans[0].macs
    x = pre.tensor([splits[1].image(i) for i in range(8)], (32, 32))
    carry, _ = run_model(plans[0].module, x)
    np.testing.assert_allclose(run_model(plans[1].module, carry)[0], run_model(logits_model(model), x)[0],
                               rtol=1e-4, atol=1e-4)
    artifact, files, _ = export_stage(exporter("tflite"), plans[0], tmp_path, StageInputs(x, x, x), BuildOptions(threads=1))
    assert artifact["verification"]["top1_agreement"] == 1.0
    assert set(files) == {"tflite/exit0.tflite"}


def test_keras_resolution_cascade_fp16(tmp_path, splits):
    train, calib = splits
    plans = cascade_plans([("small", toys.small_cnn(), (8, 8)), ("large", toys.small_cnn(), (16, 16))],
                          combine="mean_probs")
    dense = 6 * 3
    assert plans[1].macs - dense == 4 * (plans[0].macs - dense)  # the convolution sees 4x the pixels
    out = build_bundle(tmp_path / "c", "c", plans, PRE, calib.classes, calib,
                       BuildOptions(formats=("tflite",), fp16=True, **QUICK))
    with stagewise.load(out, runtime="litert", threads=1) as cascade:
        m = cascade.bundle.manifest
        assert [s.input.size for s in m.stages] == [(8, 8), (16, 16)]
        art = m.stages[1].artifacts["tflite"]
        assert art.precision == "fp16" and art.verification["fp16"]["weights"] == "fp16"
        shapes = []
        runners = cascade._acquire()  # the warmed-up runners the next request takes
        for runner in runners:
            original = runner.run
            runner.run = lambda x, *a, original=original: (shapes.append(x.shape), original(x, *a))[1]
        cascade._release(runners)
        cascade.predict(calib.image(0), operating_point="full")
    assert shapes == [(1, 8, 8, 3), (1, 16, 16, 3)]


BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"No module named {name!r} (blocked: a Keras user has no torch)", name=name)
sys.meta_path.insert(0, _NoTorch())
"""


def test_keras_conversion_imports_no_torch(tmp_path, image_folder):
    """`stagewise convert` of a Keras model, loading and predicting, all with torch unimportable."""
    out = tmp_path / "k.swb"
    code = BLOCK_TORCH + f"""
import json
from click.testing import CliRunner
from stagewise.cli import cli
result = CliRunner().invoke(cli, ["convert", {str(HERE / "keras_toy_models.py") + ":factory"!r}, "--exits",
                                  "block1_out", "--format", "onnx", "--data", {str(image_folder)!r}, "--out", {str(out)!r},
                                  "--threads", "1"])
assert result.exit_code == 0, result.output + repr(result.exception)
import stagewise
with stagewise.load({str(out)!r}, threads=1) as cascade:
    p = cascade.predict(next(iter(__import__("pathlib").Path({str(image_folder)!r}).rglob("*.png"))))
print(json.dumps({{"torch": "torch" in sys.modules, "stage": p.stage_index, "label": p.label}}))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    answer = json.loads(run.stdout.strip().splitlines()[-1])
    assert answer["torch"] is False and answer["label"] in (0, 1, 2)


def test_torch_model_without_torch_installed_is_a_clear_error(tmp_path, image_folder):
    code = BLOCK_TORCH + """
from stagewise.converters.source import source_named
from stagewise.errors import MissingExtraError
try:
    source_named("torch")
except MissingExtraError as exc:
    print(exc)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert 'pip install "stagewise[torch]"' in run.stdout
