"""OpenVINO: IR export (fp32, fp16, NNCF INT8, NPU preset), the runtime adapter, and agreement with ONNX Runtime."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

import openvino as ov  # noqa: E402

import stagewise  # noqa: E402
from stagewise.bundle import read_bundle  # noqa: E402
from stagewise.manifest import Manifest  # noqa: E402
from stagewise.converters.build import build_bundle, stage_inputs  # noqa: E402
from stagewise.converters import ConversionRequest  # noqa: E402
from stagewise.converters.heads import HeadTraining  # noqa: E402
from stagewise.converters.export import StageInputs, export_stage, exporter  # noqa: E402
from stagewise.converters.openvino_export import check_npu_constraints, ir_inputs_static  # noqa: E402
from stagewise.converters.options import BuildOptions  # noqa: E402
from stagewise.converters.plans import cascade_plans, early_exit_plans  # noqa: E402
from stagewise.datasets import open_image_set  # noqa: E402
from stagewise.errors import (  # noqa: E402
    BackendUnavailableError, BundleError, ConversionError, DeviceUnavailableError, IntegrityError)
from stagewise.images import Preprocess  # noqa: E402
from stagewise.runtimes import openvino_adapter  # noqa: E402
from stagewise.runtimes.base import LoadOptions, StageIO  # noqa: E402
from stagewise.runtimes.executor import stage_io  # noqa: E402
from toy_models import residual_net  # noqa: E402

PRE = Preprocess(mean=(128, 128, 128), std=(64, 64, 64), resize="stretch", crop_fraction=1.0)
FAST_HEADS = HeadTraining(max_iter=100)
QUICK = dict(profile_images=3, quantization_images=32)


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Keep OpenVINO's compiled-model cache out of the user's home during the tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STAGEWISE_CACHE_DIR", str(tmp_path_factory.mktemp("sw-cache")))
        mp.setenv("CI", "true")  # openvino.convert_model's usage telemetry stays off in CI (as in .ci/run)
        mp.delenv("STAGEWISE_PREFER", raising=False)
        yield


@pytest.fixture(scope="module")
def splits(image_folder):
    return open_image_set(image_folder).split([0.5, 0.5], seed=0)


@pytest.fixture(scope="module")
def images(splits):
    calib = splits[1]
    return [calib.image(i) for i in range(len(calib))]


@pytest.fixture(scope="module")
def ee_plans(splits):
    # two cuts: the middle stage reads a carry and writes one (distinct tensor names needed)
    return early_exit_plans(residual_net(), ["layer1", "down"], PRE, (16, 16), splits[0], FAST_HEADS)


class SizeProbe(torch.nn.Module):
    def __init__(self, width: int, classes: int = 3):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, width, 3, padding=1)
        self.fc = torch.nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def ee_bundle(tmp_path_factory, splits, ee_plans):
    out = tmp_path_factory.mktemp("ov") / "ee"
    return build_bundle(out, "ee", ee_plans, PRE, splits[0].classes, splits[1],
                        BuildOptions(formats=("onnx", "openvino"), **QUICK))


@pytest.fixture(scope="module")
def cascade_bundle(tmp_path_factory, splits):
    torch.manual_seed(0)
    plans = cascade_plans([("small", SizeProbe(4), (8, 8)), ("large", SizeProbe(8), (16, 12))], combine="mean_probs")
    out = tmp_path_factory.mktemp("ov") / "cascade.swb"
    return build_bundle(out, "cascade", plans, PRE, splits[1].classes, splits[1],
                        BuildOptions(formats=("onnx", "openvino"), **QUICK), kind="cascade")


@pytest.fixture(scope="module")
def npu_bundle(tmp_path_factory, splits, ee_plans):
    out = tmp_path_factory.mktemp("ov") / "npu"
    return build_bundle(out, "npu", ee_plans, PRE, splits[0].classes, splits[1],
                        BuildOptions(formats=("openvino", "onnx"), int8=True, int8_tolerance=0.5, npu=True, **QUICK))


def _decisions(cascade, images, point):
    preds = cascade.predict_batch(images, operating_point=point)
    return [(p.label, p.stage_index) for p in preds], preds


@pytest.mark.parametrize("which", ["ee_bundle", "cascade_bundle"])
def test_openvino_agrees_with_onnxruntime(request, which, images):
    bundle = request.getfixturevalue(which)
    with stagewise.load(bundle, runtime="onnxruntime", threads=1) as ort_c, \
            stagewise.load(bundle, runtime="openvino", threads=1) as ov_c:
        assert ov_c.runtime == "openvino"
        for a, b in zip(ort_c.stage_logits(images), ov_c.stage_logits(images)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(a).max())))
            assert (a.argmax(1) == b.argmax(1)).all()
        for point in ort_c.operating_points:
            ort_d, ort_p = _decisions(ort_c, images, point)
            ov_d, _ = _decisions(ov_c, images, point)
            thresholds = ort_c._point(point).thresholds
            for (od, vd), p in zip(zip(ort_d, ov_d), ort_p):
                # a score within float noise of a threshold may fall either side; none should here
                near = any(r.threshold is not None and abs(r.score - r.threshold) < 1e-5 for r in p.trace)
                assert od == vd or near, (point, od, vd, thresholds)
        one_by_one = [(p.label, p.stage_index) for p in map(ov_c.predict, images)]
        assert one_by_one == _decisions(ov_c, images, ov_c.operating_point)[0]


def test_manifest_lists_xml_then_bin_with_verification(ee_bundle):
    m = json.loads((ee_bundle / "manifest.json").read_text())
    for stage in m["stages"]:
        art = stage["artifacts"]["openvino"]
        assert [f["path"] for f in art["files"]] == [f"openvino/{stage['name']}.xml", f"openvino/{stage['name']}.bin"]
        assert art["precision"] == "fp32"
        assert art["verification"]["top1_agreement"] == 1.0
        assert max(art["verification"]["max_abs_diff"].values()) < 1e-4
        assert art["verification"]["conversion"]["route"] == "onnx"  # the measured more faithful route
        assert "onnx" in stage["artifacts"]
    # the xml is dynamic in the batch, static elsewhere
    assert not ir_inputs_static(ee_bundle / "openvino" / "exit0.xml")


def test_unknown_device_lists_available_devices(ee_bundle):
    for device in ("NPU", "GPU.3", "AUTO:FPGA,CPU", "TPU"):
        with pytest.raises(DeviceUnavailableError) as err:
            stagewise.load(ee_bundle, runtime="openvino", device=device, warmup=False)
        message = str(err.value)
        assert "available devices: " in message and "CPU" in message.split("available devices: ")[1]


def test_device_names_resolve_like_openvino():
    openvino_adapter.check_device("GPU", ["CPU", "GPU.0", "GPU.1"])
    openvino_adapter.check_device("GPU.1", ["CPU", "GPU.0", "GPU.1"])
    openvino_adapter.check_device("AUTO", ["CPU"])
    openvino_adapter.check_device("AUTO:-GPU,CPU", ["CPU"])  # excluding an absent device is fine
    with pytest.raises(DeviceUnavailableError, match="'GPU.2'.*CPU, GPU.0"):
        openvino_adapter.check_device("GPU.2", ["CPU", "GPU.0"])
    with pytest.raises(DeviceUnavailableError, match="'NPU'"):
        openvino_adapter.check_device("HETERO:NPU,CPU", ["CPU"])


def _copy(bundle: Path, dest: Path) -> Path:
    shutil.copytree(bundle, dest)
    return dest


def _stage_files(bundle: Path, k: int = -1) -> tuple[list[Path], StageIO]:
    spec = Manifest.from_dict(json.loads((bundle / "manifest.json").read_text())).stages[k]
    return [bundle / f.path for f in spec.artifacts["openvino"].files], stage_io(spec)


def test_missing_bin_is_reported(tmp_path, ee_bundle):
    bundle = _copy(ee_bundle, tmp_path / "b")
    (bundle / "openvino" / "final.bin").unlink()
    with pytest.raises(IntegrityError, match="openvino/final.bin is missing"):
        stagewise.load(bundle, runtime="openvino")
    files, io = _stage_files(bundle)
    with pytest.raises(BundleError, match=r"weights \(\.bin\) file .*final\.bin is missing"):
        openvino_adapter.open_stage(files, io, LoadOptions(threads=1))
    with pytest.raises(BundleError, match=r"needs its \.xml and \.bin"):
        openvino_adapter.open_stage(files[:1], io, LoadOptions(threads=1))


def test_tampered_xml_is_reported(tmp_path, ee_bundle):
    bundle = _copy(ee_bundle, tmp_path / "b")
    xml = bundle / "openvino" / "final.xml"
    text = xml.read_text()
    xml.write_text(text[: len(text) // 2])
    with pytest.raises(IntegrityError, match="openvino/final.xml has sha256"):
        stagewise.load(bundle, runtime="openvino")
    files, io = _stage_files(bundle)
    with pytest.raises(BundleError, match="OpenVINO cannot read final.xml"):
        openvino_adapter.open_stage(files, io, LoadOptions(threads=1))
    # a well-formed IR whose outputs do not match the manifest is caught too
    xml.write_text(text.replace('names="logits"', 'names="scores"'))
    with pytest.raises(BundleError, match="no output named 'logits'"):
        openvino_adapter.open_stage(files, io, LoadOptions(threads=1))


def test_second_load_comes_from_the_content_keyed_cache(tmp_path, ee_bundle, npu_bundle, images):
    cache = tmp_path / "cache"
    opts = {"cache_dir": str(cache)}
    with stagewise.load(ee_bundle, runtime="openvino", threads=1, options=opts, warmup=False) as c:
        assert [s.session.loaded_from_cache for s in c._stages] == [False] * 3
    assert any(cache.iterdir())
    with stagewise.load(ee_bundle, runtime="openvino", threads=1, options=opts, warmup=False) as c:
        assert [s.session.loaded_from_cache for s in c._stages] == [True] * 3
        expected = c.stage_logits(images[:8])
    # other content at the same path must not be served from the cache (a path-keyed cache would)
    same_path = tmp_path / "bundle"
    _copy(npu_bundle, same_path)
    with stagewise.load(same_path, runtime="openvino", threads=1, options=opts, warmup=False) as c:
        assert [s.session.loaded_from_cache for s in c._stages] == [False] * 3
    shutil.rmtree(same_path)
    _copy(ee_bundle, same_path)
    with stagewise.load(same_path, runtime="openvino", threads=1, options=opts, warmup=False) as c:
        assert [s.session.loaded_from_cache for s in c._stages] == [True] * 3
        for a, b in zip(expected, c.stage_logits(images[:8])):
            np.testing.assert_array_equal(a, b)
    with stagewise.load(ee_bundle, runtime="openvino", threads=1, options={"cache_dir": False}, warmup=False) as c:
        assert "CACHE_DIR" not in c._stages[0].session.config


def test_cpu_runs_in_f32_with_latency_hint_and_threads(ee_bundle):
    files, io = _stage_files(ee_bundle, 0)
    stage = openvino_adapter.open_stage(files, io, LoadOptions(threads=1, device="cpu", extra={"cache_dir": False}))
    compiled = stage._compiled
    # OpenVINO's own default on CPUs with AVX512-BF16/AMX is bf16, which moves logits off the calibration
    assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32", "float32")
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert str(compiled.get_property("PERFORMANCE_HINT")).endswith("LATENCY")
    assert compiled.get_property("ENABLE_CPU_PINNING") is False
    assert stage.static_batch is None and stage.execution_devices == ["CPU"]
    rng = np.random.default_rng(0)
    first = stage.run(rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))  # pixel input: uint8 NHWC
    kept = {k: v.copy() for k, v in first.items()}
    second = stage.run(rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    assert all(np.array_equal(first[k], kept[k]) for k in kept)  # one reused request, but outputs are not aliased
    assert not np.array_equal(first["logits"], second["logits"])
    with pytest.raises(ValueError, match=r"expects \[-1, 16, 16, 3\]"):
        stage.run(np.zeros((1, 8, 8, 3), np.uint8))


def test_auto_device_configures_cpu_through_device_properties(ee_bundle, images):
    with stagewise.load(ee_bundle, runtime="openvino", device="AUTO", threads=1) as auto, \
            stagewise.load(ee_bundle, runtime="openvino", device="CPU", threads=1) as cpu:
        session = auto._stages[0].session
        assert session.config["DEVICE_PROPERTIES"]["CPU"] == {"INFERENCE_NUM_THREADS": 1, "ENABLE_CPU_PINNING": False,
                                                              "INFERENCE_PRECISION_HINT": "f32"}
        assert session.execution_devices == ["CPU"]
        for a, b in zip(auto.stage_logits(images[:16]), cpu.stage_logits(images[:16])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_npu_preset_is_static_and_runs_any_batch_on_cpu(npu_bundle, images):
    m = json.loads((npu_bundle / "manifest.json").read_text())
    for stage in m["stages"]:
        art = stage["artifacts"]["openvino"]
        xml = npu_bundle / art["files"][0]["path"]
        assert ir_inputs_static(xml)
        found = check_npu_constraints(xml)
        assert all(shape[0] == 1 and -1 not in shape for shape in found["shapes"].values())
        assert art["target"]["preset"] == "npu" and art["target"]["static_shapes"] is True
        q = art["quantization"]
        assert q["target_device"] == "NPU" and q["activations"].endswith("per-tensor") and q["per_channel"] is True
        assert art["precision"] == ("fp16" if q["kept_fp32"] else "int8")
        assert "onnx" in stage["artifacts"]  # the ONNX artifacts of the same bundle stay dynamic
    # calibrated on OpenVINO, the first format
    assert "openvino-cpu-1t" in m["stages"][0]["cost"]["latency_ms"]
    with stagewise.load(npu_bundle, runtime="openvino", threads=1) as c:
        assert [s.session.static_batch for s in c._stages] == [1] * 3
        batch = c.predict_batch(images)
        single = [c.predict(im) for im in images]
        assert [(p.label, p.stage_index) for p in batch] == [(p.label, p.stage_index) for p in single]
        logits = c.stage_logits(images[:5], batch_size=5)
        rows = np.concatenate([c.stage_logits([im])[2] for im in images[:5]])
        np.testing.assert_allclose(logits[2], rows, rtol=1e-6, atol=1e-6)


def test_static_shapes_option_matches_dynamic(ee_bundle, images):
    with stagewise.load(ee_bundle, runtime="openvino", threads=1, options={"static_shapes": True}) as static, \
            stagewise.load(ee_bundle, runtime="openvino", threads=1) as dynamic:
        assert [s.session.static_batch for s in static._stages] == [1] * 3
        for a, b in zip(static.stage_logits(images[:7]), dynamic.stage_logits(images[:7])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


class FakeNpuCore:
    """A core that reports an NPU and records what would be compiled for it (then compiles on CPU)."""

    def __init__(self):
        self.real = ov.Core()
        self.available_devices = ["CPU", "NPU"]
        self.compiled: list[tuple[bool, str, dict]] = []

    def get_property(self, device, key):
        if device == "NPU" and key == "SUPPORTED_PROPERTIES":
            return {"SUPPORTED_PROPERTIES": "RO", "PERFORMANCE_HINT": "RW", "INFERENCE_PRECISION_HINT": "RW",
                    "CACHE_DIR": "RW", "NPU_TILES": "RW"}
        return self.real.get_property(device, key)

    def read_model(self, *args):
        return self.real.read_model(*args)

    def compile_model(self, model, device, config):
        self.compiled.append((model.inputs[0].get_partial_shape().is_static, device, dict(config)))
        return self.real.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def test_npu_request_is_static_and_carries_no_cpu_only_properties(ee_bundle):
    fake = FakeNpuCore()
    files, io = _stage_files(ee_bundle, 0)
    stage = openvino_adapter.OpenVinoStage(files, io, LoadOptions(threads=1, device="NPU"), ov_core=fake)
    static, device, config = fake.compiled[0]
    assert static and device == "NPU"
    assert config["PERFORMANCE_HINT"] == "LATENCY" and "CACHE_DIR" in config
    assert not {"INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "ENABLE_CPU_PINNING"} & set(config)
    out = stage.run(np.zeros((3, 16, 16, 3), np.uint8))  # batch 3 through a batch-1 model
    assert out["logits"].shape == (3, 3) and out["carry"].shape == (3, 8, 16, 16)
    empty = stage.run(np.zeros((0, 16, 16, 3), np.uint8))
    assert empty["logits"].shape == (0, 3) and empty["carry"].shape == (0, 8, 16, 16)


def test_exporter_fp16_int8_fallback_and_sources(tmp_path, ee_plans, images):
    plan = ee_plans[0]
    x = stage_inputs([plan], PRE, images)[0]
    inputs = StageInputs(verify=x[:16], calibrate=x[:30], agree=x[30:])
    for d in "abcde":
        (tmp_path / d).mkdir()
    art32, files32, _ = export_stage(exporter("openvino"), plan, tmp_path / "a", inputs, BuildOptions())
    art16, files16, _ = export_stage(exporter("openvino"), plan, tmp_path / "b", inputs,
                                  BuildOptions(fp16=True, openvino_route="best"))
    assert art32["precision"] == "fp32" and "quantization" not in art32
    assert art16["precision"] == "fp16" and art16["verification"]["tolerance"] >= 1e-2
    assert set(art16["verification"]["conversion"]["candidates"]) == {"native", "onnx"}
    assert art16["verification"]["conversion"]["route"] in ("native", "onnx")
    size = {k: v.stat().st_size for k, v in files32.items()}
    size16 = {k: v.stat().st_size for k, v in files16.items()}
    assert size16["openvino/exit0.bin"] < 0.6 * size["openvino/exit0.bin"]
    # an agreement tolerance of 1.0 no finite sample can show: the stage must stay float
    art8, files8, _ = export_stage(exporter("openvino"), plan, tmp_path / "c", inputs,
                                   BuildOptions(int8=True, int8_tolerance=1.0))
    q = art8["quantization"]
    assert q["kept_fp32"] is True and art8["precision"] == "fp32" and 0.0 <= q["agreement_with_fp32"] <= 1.0
    assert q["tool"] == "nncf.quantize" and q["calibration_images"] == 30 and q["agreement_images"] == len(x) - 30
    assert files8["openvino/exit0.bin"].read_bytes() == files32["openvino/exit0.bin"].read_bytes()
    direct, _, _ = export_stage(exporter("openvino"), plan, tmp_path / "e", inputs, BuildOptions(openvino_route="native"))
    assert direct["verification"]["conversion"]["route"] == "native"
    assert max(direct["verification"]["max_abs_diff"].values()) < 1e-4
    with pytest.raises(ConversionError, match="OpenVINO route"):
        BuildOptions(openvino_route="tf")


def test_auto_backend_follows_the_preference_order(ee_bundle, monkeypatch):
    def runtime(**kw):
        with stagewise.load(ee_bundle, warmup=False, **kw) as c:
            return c.runtime
    assert runtime() == "onnxruntime"
    assert runtime(prefer=("openvino", "onnxruntime")) == "openvino"
    assert runtime(runtime="openvino,onnxruntime") == "openvino"
    monkeypatch.setenv("STAGEWISE_PREFER", "openvino,onnxruntime")
    assert runtime() == "openvino"
    assert runtime(runtime="onnxruntime") == "onnxruntime"
    with pytest.raises(BackendUnavailableError, match="'tensorrt'"):
        runtime(runtime="tensorrt,openvino")


def test_cli_flags_reach_the_build_options(tmp_path):
    job = ConversionRequest.from_options(dict(model="toy_models.py:residual_net", exits="layer1", out=tmp_path / "x",
                                              data=tmp_path, formats="onnx,openvino", int8=True, fp16=True, npu=True))
    assert job.build.formats == ("onnx", "openvino") and job.build.fp16 and job.build.npu and job.build.int8
    plain = ConversionRequest.from_options(dict(model="m.py:f", exits="layer1", out=tmp_path / "y", data=tmp_path))
    assert not plain.build.fp16 and not plain.build.npu


def test_cli_run_reports_a_missing_device(cascade_bundle, image_folder):
    image = next(Path(image_folder).rglob("*.png"))
    result = subprocess.run([sys.executable, "-c", "from stagewise.cli import main; main()", "run", str(cascade_bundle), str(image),
                             "--backend", "openvino", "--device", "NPU"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "OpenVINO device 'NPU' is not available" in result.stderr and "CPU" in result.stderr


def test_adapter_imports_no_converter():
    code = ("import json, sys\nimport stagewise.runtimes.openvino_adapter\n"
            "print(json.dumps(sorted(sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout)
    # (``import openvino`` itself defines ``convert_model`` lazily; its frontends for torch/ONNX stay unloaded)
    heavy = [m for m in loaded if m.split(".")[0] in ("torch", "onnx", "nncf", "tensorflow")
             or m.startswith(("openvino.frontend.pytorch", "openvino.frontend.onnx"))]
    assert heavy == []


def test_swb_bundle_loads_on_openvino(cascade_bundle, images):
    assert cascade_bundle.suffix == ".swb"
    bundle = read_bundle(cascade_bundle)
    try:
        assert bundle.formats() == ["onnx", "openvino"]
    finally:
        bundle.close()
    with stagewise.load(cascade_bundle, runtime="openvino", threads=1) as c:
        assert c.predict(images[0]).stage_index in (0, 1)


def test_openvino_accuracy_control_reverts_the_fragile_layer(tmp_path):
    from toy_models import fragile_net

    x = np.random.default_rng(0).normal(0, 1, (600, 3, 16, 16)).astype(np.float32)
    plan = cascade_plans([("only", fragile_net(), (16, 16))])[0]
    inputs = StageInputs(x[:16], x[:100], x[100:])
    whole, _, _ = export_stage(exporter("openvino"), plan, tmp_path / "w", inputs,
                            BuildOptions(int8=True, int8_mixed=False, int8_tolerance=0.9))
    assert whole["precision"] == "fp32" and whole["quantization"]["agreement_with_fp32"] < 0.6
    mixed, _, _ = export_stage(exporter("openvino"), plan, tmp_path / "m", inputs, BuildOptions(int8=True, int8_tolerance=0.9))
    q = mixed["quantization"]
    assert mixed["precision"] == "int8" and q["accuracy_control"] == "nncf.quantize_with_accuracy_control"
    assert any(name.startswith("/mix/Conv") for name in q["float_layers"])
    assert q["agreement_interval"][0] >= 0.9 and q["agreement_images"] == 500


def test_openvino_accuracy_control_that_reverts_every_weighted_layer_is_no_int8(tmp_path):
    from stagewise.converters.int8_gate import Verdict
    from stagewise.converters.openvino_export import float_layers
    from toy_models import fragile_net

    x = np.random.default_rng(0).normal(0, 1, (600, 3, 16, 16)).astype(np.float32)
    plan = cascade_plans([("only", fragile_net(), (16, 16))])[0]
    inputs = StageInputs(x[:16], x[:100], x[100:])
    ov_exporter = exporter("openvino")
    fp32 = ov_exporter.export(plan, tmp_path, inputs, BuildOptions())
    result = ov_exporter.quantize_mixed(plan, fp32, tmp_path, inputs, BuildOptions(int8=True, int8_tolerance=0.999),
                                        lambda candidate: Verdict(False, 0.0, "refused", {"agreement_with_fp32": 0.0}))
    *full, tried = result.record["search"]
    assert [t["recipe"] for t in full] == ["NNCF performance, fast bias correction",
                                           "NNCF performance, fast bias correction, overflow fix on every layer",
                                           "NNCF performance, full bias correction", "NNCF mixed, full bias correction"]
    assert tried["recipe"].startswith("NNCF performance, fast bias correction, nncf.quantize_with_accuracy_control")
    weighted = float_layers(ov.Core().read_model(str(fp32.files[0])))
    assert tried["note"] == "every weighted layer reverted to float" and len(tried["float_layers"]) == len(weighted)
    assert result.record["float_layers"] == [] and "accuracy_control" not in result.record
    assert result.record["recipe"] == "NNCF performance, fast bias correction"  # the best full INT8 (all tie at 0)
