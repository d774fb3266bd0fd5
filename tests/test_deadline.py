"""Hard deadlines: a running stage is cancelled on a real runtime, and the executor answers with the best so far."""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest

from stagewise.errors import DeadlineExceededError
from stagewise.runtimes.base import LoadOptions, StageIO

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

CANCEL_BOUND_S = 0.25  # one MatMul node plus thread wake-up on a loaded 2-core machine


def slow_model(path, nodes: int = 600, n: int = 384):
    """``y = x @ W @ W ...`` (``nodes`` MatMuls of n x n by n x n, a few ms each): a stage of a second or more."""
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


@pytest.fixture(scope="module")
def slow_onnx(tmp_path_factory):
    return slow_model(tmp_path_factory.mktemp("slow") / "slow.onnx")


def _timed(fn):
    t0 = time.perf_counter()
    try:
        return fn(), time.perf_counter() - t0
    except DeadlineExceededError:
        return None, time.perf_counter() - t0


def test_onnxruntime_run_is_cancelled_within_a_bound(slow_onnx):
    from stagewise.runtimes.onnxruntime_adapter import OnnxRuntimeStage

    stage = OnnxRuntimeStage(slow_onnx, StageIO("x", ("y",)), LoadOptions(threads=1, runtime_options={"cache_dir": False}))
    x = np.ones((384, 384), np.float32)
    full, full_s = _timed(lambda: stage.run(x))
    assert full is not None and full_s > 0.05 + CANCEL_BOUND_S  # the stage is long enough to tell
    out, cancelled_s = _timed(lambda: stage.run_within(x, 0.05))
    assert out is None and cancelled_s < 0.05 + CANCEL_BOUND_S and cancelled_s < full_s / 2
    again, _ = _timed(lambda: stage.run_within(x, 60.0))  # a later run is not left cancelled
    np.testing.assert_array_equal(again["y"], full["y"])


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason='needs the OpenVINO runtime: pip install "stagewise[openvino]" (the dev install has it)')
def test_openvino_run_is_cancelled_within_a_bound(tmp_path):
    import openvino as ov

    from stagewise.runtimes.openvino_adapter import OpenVinoStage

    xml = tmp_path / "slow.xml"  # OpenVINO runs these MatMuls faster than ONNX Runtime: more of them
    ov.save_model(ov.convert_model(str(slow_model(tmp_path / "slow.onnx", nodes=900))), str(xml))
    stage = OpenVinoStage([xml, xml.with_suffix(".bin")], StageIO("x", ("y",)),
                          LoadOptions(threads=1, runtime_options={"cache_dir": False}))
    x = np.ones((384, 384), np.float32)
    full, full_s = _timed(lambda: stage.run(x))
    assert full is not None
    if full_s < 0.05 + CANCEL_BOUND_S:
        pytest.skip(f"this machine runs the 900-MatMul model in {full_s * 1e3:.0f} ms, within the "
                    f"{(0.05 + CANCEL_BOUND_S) * 1e3:.0f} ms a cancel may take: a cancelled run cannot be told "
                    "from a finished one here")
    out, cancelled_s = _timed(lambda: stage.run_within(x, 0.05))
    assert out is None and cancelled_s < 0.05 + CANCEL_BOUND_S and cancelled_s < full_s / 2
    again, _ = _timed(lambda: stage.run_within(x, 60.0))
    np.testing.assert_allclose(again["y"], full["y"])
