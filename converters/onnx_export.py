"""The ONNX exporter: the source's ONNX frontend, verification on ONNX Runtime, INT8 with ONNX Runtime's quantizer.

INT8 is ONNX Runtime's static QDQ quantization (uint8 activations, int8 per-channel weights),
calibrated on the stage's real inputs after ``quant_pre_process``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from .export import Exported, Exporter, StageInputs, TensorSpec
from .options import BuildOptions
from .plans import StagePlan

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8",
              "tensor(uint8)": "uint8", "tensor(int64)": "int64", "tensor(int32)": "int32"}


class _Batches(CalibrationDataReader):
    def __init__(self, input_name: str, tensors: np.ndarray, batch: int = 16):
        self._chunks = iter([{input_name: tensors[i:i + batch]} for i in range(0, len(tensors), batch)])

    def get_next(self) -> dict | None:
        return next(self._chunks, None)


def _spec(arg: ort.NodeArg) -> TensorSpec:
    return TensorSpec(arg.name, _ORT_TYPES.get(arg.type, arg.type),
                      tuple(d if isinstance(d, int) else None for d in arg.shape))


class OnnxExporter(Exporter):
    """:class:`~stagewise.converters.export.Exporter` for ``.onnx`` artifacts (run by ONNX Runtime)."""

    format = "onnx"
    runtime = "onnxruntime"
    suffixes = (".onnx",)

    def export(self, plan: StagePlan, workdir: Path, inputs: StageInputs, options: BuildOptions) -> Exported:
        path = workdir / f"{plan.name}.onnx"
        record = plan.adapter.export_onnx(plan, inputs.verify[:1], path)
        return Exported((path,), record)

    def signature(self, files: Sequence[Path]) -> tuple[list[TensorSpec], list[TensorSpec]]:
        session = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])
        return [_spec(a) for a in session.get_inputs()], [_spec(a) for a in session.get_outputs()]

    def quantize(self, plan: StagePlan, fp32: Exported, workdir: Path, inputs: StageInputs,
                 options: BuildOptions) -> Exported:
        out = workdir / f"{plan.name}.int8.onnx"
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            prepared = Path(tmp) / "prepared.onnx"
            quant_pre_process(str(fp32.files[0]), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(out), _Batches(plan.input_name, inputs.calibrate),
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
        return Exported((out,), {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
                                 "per_channel": True, "activations": "uint8", "weights": "int8",
                                 "calibration_images": int(len(inputs.calibrate))})
