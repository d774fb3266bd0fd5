"""The executor on real runtimes: deadlines under concurrency, threads and sessions after close, huge budgets,
batch == single with carries in the runtime's buffers, and where each stage ran (require_device)."""

from __future__ import annotations

import importlib.util
import math
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from stagewise.testing import manifest_for, stage_entry
from toy_bundle import nodes_for_seconds, onnx_stage_model
from stagewise.bundle import write_bundle
from stagewise.errors import CascadeClosedError, DeviceUnavailableError, InvalidOptionError
from stagewise.runtimes import RUNTIMES, Runtime, StageSession, load, register_runtime
from stagewise.runtimes.deadline import FOREVER_S, WATCHDOG, Watchdog

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from toy_bundle import toy_bundle, toy_image  # noqa: E402

CANCEL_BOUND_S = 0.25  # one MatMul node plus thread wake-up on a loaded 2-core machine
SHORT_MS = 100.0  # the budget of the request that must be cancelled in the slow stage
SLOW_S = 4 * (SHORT_MS / 1e3 + CANCEL_BOUND_S)  # a slow stage this long is told from a cancelled one anywhere


def slow_stage_model(path, nodes: int, n: int = 384) -> None:
    """An image stage (n x 3 x 8 x 8 -> logits n x 3) that also multiplies an n x n matrix ``nodes`` times
    (sized by :func:`slow_nodes`), scaled by the image mean so that ONNX Runtime cannot fold it away; its logits are weak."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.eye(n, dtype=np.float32), "w")
    head = numpy_helper.from_array(np.eye(3, dtype=np.float32) * 0.01, "head")
    names = ["h0"] + [f"h{i + 1}" for i in range(nodes)]
    graph_nodes = [helper.make_node("ReduceMean", ["image"], ["level"], keepdims=0),
                   helper.make_node("Mul", ["w", "level"], ["h0"])]
    graph_nodes += [helper.make_node("MatMul", [names[i], "w"], [names[i + 1]]) for i in range(nodes)]
    graph_nodes += [helper.make_node("ReduceMean", [names[-1]], ["busy"], keepdims=0),
                    helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
                    helper.make_node("Flatten", ["pooled"], ["flat"]),
                    helper.make_node("MatMul", ["flat", "head"], ["mm"]),
                    helper.make_node("Mul", ["busy", "zero"], ["nothing"]),
                    helper.make_node("Add", ["mm", "nothing"], ["logits"])]
    zero = numpy_helper.from_array(np.array(1e-30, np.float32), "zero")
    graph = helper.make_graph(graph_nodes, "slow", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                                  ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])], [w, head, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def slow_nodes(folder) -> int:
    """The node count that makes :func:`slow_stage_model` run ``SLOW_S`` on this machine (one ONNX Runtime thread)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1

    def open_probe(probe):
        slow_stage_model(folder / "probe.onnx", probe)
        session = ort.InferenceSession(str(folder / "probe.onnx"), options, providers=["CPUExecutionProvider"])
        image = np.ones((1, 3, 8, 8), np.float32)
        return lambda: session.run(None, {"image": image})
    return nodes_for_seconds(open_probe, SLOW_S)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return toy_bundle(root / "toy.swb", root / "models")


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """A fast, unsure first stage and a slow second one (both read the image)."""
    root = tmp_path_factory.mktemp("slow")
    onnx_stage_model(root / "s0.onnx", 4, 4, scale=0.1)
    slow_stage_model(root / "s1.onnx", slow_nodes(root))
    stages = [stage_entry(f"s{k}", {"source": "image", "size": [8, 8], "tensor": "image"}, [f"onnx/s{k}.onnx"],
                          carry=False) for k in range(2)]
    manifest = manifest_for(stages, ["red", "green", "blue"], {"full": [None, None]})
    return write_bundle(root / "slow", manifest, {f"onnx/s{k}.onnx": root / f"s{k}.onnx" for k in range(2)})


def _open(path, **kw):
    return load(path, runtime="onnxruntime", threads=1, options={"cache_dir": False}, **kw)


def test_load_predict_close_cycles_leave_the_thread_count_flat(toy):
    image = toy_image()
    with _open(toy) as cascade:  # the first budgeted run starts the process's watchdog
        cascade.predict(image, budget_ms=1e4)
    before = threading.active_count()
    for _ in range(1000):
        cascade = _open(toy, warmup=False)
        p = cascade.predict(image, budget_ms=1e4, operating_point="full")
        cascade.close()
        assert p.stage_index == 2 and not p.budget_limited
    assert threading.active_count() == before
    assert WATCHDOG.pending() == 0
    with pytest.raises(CascadeClosedError, match="load the bundle again"):
        cascade.predict(image)
    assert all(st.session._session is None for st in cascade._stages)  # every session closed


