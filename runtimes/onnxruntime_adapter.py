"""ONNX Runtime adapter: one ``InferenceSession`` per stage.

With a model cache (the ``cache_dir`` option, on by default) the first load writes the graph
ONNX Runtime optimized (``SessionOptions.optimized_model_filepath``) under a key made of the
model's recorded sha256, the ONNX Runtime version, the machine and the providers; later loads
open that entry (read whole and checked against its record, :mod:`.model_cache`) with graph
optimization off, skipping the optimizer. The optimized graph may hold this machine's kernels,
hence the machine in the key. A model with external data (more than one file) is not cached:
the optimized graph would point at data files the cache does not hold.
"""

from __future__ import annotations

import platform
from pathlib import Path
from functools import partial
from typing import Any, Mapping, Sequence

import numpy as np

from stagewise.errors import BundleError, DeadlineExceededError, DeviceUnavailableError
from stagewise.extras import require

from .base import INVERSE_TEMPERATURE, LoadOptions, StageIO, StageSession
from .deadline import WATCHDOG
from .model_cache import ModelCache, discard, entry_key, model_cache
from .model_io import DeclaredIO, TensorInfo
from .options import OnnxRuntimeOptions

ort = require("onnxruntime", "onnxruntime", "running a bundle on ONNX Runtime")

_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
           "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int32)": "int32", "tensor(int64)": "int64"}


def _providers(device: str, requested: Sequence[object]) -> list[object]:
    """The execution providers for ``device``: every requested one must be available, and a device
    other than CPU needs a provider other than the CPU one (ONNX Runtime would fall back silently)."""
    available = ort.get_available_providers()
    names = [p[0] if isinstance(p, (tuple, list)) else p for p in requested]
    missing = [n for n in names if n not in available]
    if missing:
        raise DeviceUnavailableError(f"ONNX Runtime execution provider(s) {', '.join(map(str, missing))} are not "
                                     f"available here; available: {', '.join(available)}")
    if device.upper() != "CPU" and all(n == "CPUExecutionProvider" for n in names):
        raise DeviceUnavailableError(
            f"device {device!r} on ONNX Runtime needs its execution provider in options={{'providers': [...]}}; "
            f"available providers: {', '.join(available)}. Use device='CPU', or install onnxruntime for that device")
    return list(requested)


def _cache(options: LoadOptions, settings: OnnxRuntimeOptions) -> ModelCache | None:
    """The cache entry of a model whose verified sha256 is known; else ``None``."""
    folder = model_cache(settings.cache_dir, "onnxruntime") if options.content_key else None
    if folder is None:
        return None
    key = entry_key(options.content_key, ort.__version__, platform.machine(), platform.processor(),
                    list(settings.providers), sorted(settings.session_config.items()))
    return ModelCache(folder, key, options.content_key, ".onnx")


