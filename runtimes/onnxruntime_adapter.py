"""ONNX Runtime adapter: one ``InferenceSession`` per stage."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from stagewise.errors import BundleError, DeviceUnavailableError
from stagewise.extras import require

from .base import LoadOptions, StageIO
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


class OnnxRuntimeStage:
    """A stage on ONNX Runtime (CPU execution provider unless the ``providers`` option says otherwise)."""

    def __init__(self, model: Path, io: StageIO, options: LoadOptions):
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
        try:
            self._session = ort.InferenceSession(str(model), sess_options=so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad models
            raise BundleError(f"ONNX Runtime cannot load {model.name}: {exc}") from exc
        self._input = io.input
        self._outputs = list(io.outputs)

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


def open_stage(files: Sequence[Path], io: StageIO, options: LoadOptions) -> OnnxRuntimeStage:
    """Open the ``.onnx`` file of one stage."""
    return OnnxRuntimeStage(files[0], io, options)