def test_two_concurrent_budgeted_requests_honour_their_own_deadlines(slow):
    image = toy_image()
    with _open(slow, warmup=False) as cascade:
        t0 = time.perf_counter()
        full = cascade.predict(image, operating_point="full")
        stage_s = time.perf_counter() - t0
        assert full.stage_index == 1 and stage_s > SHORT_MS / 1e3 + CANCEL_BOUND_S  # long enough to tell
        for _ in range(3):
            cascade.latency.reset()  # nothing measured: both requests admit the slow stage
            answers = {}
            long = threading.Thread(target=lambda: answers.setdefault("long", cascade.predict(
                image, budget_ms=600_000, operating_point="full")))
            long.start()
            time.sleep(0.01)
            t0 = time.perf_counter()
            short = cascade.predict(image, budget_ms=SHORT_MS, operating_point="full")
            short_s = time.perf_counter() - t0
            long.join()
            assert [r.decision for r in short.trace] == ["continue", "cancelled_budget"]
            assert short.stage_index == 0 and short.budget_limited and short_s < SHORT_MS / 1e3 + CANCEL_BOUND_S
            kept = answers["long"]
            assert [r.decision for r in kept.trace] == ["continue", "last"] and not kept.budget_limited
            np.testing.assert_allclose(kept.probabilities, full.probabilities, rtol=1e-5)
    assert WATCHDOG.pending() == 0


@pytest.mark.parametrize("budget", [1e308, 10**400])
def test_huge_budgets_mean_no_deadline_and_later_budgets_are_still_enforced(slow, budget):
    image = toy_image()
    with _open(slow, warmup=False) as cascade:
        p = cascade.predict(image, budget_ms=budget, operating_point="full")
        assert p.stage_index == 1 and not p.budget_limited and p.budget_ms == (1e308 if budget == 1e308 else math.inf)
        assert [r.reason for r in p.trace] == ["first", "fits"] and WATCHDOG.pending() == 0
        cascade.latency.reset()
        t0 = time.perf_counter()
        short = cascade.predict(image, budget_ms=50.0, operating_point="full")
        assert short.trace[1].decision == "cancelled_budget" and time.perf_counter() - t0 < 0.05 + CANCEL_BOUND_S


@pytest.mark.parametrize("bad", [-1.0, float("nan"), math.inf, -10**400, "5", True])
def test_bad_budgets_are_refused(toy, bad):
    with _open(toy, warmup=False) as cascade:
        with pytest.raises(InvalidOptionError, match="budget_ms"):
            cascade.predict(toy_image(), budget_ms=bad)
        with pytest.raises(InvalidOptionError, match="budget_ms"):
            cascade.predict_batch([toy_image()], budget_ms=bad)


def test_watchdog_cancels_only_its_own_deadline_and_survives_far_ones():
    dog = Watchdog()
    assert dog.arm(FOREVER_S, lambda: None) is None and dog.arm(1e305, lambda: None) is None
    fired = []
    near = dog.arm(0.02, lambda: fired.append("near"))
    far = dog.arm(30.0, lambda: fired.append("far"))
    time.sleep(0.3)
    assert fired == ["near"] and dog.disarm(near) and not dog.disarm(far)
    again = dog.arm(0.01, lambda: fired.append("again"))
    time.sleep(0.3)
    assert dog.disarm(again) and fired == ["near", "again"] and dog.pending() == 0


