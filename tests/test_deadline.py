"""Hard deadlines: a running stage is cancelled on a real runtime, and the executor answers with the best so far."""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest

from stagewise.errors import DeadlineExceededError
from stagewise.runtimes.base import LoadOptions, StageIO
from toy_bundle import nodes_for_seconds

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

CANCEL_BOUND_S = 0.25  # one MatMul node plus thread wake-up on a loaded 2-core machine
LONG_S = 4 * (0.05 + CANCEL_BOUND_S)  # a full run this long can be told from a cancelled one on any machine


def slow_model(path, nodes: int = 600, n: int = 384):
    """``y = x @ W @ W ...`` (``nodes`` MatMuls of n x n by n x n, a few ms each)."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array((np.eye(n, dtype=np.float32)), "w")
    names = ["x"] + [f"h{i}" for i in range(nodes - 1)] + ["y"]
    matmuls = [helper.make_node("MatMul", [names[i], "w"], [names[i + 1]]) for i in range(nodes)]
    graph = helper.make_graph(matmuls, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def nodes_for(open_stage, folder, seconds: float = LONG_S) -> int:
    """How many MatMul nodes make a stage that runs ``seconds`` on this machine, opened with ``open_stage(path)``."""
    x = np.ones((384, 384), np.float32)

    def open_probe(probe):
        stage = open_stage(slow_model(folder / f"probe{probe}.onnx", nodes=probe))
        return lambda: stage.run(x)
    return nodes_for_seconds(open_probe, seconds)


def _ort_stage(path):
    from stagewise.runtimes.onnxruntime_adapter import OnnxRuntimeStage

    return OnnxRuntimeStage(path, StageIO("x", ("y",)), LoadOptions(threads=1, runtime_options={"cache_dir": False}))


@pytest.fixture(scope="module")
def slow_onnx(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slow")
    return slow_model(folder / "slow.onnx", nodes=nodes_for(_ort_stage, folder))


def _timed(fn):
    t0 = time.perf_counter()
    try:
        return fn(), time.perf_counter() - t0
    except DeadlineExceededError:
        return None, time.perf_counter() - t0


def test_onnxruntime_run_is_cancelled_within_a_bound(slow_onnx):
    stage = _ort_stage(slow_onnx)
    x = np.ones((384, 384), np.float32)
    full, full_s = _timed(lambda: stage.run(x))
    assert full is not None
    out, cancelled_s = _timed(lambda: stage.run_within(x, 0.05))
    assert out is None and cancelled_s < 0.05 + CANCEL_BOUND_S and cancelled_s < full_s / 2
    again, _ = _timed(lambda: stage.run_within(x, 60.0))  # a later run is not left cancelled
    np.testing.assert_array_equal(again["y"], full["y"])


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason='needs the OpenVINO runtime: pip install "stagewise[openvino]" (the dev install has it)')
def test_openvino_run_is_cancelled_within_a_bound(tmp_path):
    import openvino as ov

    from stagewise.runtimes.openvino_adapter import OpenVinoStage

    def open_stage(onnx_path):  # OpenVINO runs these MatMuls at its own speed: sized on it
        xml = onnx_path.with_suffix(".xml")
        ov.save_model(ov.convert_model(str(onnx_path)), str(xml))
        return OpenVinoStage([xml, xml.with_suffix(".bin")], StageIO("x", ("y",)),
                             LoadOptions(threads=1, runtime_options={"cache_dir": False}))

    stage = open_stage(slow_model(tmp_path / "slow.onnx", nodes=nodes_for(open_stage, tmp_path)))
    x = np.ones((384, 384), np.float32)
    full, full_s = _timed(lambda: stage.run(x))
    assert full is not None
    out, cancelled_s = _timed(lambda: stage.run_within(x, 0.05))
    assert out is None and cancelled_s < 0.05 + CANCEL_BOUND_S and cancelled_s < full_s / 2
    again, _ = _timed(lambda: stage.run_within(x, 60.0))
    np.testing.assert_allclose(again["y"], full["y"])
