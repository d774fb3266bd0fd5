"""OpenVINO adapter: one compiled model and one reused infer request per stage.

Only the ``openvino`` runtime package is used here (``read_model``, ``compile_model``), never
its model converter, so a device needs ``pip install "stagewise[openvino]"`` and nothing else.

Choices, each overridable through ``stagewise.load(..., options={...})``:

``device`` (``LoadOptions.device``)
    ``CPU``, ``GPU`` (or ``GPU.1``), ``NPU``, ``AUTO`` (or ``AUTO:GPU,CPU``), ``HETERO:GPU,CPU``.
    A device that this machine does not have raises
    :class:`~stagewise.errors.DeviceUnavailableError` listing ``ov.Core().available_devices``.
``threads`` (``LoadOptions.threads``)
    ``INFERENCE_NUM_THREADS`` on CPU (also when CPU is reached through AUTO or HETERO).
``inference_precision`` (default ``"f32"``)
    Execution precision on CPU and GPU. OpenVINO's own default is bf16 on CPUs with AVX512-BF16
    or AMX and f16 on GPUs, which changes the logits the bundle's thresholds were calibrated
    on; a stagewise bundle states its precision, so fp32 and fp16-weight artifacts run in f32
    unless you ask for ``"bf16"``, ``"f16"`` or ``"device_default"``. NPUs always compute in
    f16 and are left alone.
``cpu_pinning`` (default False)
    ``ENABLE_CPU_PINNING`` on CPU. OpenVINO pins its inference threads to cores by default on
    Linux; on a machine whose cores are shared with other work (the 2-core machine this was
    measured on, or a device that also runs its camera pipeline) a pinned thread waits for its
    busy core: a CIFAR-10 ResNet stage took 4.5 ms median pinned against 1.1 ms unpinned there
    (ONNX Runtime: 0.85 ms). Set True on a dedicated device if it measures faster.
``cache_dir`` (default ``$STAGEWISE_CACHE_DIR/openvino`` or ``~/.cache/stagewise/openvino``)
    OpenVINO model caching: a compiled blob is stored on the first load and imported on the
    next. The model is compiled from the ``ov.Model`` read from the bundle, so the cache key is
    a hash of the model's content: compiling from a file path would key the cache on the path
    alone, and a bundle rebuilt in place would then silently load the stale blob. ``False`` or
    ``""`` turns caching off.
``static_shapes`` (default: only for NPU)
    Reshape a dynamic-batch stage to batch 1 before compiling. A stage compiled with a fixed
    batch (an ``--npu`` bundle, or this option) still accepts any batch: :meth:`OpenVinoStage.run`
    splits it into chunks of the compiled batch, so the executor never sees the difference.
``config``
    Extra ``compile_model`` properties, passed as given (they win over the defaults above).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stagewise.errors import BundleError, DeadlineExceededError, DeviceUnavailableError
from stagewise.extras import require

from .base import GraphDecision, LoadOptions, StageIO, StageSession
from .deadline import finite_timeout
from .model_cache import model_cache
from .model_io import DeclaredIO, TensorInfo
from .options import OpenVinoOptions

ov = require("openvino", "openvino", "running a bundle on OpenVINO")

VIRTUAL_DEVICES = ("AUTO", "HETERO", "MULTI", "BATCH")
STATIC_SHAPE_DEVICES = ("NPU",)
"""Devices that compile only models with fully static shapes."""

_CORE: ov.Core | None = None


def core() -> ov.Core:
    """The process-wide ``ov.Core`` (plugins are loaded once and shared by every stage)."""
    global _CORE
    if _CORE is None:
        _CORE = ov.Core()
    return _CORE


def target_devices(device: str) -> list[str]:
    """The physical devices that ``device`` names (``AUTO:GPU,CPU`` -> GPU, CPU; ``AUTO`` -> [];
    an excluded ``-GPU`` in ``AUTO:-GPU`` is not one)."""
    head, _, rest = device.partition(":")
    if head not in VIRTUAL_DEVICES:
        return [device]
    return [d.strip().split("(")[0] for d in rest.split(",") if d.strip() and not d.strip().startswith("-")]


def check_device(device: str, available: Sequence[str]) -> None:
    """Raise :class:`DeviceUnavailableError` unless every device that ``device`` names is present.

    ``GPU`` matches ``GPU.0``; ``GPU.1`` must be listed as such.
    """
    if not device:
        raise DeviceUnavailableError(f"no device given; available devices: {', '.join(available) or 'none'}")
    for target in target_devices(device):
        if target not in available and not any(a.split(".")[0] == target for a in available):
            raise DeviceUnavailableError(
                f"OpenVINO device {target!r} is not available on this machine (asked for {device!r}); "
                f"available devices: {', '.join(available) or 'none'}. Pass device= one of them or 'AUTO' "
                "(a GPU or NPU also needs its driver installed)")


def _physical(device: str, available: Sequence[str]) -> list[str]:
    named = target_devices(device)
    if named:
        return named
    return list(dict.fromkeys(a.split(".")[0] for a in available))  # plain AUTO/MULTI: all of them


def _supported(ov_core: Any, device: str) -> set[str]:
    try:
        return set(ov_core.get_property(device, "SUPPORTED_PROPERTIES"))
    except Exception:  # an unusual plugin that cannot answer: set nothing device-specific
        return set()


def _device_settings(ov_core: Any, device: str, threads: int | None, precision: str, pinning: bool) -> dict:
    """Threads, pinning and precision for one physical device, limited to what its plugin supports."""
    family = device.split(".")[0]
    wanted: dict[str, Any] = {}
    if family == "CPU":
        if threads:
            wanted["INFERENCE_NUM_THREADS"] = int(threads)
        wanted["ENABLE_CPU_PINNING"] = pinning
    if precision != "device_default" and family in ("CPU", "GPU"):
        wanted["INFERENCE_PRECISION_HINT"] = precision
    supported = _supported(ov_core, device)
    return {k: v for k, v in wanted.items() if k in supported}


def compile_config(ov_core: Any, device: str, options: LoadOptions) -> dict:
    """The ``compile_model`` properties for ``device``: latency hint, threads, precision, cache."""
    settings = options.options_for(OpenVinoOptions)
    precision = str(settings.inference_precision)
    pinning = bool(settings.cpu_pinning)
    cfg: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    head = device.partition(":")[0]
    if head in VIRTUAL_DEVICES:
        per_device = {d: s for d in _physical(device, ov_core.available_devices)
                      if (s := _device_settings(ov_core, d, options.threads, precision, pinning))}
        if per_device:
            cfg["DEVICE_PROPERTIES"] = per_device
        if "PERFORMANCE_HINT" not in _supported(ov_core, head):  # HETERO has none
            cfg.pop("PERFORMANCE_HINT")
    else:
        cfg.update(_device_settings(ov_core, device, options.threads, precision, pinning))
        if "PERFORMANCE_HINT" not in _supported(ov_core, device):
            cfg.pop("PERFORMANCE_HINT")
    cache = model_cache(settings.cache_dir, "openvino")
    if cache is not None:
        cfg["CACHE_DIR"] = str(cache)
    cfg.update(settings.config)
    return cfg


def needs_static_shapes(device: str, options: LoadOptions, available: Sequence[str]) -> bool:
    static = options.options_for(OpenVinoOptions).static_shapes
    if static is not None:
        return bool(static)
    return any(d.split(".")[0] in STATIC_SHAPE_DEVICES for d in target_devices(device))


def _read(ov_core: Any, files: Sequence[Path]) -> Any:
    if len(files) < 2:
        raise BundleError(f"an OpenVINO stage needs its .xml and .bin files; the manifest names {[f.name for f in files]}")
    xml, weights = Path(files[0]), Path(files[1])
    for f, what in ((xml, "model (.xml)"), (weights, "weights (.bin)")):
        if not f.is_file():
            raise BundleError(f"OpenVINO {what} file {f} is missing; the bundle is incomplete, rebuild or re-copy it")
    try:
        return ov_core.read_model(str(xml), str(weights))
    except Exception as exc:  # openvino raises RuntimeError with a C++ trace for any malformed IR
        raise BundleError(f"OpenVINO cannot read {xml.name} with {weights.name}: {_first_line(exc)}; "
                          "the IR is corrupt or was modified, rebuild the bundle") from exc


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.strip().startswith("Exception from")]
    return lines[0] if lines else type(exc).__name__


def _static_batch_one(model: Any, name: str) -> None:
    shape = model.inputs[0].get_partial_shape()
    dims = list(shape)
    if any(d.is_dynamic for d in dims[1:]):
        raise BundleError(f"{name}: input shape {shape} has dynamic dimensions besides the batch; a device that needs "
                          "static shapes cannot compile it. Rebuild the bundle with the --npu preset")
    model.reshape({model.inputs[0]: ov.PartialShape([1] + [d.get_length() for d in dims[1:]])})


class OpenVinoStage(StageSession):
    """One stage compiled for an OpenVINO device, with one infer request reused by every call.

    Attributes useful for diagnostics: ``device`` (as asked), ``execution_devices`` (where it
    runs, e.g. ``['CPU']`` under AUTO), ``compile_ms``, ``loaded_from_cache``, ``static_batch``
    (the compiled batch size, or ``None`` when the batch is dynamic) and ``config``.
    """

    cancellable = True  # run_within stops a run at its timeout

    def __init__(self, files: Sequence[Path], io: StageIO, options: LoadOptions, ov_core: Any | None = None):
        ov_core = ov_core or core()
        device = (options.device or "CPU").upper()
        available = list(ov_core.available_devices)
        check_device(device, available)
        name = Path(files[0]).name if files else "stage"
        model = _read(ov_core, files)
        if len(model.inputs) != 1:
            raise BundleError(f"{name}: a stage has one input, this IR has {len(model.inputs)}")
        if needs_static_shapes(device, options, available) and model.inputs[0].get_partial_shape().is_dynamic:
            _static_batch_one(model, name)
        decision = io.decision
        if decision is not None and not add_decision(model, io.outputs[0], decision):
            decision = None
        self.decides = decision is not None  # the compiled model outputs the asked exit decision (add_decision)
        self.device = device
        self.config = compile_config(ov_core, device, options)
        start = time.perf_counter()
        try:
            compiled = ov_core.compile_model(model, device, self.config)
        except Exception as exc:
            raise BundleError(f"OpenVINO cannot compile {name} for device {device!r}: {_first_line(exc)}") from exc
        self.compile_ms = (time.perf_counter() - start) * 1e3
        self._compiled = compiled
        self.loaded_from_cache = bool(_property(compiled, "LOADED_FROM_CACHE", False))
        self.execution_devices = list(_property(compiled, "EXECUTION_DEVICES", [device]))
        port = compiled.inputs[0]
        shape = port.get_partial_shape()
        self.input_shape = [d.get_length() if d.is_static else -1 for d in shape]
        self.static_batch = self.input_shape[0] if self.input_shape and self.input_shape[0] > 0 else None
        self._input_dtype = port.get_element_type().to_dtype()
        self._outputs: dict[str, Any] = {}
        names = {n: out for out in compiled.outputs for n in out.get_names()}
        for out_name in io.outputs + ((decision.output, decision.label) if decision is not None else ()):
            if out_name not in names:
                raise BundleError(f"{name} has no output named {out_name!r} (it has: {', '.join(sorted(names))}); "
                                  "the manifest and the IR do not match, rebuild the bundle")
            self._outputs[out_name] = names[out_name]
        self._request = compiled.create_infer_request()

    def declared(self) -> DeclaredIO:
        """The compiled model's inputs and outputs (every name of each port)."""
        def table(ports: Sequence[Any]) -> dict[str, TensorInfo]:
            return {n: TensorInfo(np.dtype(p.get_element_type().to_dtype()).name,
                                  tuple(d.get_length() if d.is_static else None for d in p.get_partial_shape()))
                    for p in ports for n in p.get_names()}

        return DeclaredIO(table(self._compiled.inputs), table(self._compiled.outputs),
                          input_dtypes=("float32", "float16", "float64"))

    def _infer(self, x: np.ndarray, request: Any = None) -> list[np.ndarray]:
        result = (request or self._request).infer({0: x}, share_inputs=True, share_outputs=False)  # outputs are copies
        return [result[port] for port in self._outputs.values()]

    def _checked(self, tensor: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(tensor, dtype=self._input_dtype)
        expected = self.input_shape[1:]
        if x.ndim != len(self.input_shape) or any(e > 0 and e != g for e, g in zip(expected, x.shape[1:])):
            raise ValueError(f"stage input has shape {list(x.shape)}; the compiled model expects {self.input_shape} "
                             "(-1: any)")
        return x

    def device_problem(self, device: str) -> str | None:
        """Why this stage does not run on ``device`` (``None`` when it does): an AUTO or HETERO device
        compiles for whichever of its devices it can, the CPU included."""
        named = {d.split(".")[0] for d in target_devices(device.upper())}
        ran = {d.split(".")[0] for d in self.execution_devices}
        if named and ran - named:
            return f"OpenVINO runs it on {', '.join(self.execution_devices)}, not on {device!r}"
        return None

    @property
    def ran_on(self) -> str:
        """The device(s) OpenVINO compiled the stage for (``EXECUTION_DEVICES``)."""
        return ",".join(self.execution_devices)

    def run_within(self, tensor: np.ndarray, timeout_s: float) -> dict[str, np.ndarray]:
        """:meth:`run`, cancelled (``InferRequest.cancel``) when it is not done after ``timeout_s``.

        Raises :class:`~stagewise.errors.DeadlineExceededError` when cancelled. A batch that a
        static-batch model must split into chunks runs uncancelled.
        """
        runner = OpenVinoRunner(self)
        try:
            return {name: value.copy() for name, value in runner.run(tensor, timeout_s).items()}
        finally:
            runner.close()

    def run(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs by name for ``tensor`` (any batch size; copies, safe to keep across calls)."""
        return self._split(self._checked(tensor), self._request)

    def _split(self, x: np.ndarray, request: Any) -> dict[str, np.ndarray]:
        """Outputs (copies) of ``x`` on ``request``, in chunks of a static batch."""
        b = self.static_batch
        if len(x) == 0:  # nothing to run (OpenVINO rejects an empty batch)
            return {name: np.zeros((0, *[d.get_length() if d.is_static else 0 for d in list(port.get_partial_shape())[1:]]),
                                   dtype=port.get_element_type().to_dtype()) for name, port in self._outputs.items()}
        if b is None or len(x) == b:
            outs = self._infer(x, request)
        else:
            chunks = []
            for i in range(0, len(x), b):
                part = x[i:i + b]
                if len(part) < b:
                    part = np.concatenate([part, np.zeros((b - len(part),) + part.shape[1:], part.dtype)])
                chunks.append(self._infer(part, request))
            outs = [np.concatenate([c[j] for c in chunks])[:len(x)] for j in range(len(self._outputs))]
        return dict(zip(self._outputs, outs))

    def runner(self) -> "OpenVinoRunner":
        """A runner with its own infer request (one request at a time; it cancels only its own runs)."""
        return OpenVinoRunner(self)

    def close(self) -> None:
        """Release the infer request and the compiled model."""
        self._request = self._compiled = None


class OpenVinoRunner:
    """One request context on a stage: its own infer request, fed the input array in place (a carry is the
    previous stage's output tensor, shared) and read through views of its output tensors (no copy)."""

    def __init__(self, stage: OpenVinoStage):
        self._stage = stage
        self._request = stage._compiled.create_infer_request()
        self._ports = list(stage._outputs.items())
        self._x: np.ndarray | None = None

    def run(self, tensor: np.ndarray, timeout_s: float | None = None) -> dict[str, np.ndarray]:
        stage, request = self._stage, self._request
        x = stage._checked(tensor)
        if stage.static_batch is not None and len(x) != stage.static_batch or not len(x):
            return stage._split(x, request)  # chunks of the compiled batch, uncancelled
        if x is not self._x:
            if not x.flags.writeable:  # OpenVINO shares only writeable memory (a carry, the runner's own output, is)
                x = x.copy()
            request.set_input_tensor(ov.Tensor(x, shared_memory=True))
            self._x = x  # held: the request reads its buffer
        request.start_async()
        timeout_s = None if timeout_s is None else finite_timeout(timeout_s)
        if timeout_s is None:
            request.wait()
        elif not request.wait_for(int(timeout_s * 1e3)):
            request.cancel()
            try:
                request.wait()
            except RuntimeError:  # a cancelled request reports its cancellation on wait
                pass
            raise DeadlineExceededError(f"OpenVINO stage cancelled after {timeout_s * 1e3:.1f} ms")
        return {name: request.get_tensor(port).data for name, port in self._ports}

    def close(self) -> None:
        self._request = self._stage = self._x = None


def add_decision(model: Any, logits: str, decision: GraphDecision) -> bool:
    """Add ``decision``'s outputs to ``model`` (an ``ov.Model`` read from a bundle): the exit score of the logits
    output ``logits`` at the stage's temperature (a constant: the model is read and compiled with the manifest's
    temperature at every load) and its argmax (N x 1 each), computed in f32 like the exported ONNX decision.
    Returns whether it did (not for a model without that output, nor for logits that are not N x a known number,
    at least 2, of classes)."""
    from openvino import opset13 as ops

    port = next((r.input_value(0) for r in model.get_results() if logits in r.output(0).get_names()), None)
    if port is None:
        return False  # no such output: the stage's output check names what the IR has
    shape = port.get_partial_shape()
    if shape.rank.is_dynamic or shape.rank.get_length() != 2 or shape[1].is_dynamic or shape[1].get_length() < 2:
        return False  # not N x a known class count: the executor scores the logits
    x = port if port.get_element_type() == ov.Type.f32 else ops.convert(port, "f32").output(0)
    if decision.score != "max_logit":
        x = ops.softmax(ops.multiply(x, ops.constant(np.float32(decision.inverse_temperature))), 1).output(0)
    top = ops.topk(x, ops.constant(np.int64(2 if decision.score == "margin" else 1)), 1, "max", "value",
                   ov.Type.i64)
    label, score = top.output(1), top.output(0)
    if decision.score == "margin":
        first, second = ops.constant(np.array([0], np.int64)), ops.constant(np.array([1], np.int64))
        label = ops.gather(label, first, 1).output(0)
        score = ops.subtract(ops.gather(score, first, 1), ops.gather(score, second, 1)).output(0)
    elif decision.score == "entropy":  # 1 + sum(p log p) / log(C), p clipped below at 1e-12
        classes = shape[1].get_length()
        p = ops.maximum(x, ops.constant(np.float32(1e-12)))
        total = ops.reduce_sum(ops.multiply(p, ops.log(p)), ops.constant(np.array([1], np.int64)), True)
        score = ops.add(ops.multiply(total, ops.constant(np.float32(1.0 / np.log(classes)))),
                        ops.constant(np.float32(1))).output(0)
    score.get_tensor().set_names({decision.output})
    label.get_tensor().set_names({decision.label})
    model.add_results([ops.result(score), ops.result(label)])
    return True


def _property(compiled: Any, key: str, default: Any) -> Any:
    try:
        return compiled.get_property(key)
    except Exception:
        return default


def open_stage(files: Sequence[Path], io: StageIO, options: LoadOptions) -> OpenVinoStage:
    """Compile one stage from its ``.xml`` (``files[0]``) and ``.bin`` (``files[1]``)."""
    return OpenVinoStage(files, io, options)