def test_batch_equals_single_with_carries_kept_in_the_runtime(tmp_path):
    """A carry chain on ONNX Runtime (IO binding: each stage's carry is the next stage's bound input) and on
    OpenVINO: predict_batch, predict and the runtime's own session.run agree."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    files = {}
    for k in range(3):
        inputs = [helper.make_tensor_value_info("image" if k == 0 else "carry_in", TensorProto.FLOAT,
                                                ["n", 3, 8, 8] if k == 0 else ["n", 16])]
        w = numpy_helper.from_array(rng.normal(0, 0.5, (192 if k == 0 else 16, 16)).astype(np.float32), "w")
        head = numpy_helper.from_array(rng.normal(0, 0.6, (16, 3)).astype(np.float32), "head")
        nodes = ([helper.make_node("Flatten", ["image"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["z"])]
                 if k == 0 else [helper.make_node("MatMul", ["carry_in", "w"], ["z"])])
        nodes += [helper.make_node("Tanh", ["z"], ["carry"]), helper.make_node("MatMul", ["carry", "head"], ["logits"])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3]),
                   helper.make_tensor_value_info("carry", TensorProto.FLOAT, ["n", 16])]
        model = helper.make_model(helper.make_graph(nodes, f"s{k}", inputs, outputs, [w, head]),
                                  opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.save(model, str(tmp_path / f"s{k}.onnx"))
        files[f"onnx/s{k}.onnx"] = tmp_path / f"s{k}.onnx"
    stages = [stage_entry("s0", {"source": "image", "size": [8, 8], "tensor": "image"}, ["onnx/s0.onnx"], carry=True)]
    stages += [stage_entry(f"s{k}", {"source": "carry", "from": f"s{k - 1}", "tensor": "carry_in"}, [f"onnx/s{k}.onnx"],
                           carry=k < 2) for k in (1, 2)]
    if importlib.util.find_spec("openvino") is not None:
        import openvino as ov

        for k, s in enumerate(stages):
            xml = tmp_path / f"s{k}.xml"
            ov.save_model(ov.convert_model(str(tmp_path / f"s{k}.onnx")), str(xml))
            files[f"openvino/s{k}.xml"], files[f"openvino/s{k}.bin"] = xml, xml.with_suffix(".bin")
            s["artifacts"]["openvino"] = {"files": [{"path": f"openvino/s{k}.xml"}, {"path": f"openvino/s{k}.bin"}],
                                          "precision": "fp32"}
    manifest = manifest_for(stages, ["a", "b", "c"], {"default": [0.8, 0.8, None]})
    manifest["input"].update(mean=[128, 128, 128], std=[64, 64, 64])
    bundle = write_bundle(tmp_path / "chain", manifest, files)
    images = [rng.integers(0, 256, (8, 8, 3)).astype(np.uint8) for _ in range(40)]
    runtimes = ["onnxruntime"] + (["openvino"] if "openvino/s0.xml" in files else [])
    for runtime in runtimes:
        with load(bundle, runtime=runtime, threads=1, options={"cache_dir": False}) as cascade:
            single = [cascade.predict(im) for im in images]
            batch = cascade.predict_batch(images, max_batch=16)
            assert len({p.stage_index for p in single}) == 3  # every exit is exercised
            assert [(p.label, p.stage_index) for p in batch] == [(p.label, p.stage_index) for p in single]
            np.testing.assert_allclose([p.score for p in batch], [p.score for p in single], rtol=1e-5)
            logits = cascade.stage_logits(images)  # plain session.run, carries copied through numpy
            for p, i in zip(single, range(len(images))):
                np.testing.assert_allclose(p.probabilities, np.exp(logits[p.stage_index][i]) / np.exp(logits[p.stage_index][i]).sum(),
                                           rtol=1e-4, atol=1e-6)
            assert all(r.ran_on == cascade.ran_on[0] for p in single for r in p.trace)
            assert cascade.ran_on[0] == ("CPUExecutionProvider" if runtime == "onnxruntime" else "CPU")


@dataclass(frozen=True)
class _FallbackRuntime(Runtime):
    """A runtime whose stages say they ran on the CPU whatever device was asked for."""

    def installed(self) -> bool:
        return True

    def opener(self):
        from stagewise.runtimes.onnxruntime_adapter import open_stage

        class FellBack(StageSession):
            def __init__(self, files, io, options):
                self._stage = open_stage(files, io, options.__class__(threads=1))
                self.run = self._stage.run
                self.ran_on = "CPUExecutionProvider"

            def device_problem(self, device):
                return None if device == "CPU" else f"it runs on CPUExecutionProvider, not on {device!r}"

        return FellBack


def test_require_device_fails_clearly_when_a_stage_falls_back(toy):
    saved = dict(RUNTIMES)
    register_runtime(_FallbackRuntime("fallback", "onnx", "unused", "unused", "nothing to install"))
    try:
        with load(toy, runtime="fallback", device="NPU", warmup=False) as cascade:  # without the flag: runs, and says where
            assert cascade.ran_on == ["CPUExecutionProvider"] * 3
        with pytest.raises(DeviceUnavailableError, match=r"stage s0: it runs on CPUExecutionProvider, not on 'NPU'"):
            load(toy, runtime="fallback", device="NPU", require_device=True)
        load(toy, runtime="fallback", device="CPU", require_device=True).close()
    finally:
        RUNTIMES.clear()
        RUNTIMES.update(saved)
    with _open(toy, require_device=True) as cascade:
        assert cascade.ran_on == ["CPUExecutionProvider"] * 3


def test_onnxruntime_provider_rule():
    from stagewise.runtimes.onnxruntime_adapter import provider_problem

    assert provider_problem("CPU", ["CPUExecutionProvider"], ["CPUExecutionProvider"]) is None
    assert "fell back" in provider_problem("GPU", ["CUDAExecutionProvider", "CPUExecutionProvider"],
                                           ["CPUExecutionProvider"])
    assert provider_problem("GPU", ["CUDAExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]) is None
