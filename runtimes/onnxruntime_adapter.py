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
from typing import Sequence

import numpy as np

from stagewise.errors import BundleError, DeadlineExceededError, DeviceUnavailableError
from stagewise.extras import require

from .base import LoadOptions, StageIO
from .deadline import Watchdog
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


class OnnxRuntimeStage:
    """A stage on ONNX Runtime (CPU execution provider unless the ``providers`` option says otherwise)."""

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
        self._outputs = list(io.outputs)
        self._options = ort.RunOptions()
        self._watchdog = Watchdog()

    def declared(self) -> DeclaredIO:
        """The model's inputs and outputs as ONNX Runtime reads them."""
        def table(args: Sequence[object]) -> dict[str, TensorInfo]:
            return {a.name: TensorInfo(_DTYPES.get(a.type, a.type),
                                       tuple(d if isinstance(d, int) and d > 0 else None for d in a.shape))
                    for a in args}

        return DeclaredIO(table(self._session.get_inputs()), table(self._session.get_outputs()))

    def run(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        values = self._session.run(self._outputs, {self._input: tensor})
        return dict(zip(self._outputs, values))

    def run_within(self, tensor: np.ndarray, timeout_s: float) -> dict[str, np.ndarray]:
        """:meth:`run`, stopped (``RunOptions.terminate``, between two graph nodes) after ``timeout_s``.

        Raises :class:`~stagewise.errors.DeadlineExceededError` when it was stopped.
        """
        run_options = self._options
        run_options.terminate = False
        self._watchdog.arm(timeout_s, self._terminate)
        try:
            values = self._session.run(self._outputs, {self._input: tensor}, run_options)
        except Exception as exc:  # onnxruntime reports a terminated run as a generic failure
            if self._watchdog.disarm():
                raise DeadlineExceededError(f"ONNX Runtime stage stopped after {timeout_s * 1e3:.1f} ms") from exc
            raise
        self._watchdog.disarm()
        return dict(zip(self._outputs, values))

    def _terminate(self) -> None:
        self._options.terminate = True


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