class OnnxRuntimeStage(StageSession):
    """A stage on ONNX Runtime (CPU execution provider unless the ``providers`` option says otherwise)."""

    cancellable = True  # run_within stops a run at its timeout

    def __init__(self, model: Path, io: StageIO, options: LoadOptions, self_contained: bool = True):
        settings = options.options_for(OnnxRuntimeOptions)
        so = ort.SessionOptions()
        if options.threads:
            so.intra_op_num_threads = options.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for key, value in settings.session_config.items():
            so.add_session_config_entry(key, str(value))
        providers = _providers(options.device, settings.providers)
        cache = _cache(options, settings) if self_contained else None
        self._session, self.loaded_from_cache = _open(model, so, providers, cache)
        self._input = io.input
        decision = io.decision
        self.decides = decision is not None and decision.exported  # the graph outputs the asked exit decision
        self._outputs = list(io.outputs)  # what run() returns: the executor reads the decision through a runner
        self._decision = [decision.output, decision.label] if self.decides else []
        self._feeds = dict(io.feeds)
        if not self._feeds and any(i.name == INVERSE_TEMPERATURE for i in self._session.get_inputs()):
            self._feeds[INVERSE_TEMPERATURE] = np.ones(1, np.float32)  # a graph decision opened without a manifest
        self._providers = list(providers)
        self.ran_on = self._session.get_providers()[0]

    def declared(self) -> DeclaredIO:
        """The model's inputs and outputs as ONNX Runtime reads them."""
        def table(args: Sequence[object]) -> dict[str, TensorInfo]:
            return {a.name: TensorInfo(_DTYPES.get(a.type, a.type),
                                       tuple(d if isinstance(d, int) and d > 0 else None for d in a.shape))
                    for a in args}

        return DeclaredIO(table(self._session.get_inputs()), table(self._session.get_outputs()))

    def device_problem(self, device: str) -> str | None:
        """Why this stage does not run on ``device`` (``None`` when it does): ONNX Runtime puts a session on
        the first of the asked providers it could start and falls back silently to the next."""
        return provider_problem(device, self._providers, self._session.get_providers())

    def run(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        values = self._session.run(self._outputs, {self._input: tensor, **self._feeds})
        return dict(zip(self._outputs, values))

    def run_within(self, tensor: np.ndarray, timeout_s: float) -> dict[str, np.ndarray]:
        """:meth:`run`, stopped (``RunOptions.terminate``, between two graph nodes) after ``timeout_s``.

        Raises :class:`~stagewise.errors.DeadlineExceededError` when it was stopped.
        """
        run_options = ort.RunOptions()  # this call's own: a cancel reaches no other run
        deadline = WATCHDOG.arm(timeout_s, partial(setattr, run_options, "terminate", True))
        try:
            values = self._session.run(self._outputs, {self._input: tensor, **self._feeds}, run_options)
        except Exception as exc:  # onnxruntime reports a terminated run as a generic failure
            if WATCHDOG.disarm(deadline):
                raise DeadlineExceededError(f"ONNX Runtime stage stopped after {timeout_s * 1e3:.1f} ms") from exc
            raise
        WATCHDOG.disarm(deadline)
        return dict(zip(self._outputs, values))

    def runner(self) -> "OnnxRuntimeRunner":
        """A runner with its own IO binding, output buffers and run options (one request at a time)."""
        return OnnxRuntimeRunner(self._session, self._input, self._outputs + self._decision, self._feeds)

    def close(self) -> None:
        """Drop the session (ONNX Runtime frees it with the last reference; runners hold one until closed)."""
        self._session = None


def provider_problem(device: str, requested: Sequence[object], active: Sequence[str]) -> str | None:
    """Why a session that asked for ``requested`` providers and got ``active`` ones does not run on ``device``."""
    names = [p[0] if isinstance(p, (tuple, list)) else str(p) for p in requested]
    if not active:
        return "the session has no execution provider"
    if names and active[0] != names[0]:
        return f"ONNX Runtime runs it on {active[0]}, not on the asked {names[0]} (it fell back)"
    if device.upper() != "CPU" and active[0] == "CPUExecutionProvider":
        return f"ONNX Runtime runs it on CPUExecutionProvider, not on {device!r}"
    return None


class OnnxRuntimeRunner:
    """One request context on a stage: an IO binding whose outputs stay in ONNX Runtime's buffers.

    The outputs of the first run at a new input shape are allocated by ONNX Runtime; their
    ``OrtValue`` buffers are then bound as the outputs of every later run at that shape and read
    through numpy views (no copy, no allocation). An input array is bound by reference, and the
    same array (a carry: the previous stage's output buffer) is not bound again; the graph's other inputs
    (``feeds``: an exported exit decision's inverse temperature) are bound once. A deadline sets
    this runner's own ``RunOptions.terminate`` from the process's watchdog.
    """

    def __init__(self, session: Any, input_name: str, outputs: Sequence[str], feeds: Mapping[str, np.ndarray] = {}):
        binding = session.io_binding()
        self._binding = binding._iobinding  # the C binding: the Python wrapper costs more than the run of a small stage
        self._feeds = list(feeds.values())  # held: the binding reads their buffers
        for name, value in feeds.items():  # bound once: the same for every run (the inverse temperature)
            self._binding.bind_input(name, value)
        self._session = session
        self._call = session._sess.run_with_iobinding
        self._input = input_name
        self._names = list(outputs)
        self._cpu = ort.OrtDevice.make("cpu", 0)._get_c_device()
        self._options = ort.RunOptions()
        self._x: np.ndarray | None = None
        self._shape: tuple[int, ...] | None = None
        self._values: list[Any] = []  # the bound output OrtValues (their views are in _out)
        self._out: dict[str, np.ndarray] = {}

    def run(self, tensor: np.ndarray, timeout_s: float | None = None) -> dict[str, np.ndarray]:
        if tensor is not self._x:
            if not tensor.flags.c_contiguous:
                tensor = np.ascontiguousarray(tensor)
            self._binding.bind_input(self._input, tensor)
            self._x = tensor  # held: the binding reads its buffer
        if tensor.shape != self._shape:
            return self._first_run(tensor.shape, timeout_s)
        if timeout_s is None:
            self._call(self._binding, self._options)
        else:
            self._within(timeout_s)
        return self._out

    def _first_run(self, shape: tuple[int, ...], timeout_s: float | None) -> dict[str, np.ndarray]:
        """A run at a new input shape: ONNX Runtime allocates the outputs, which are kept and bound from then on."""
        binding = self._binding
        binding.clear_binding_outputs()
        for name in self._names:
            binding.bind_output(name, self._cpu)
        self._shape = None
        if timeout_s is None:
            self._call(binding, self._options)
        else:
            self._within(timeout_s)
        values = binding.get_outputs()
        self._values = [values[i] for i in range(len(self._names))]
        binding.clear_binding_outputs()
        for name, value in zip(self._names, self._values):
            binding.bind_ortvalue_output(name, value)
        self._out = {name: value.numpy() for name, value in zip(self._names, self._values)}
        self._shape = shape
        return self._out

    def _within(self, timeout_s: float) -> None:
        options = self._options
        deadline = WATCHDOG.arm(timeout_s, partial(setattr, options, "terminate", True))
        try:
            self._call(self._binding, options)
        except Exception as exc:  # onnxruntime reports a terminated run as a generic failure
            if WATCHDOG.disarm(deadline):
                options.terminate = False
                raise DeadlineExceededError(f"ONNX Runtime stage stopped after {timeout_s * 1e3:.1f} ms") from exc
            raise
        if WATCHDOG.disarm(deadline):  # fired as the run ended: its answer stands, the flag must not stop the next
            options.terminate = False

    def close(self) -> None:
        self._binding = self._session = self._call = self._x = None
        self._values, self._out = [], {}


def _open(model: Path, so: object, providers: list[object], cache: ModelCache | None) -> tuple[object, bool]:
    """A session of ``model`` and whether it came from ``cache``: a verified entry is opened with
    graph optimization off; on a miss the optimized graph is written to the cache as ``model`` loads.
    A bad entry, or a write that fails (e.g. a full disk), only costs the optimization, never the load."""
    data = cache.read() if cache is not None else None
    if data is not None:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(data, sess_options=so, providers=providers), True
        except Exception as exc:  # noqa: BLE001 - a bad entry: prepare the model again
            cache.failed(exc)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    written = cache.reserve() if cache is not None else None
    if written is not None:
        so.optimized_model_filepath = str(written)
        so.log_severity_level = 3  # its warning that the file is for this machine only: the key says so
        try:
            session = ort.InferenceSession(str(model), sess_options=so, providers=providers)
            cache.publish(written)
            return session, False
        except Exception as exc:  # noqa: BLE001 - e.g. the disk filled while writing the entry
            cache.failed(exc)
            so.optimized_model_filepath = ""
        finally:
            discard(written)
    return _session(str(model), so, providers, model.name), False


def _session(model: str, so: object, providers: list[object], name: str) -> object:
    try:
        return ort.InferenceSession(model, sess_options=so, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad models
        raise BundleError(f"ONNX Runtime cannot load {name}: {exc}") from exc


def open_stage(files: Sequence[Path], io: StageIO, options: LoadOptions) -> OnnxRuntimeStage:
    """Open the ``.onnx`` file of one stage (and its external data files)."""
    return OnnxRuntimeStage(files[0], io, options, self_contained=len(files) == 1)
