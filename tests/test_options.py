"""Typed runtime options: dicts are converted, unknown keys are errors listing the valid ones."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import stagewise
from stagewise.bundle import write_bundle
from stagewise.runtimes.base import RUNTIMES, LoadOptions
from stagewise.runtimes.options import LiteRTOptions, OnnxRuntimeOptions, OpenVinoOptions, RuntimeOptions
from stagewise.testing import manifest_for, stage_entry


def test_each_runtime_chooses_its_options():
    assert RUNTIMES["onnxruntime"].options is OnnxRuntimeOptions
    assert RUNTIMES["openvino"].options is OpenVinoOptions
    assert RUNTIMES["litert"].options is LiteRTOptions


def test_a_dict_becomes_the_runtime_options():
    ov = OpenVinoOptions.from_mapping({"cache_dir": False, "config": {"NUM_STREAMS": 1}})
    assert ov.cache_dir is False and ov.config == {"NUM_STREAMS": 1} and ov.inference_precision == "f32"
    ort = OnnxRuntimeOptions.from_mapping({"providers": ["CPUExecutionProvider"]})
    assert ort.providers == ("CPUExecutionProvider",)
    assert LiteRTOptions.from_mapping({"delegates": "libedgetpu.so.1"}).delegates == ("libedgetpu.so.1",)
    assert LiteRTOptions.from_mapping(None) == LiteRTOptions()
    with pytest.raises(TypeError):
        ov.config["NUM_STREAMS"] = 2


def test_an_unknown_option_lists_the_valid_ones():
    with pytest.raises(stagewise.UnknownOptionError, match=r"'cache'; valid options: .*cache_dir, static_shapes"):
        OpenVinoOptions.from_mapping({"cache": False})
    with pytest.raises(stagewise.UnknownOptionError, match="holds options of onnxruntime.*litert"):
        LiteRTOptions.from_mapping(OnnxRuntimeOptions())
    with pytest.raises(stagewise.UnknownOptionError, match="valid options: none"):
        RuntimeOptions.from_mapping({"anything": 1})


def test_load_options_keep_the_former_extra_name():
    assert LoadOptions(threads=1, extra={"cache_dir": False}).options_for(OpenVinoOptions).cache_dir is False
    assert LoadOptions(runtime_options=LiteRTOptions(xnnpack=False)).options_for(LiteRTOptions).xnnpack is False
    with pytest.raises(TypeError):
        LoadOptions(runtime_options={}, extra={})


def test_load_refuses_an_unknown_option_before_opening_anything(tmp_path: Path):
    model = tmp_path / "s0.onnx"
    model.write_bytes(b"not an onnx model")
    stages = [stage_entry("s0", {"source": "image", "size": [8, 8], "tensor": "image"}, ["s0.onnx"], carry=False)]
    bundle = write_bundle(tmp_path / "b", manifest_for(stages, ["a", "b"], {"full": [None]}), {"s0.onnx": model})
    with pytest.raises(stagewise.UnknownOptionError, match="'provider'.*valid options: providers, session_config"):
        stagewise.load(bundle, runtime="onnxruntime", options={"provider": ["CPUExecutionProvider"]})


def test_load_shows_its_signature():
    params = inspect.signature(stagewise.load).parameters
    assert list(params)[:5] == ["path", "runtime", "device", "threads", "options"]
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
