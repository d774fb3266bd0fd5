"""LiteRT runtime and torch -> TFLite conversion: agreement with torch, INT8 I/O quantization, integrity."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")
pytest.importorskip("litert_torch")

import torch  # noqa: E402

import stagewise  # noqa: E402
from stagewise.converters.build import build_bundle  # noqa: E402
from stagewise.converters.options import BuildOptions  # noqa: E402
from stagewise.converters.heads import HeadTraining  # noqa: E402
from stagewise.converters.plans import early_exit_plans  # noqa: E402
from stagewise.datasets import open_image_set  # noqa: E402
from stagewise.errors import BundleError, DeviceUnavailableError, IntegrityError  # noqa: E402
from stagewise.images import Preprocess  # noqa: E402
from stagewise.runtimes.base import RUNTIMES, LoadOptions, StageIO  # noqa: E402
from stagewise.runtimes.litert_adapter import LiteRTStage, open_stage  # noqa: E402
from toy_models import residual_net  # noqa: E402

PRE = Preprocess(mean=(128, 128, 128), std=(64, 64, 64), resize="stretch", crop_fraction=1.0)
FAST_HEADS = HeadTraining(max_iter=100)
QUICK = dict(quantization_images=32, profile_images=3, threads=1)


@pytest.fixture(scope="module")
def splits(image_folder):
    return open_image_set(image_folder).split([0.5, 0.5], seed=0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return residual_net()


@pytest.fixture(scope="module")
def plans(splits, model):
    return early_exit_plans(model, ["layer1"], PRE, (16, 16), splits[0], FAST_HEADS)


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory, splits, plans):
    train, calib = splits
    out = tmp_path_factory.mktemp("litert") / "toy"
    return build_bundle(out, "toy", plans, PRE, train.classes, calib, BuildOptions(formats=("tflite",), **QUICK))


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, splits, plans):
    train, calib = splits
    out = tmp_path_factory.mktemp("litert") / "toy-int8"
    # float input (the format before pixel input): the int8 input's own quantization parameters are exercised
    return build_bundle(out, "toy", plans, PRE, train.classes, calib,
                        BuildOptions(formats=("tflite",), int8=True, int8_io=True, int8_tolerance=0.0, pixel_input=False,
                                     **QUICK))


def test_torch_bundle_on_litert_agrees_with_torch(fp32_bundle, plans, image_folder):
    images = open_image_set(image_folder)
    pictures = [images.image(i) for i in range(len(images))]
    with stagewise.load(fp32_bundle, runtime="litert", threads=1) as cascade:
        m = cascade.bundle.manifest
        assert m.producer["source_framework"] == "torch"
        assert [s.artifacts["tflite"].files[0].path for s in m.stages] == ["tflite/exit0.tflite", "tflite/final.tflite"]
        assert all(s.artifacts["tflite"].precision == "fp32" for s in m.stages)
        assert all(s.cost.latency("litert-cpu-1t").p50 > 0 for s in m.stages)
        logits = cascade.stage_logits(pictures, batch_size=32)  # batches of 32 and a remainder
        single = cascade.predict_stage(pictures[0], 1)
    with torch.no_grad():
        x = torch.from_numpy(PRE.tensor(pictures, (16, 16)))
        carry, exit_logits = plans[0].module(x)
        final_logits = plans[1].module(carry)
    for got, want in zip(logits, (exit_logits.numpy(), final_logits.numpy())):
        assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.995
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert single.label == int(final_logits[0].argmax())  # batch 1 after batches of 32: the interpreter resized back


def test_batch_equals_single_on_litert(fp32_bundle, splits):
    images = [splits[1].image(i) for i in range(len(splits[1]))]
    with stagewise.load(fp32_bundle, runtime="litert", threads=1) as cascade:
        cascade.use("drop-2pt")
        single = [cascade.predict(im) for im in images]
        batch = cascade.predict_batch(images)
    assert [(p.label, p.stage_index) for p in batch] == [(p.label, p.stage_index) for p in single]


def test_int8_io_quantization_parameters_are_honoured(int8_bundle, splits):
    with stagewise.load(int8_bundle, runtime="litert", threads=1) as cascade:
        m = cascade.bundle.manifest
        path = cascade.bundle.artifact_paths(0, "tflite")[0]
        record = m.stages[0].artifacts["tflite"]
        assert record.precision == "int8" and record.quantization["io"] == "int8"
        stage = cascade._stages[0].session
        x = PRE.tensor([splits[1].image(i) for i in range(6)], (16, 16))
        got = stage.run(x)
    interp = __import__("ai_edge_litert.interpreter", fromlist=["Interpreter"]).Interpreter(model_path=str(path))
    runner = interp.get_signature_runner("serving_default")
    ind, outd = runner.get_input_details()["image"], runner.get_output_details()
    assert ind["dtype"] == np.int8
    scale, zero = ind["quantization_parameters"]["scales"][0], ind["quantization_parameters"]["zero_points"][0]
    assert dict(record.quantization["io_quantization"]["input"]) == pytest.approx(
        {"dtype": "int8", "scale": float(scale), "zero_point": int(zero)})
    for row in range(len(x)):
        q = np.clip(np.rint(x[row:row + 1] / scale) + zero, -128, 127).astype(np.int8)
        raw = runner(image=q)
        for name in ("carry", "logits"):
            params = outd[name]["quantization_parameters"]
            assert raw[name].dtype == np.int8
            want = (raw[name].astype(np.float32) - params["zero_points"][0]) * params["scales"][0]
            np.testing.assert_allclose(got[name][row:row + 1], want, rtol=1e-6, atol=1e-7)
    # feeding the float tensor without its scale/zero point would give another answer
    naive = runner(image=np.clip(np.rint(x[:1]), -128, 127).astype(np.int8))["logits"].astype(np.float32)
    assert not np.allclose(naive, got["logits"][:1])


def test_tampered_tflite_is_refused(fp32_bundle, tmp_path):
    copy = tmp_path / "tampered"
    shutil.copytree(fp32_bundle, copy)
    victim = copy / "tflite" / "final.tflite"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="final.tflite"):
        stagewise.load(copy, runtime="litert")


def test_garbage_tflite_is_a_bundle_error(tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"TFL3" + bytes(200))
    with pytest.raises(BundleError, match="cannot load"):
        open_stage([bad], StageIO("image", ("logits",)), LoadOptions(threads=1))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # LiteRT's Delegate.__del__ after a failed load
def test_load_options(fp32_bundle):
    path = fp32_bundle / "tflite" / "exit0.tflite"
    io = StageIO("image", ("carry", "logits"))
    x = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)
    xnn = LiteRTStage(path, io, LoadOptions(threads=2)).run(x)
    plain_stage = LiteRTStage(path, io, LoadOptions(threads=1, extra={"xnnpack": False}))
    rows_stage = LiteRTStage(path, io, LoadOptions(threads=1, extra={"batch": "rows"}))
    assert not plain_stage.xnnpack and rows_stage.fixed_batch == 1
    for other in (plain_stage.run(x), rows_stage.run(x)):
        for name in io.outputs:
            np.testing.assert_allclose(other[name], xnn[name], atol=1e-5)
    with pytest.raises(BundleError, match="no output tensor named 'features'"):
        LiteRTStage(path, StageIO("image", ("features",)), LoadOptions())
    with pytest.raises(DeviceUnavailableError, match="delegate"):
        LiteRTStage(path, io, LoadOptions(device="NPU"))
    with pytest.raises(DeviceUnavailableError, match="cannot load the LiteRT delegate"):
        LiteRTStage(path, io, LoadOptions(device="NPU", extra={"delegates": ["/nonexistent/libdelegate.so"]}))


def test_tflite_runtime_counts_as_installed():
    assert "tflite_runtime" in RUNTIMES["litert"].alternatives
    assert RUNTIMES["litert"].installed()


def test_device_side_imports_only_the_interpreter(fp32_bundle):
    code = ("import json, sys, stagewise\n"
            f"c = stagewise.load({str(fp32_bundle)!r}, runtime='litert', threads=1)\n"
            "c.predict(__import__('numpy').zeros((16, 16, 3), 'uint8'))\n"
            "print(json.dumps(sorted(sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout.splitlines()[-1])
    heavy = {m.split(".")[0] for m in loaded} & {"torch", "tensorflow", "keras", "jax", "litert_torch", "onnx"}
    assert heavy == set()
    assert "ai_edge_litert" in {m.split(".")[0] for m in loaded}


def test_build_pipeline_imports_no_torch():
    code = ("import json, sys, stagewise.converters.build, stagewise.converters.tflite_export\n"
            "print(json.dumps(sorted(sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout.splitlines()[-1])
    assert "torch" not in loaded and "tensorflow" not in loaded


def test_mixed_int8_leaves_the_fragile_tensors_in_float(tmp_path):
    from stagewise.converters.export import StageInputs, export_stage, exporter
    from stagewise.converters.plans import cascade_plans
    from toy_models import fragile_net

    x = np.random.default_rng(0).normal(0, 1, (400, 3, 16, 16)).astype(np.float32)
    plan, inputs = cascade_plans([("only", fragile_net(), (16, 16))])[0], StageInputs(x[:16], x[:100], x[100:])
    whole, _, _ = export_stage(exporter("tflite"), plan, tmp_path / "whole", inputs,
                            BuildOptions(formats=("tflite",), int8=True, int8_mixed=False, int8_tolerance=0.85))
    assert whole["precision"] == "fp32" and whole["quantization"]["agreement_with_fp32"] < 0.6
    mixed, files, _ = export_stage(exporter("tflite"), plan, tmp_path / "mixed", inputs,
                                BuildOptions(formats=("tflite",), int8=True, int8_tolerance=0.85))
    q = mixed["quantization"]
    assert mixed["precision"] == "int8" and q["kept_fp32"] is False, q
    assert 1 <= len(q["float_layers"]) <= 4 and q["agreement_interval"][0] >= 0.85
    assert any(name.endswith("Conv2d_amp;1") for name in q["float_layers"])  # the layer that wrecks the scale
    from stagewise.converters.tflite_export import describe

    ops = describe(files["tflite/only.tflite"])["ops"]
    assert ops.get("QUANTIZE", 0) >= 1 and ops.get("DEQUANTIZE", 0) >= 1  # the rest is still INT8


def test_mixed_int8_search_that_cannot_meet_the_tolerance_ends_with_int16_activations_tried(tmp_path):
    from stagewise.converters.export import StageInputs, exporter
    from stagewise.converters.int8_gate import Verdict
    from stagewise.converters.plans import cascade_plans
    from stagewise.converters.tflite_export import weighted_units
    from toy_models import fragile_net

    x = np.random.default_rng(0).normal(0, 1, (200, 3, 16, 16)).astype(np.float32)
    plan, inputs = cascade_plans([("only", fragile_net(), (16, 16))])[0], StageInputs(x[:16], x[:100], x[100:])
    tfl = exporter("tflite")
    options = BuildOptions(formats=("tflite",), int8=True)
    fp32 = tfl.export(plan, tmp_path, inputs, options)
    result = tfl.quantize_mixed(plan, fp32, tmp_path, inputs, options, lambda candidate: Verdict(False, 0.0, "refused", {"agreement_with_fp32": 0.0}))
    search, units = result.record["search"], weighted_units(fp32.files[0])
    assert [t["recipe"] for t in (search[0], search[-1])] == ["int8", "int8 weights, int16 activations"]
    assert len(result.record["ranking"]) == len(units) and result.record["float_layers"] == []
    mixed = [t["float_layers"] for t in search[1:-1]]
    assert mixed and all(mixed) and len({u[0] for u in units} & set(mixed[-1])) == len(units) - 1
    assert set(search[-1]["host_latency_ms"]) == {"float", "int8"} and search[-1]["host_speedup"] > 0
