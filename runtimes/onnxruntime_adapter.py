"""ONNX Runtime adapter: one ``InferenceSession`` per stage."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from stagewise.errors import BundleError
from stagewise.extras import require

from .base import LoadOptions, StageIO
from .options import OnnxRuntimeOptions

ort = require("onnxruntime", "onnxruntime", "running a bundle on ONNX Runtime")


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
        try:
            self._session = ort.InferenceSession(str(model), sess_options=so, providers=list(settings.providers))
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad models
            raise BundleError(f"ONNX Runtime cannot load {model.name}: {exc}") from exc
        self._input = io.input
        self._outputs = list(io.outputs)

    def run(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        values = self._session.run(self._outputs, {self._input: tensor})
        return dict(zip(self._outputs, values))


def open_stage(files: Sequence[Path], io: StageIO, options: LoadOptions) -> OnnxRuntimeStage:
    """Open the ``.onnx`` file of one stage."""
    return OnnxRuntimeStage(files[0], io, options)
