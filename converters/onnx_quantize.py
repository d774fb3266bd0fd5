"""INT8 post-training quantization of ONNX stages with ONNX Runtime's static quantizer."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from .onnx_export import ort_session


class _Batches(CalibrationDataReader):
    def __init__(self, input_name: str, tensors: np.ndarray, batch: int = 16):
        self._chunks = iter([{input_name: tensors[i:i + batch]} for i in range(0, len(tensors), batch)])

    def get_next(self) -> dict | None:
        return next(self._chunks, None)


def quantize_onnx(fp32: Path, out: Path, input_name: str, calibration: np.ndarray, per_channel: bool = True) -> dict:
    """Write a QDQ INT8 model (uint8 activations, int8 weights) calibrated on real inputs.

    Returns the quantization record for the manifest.
    """
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out), _Batches(input_name, calibration), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ", "per_channel": per_channel,
            "activations": "uint8", "weights": "int8", "calibration_images": int(len(calibration))}


def top1_agreement(fp32: Path, int8: Path, input_name: str, inputs: np.ndarray, batch: int = 64) -> float:
    """Fraction of ``inputs`` on which the two models' ``logits`` argmax agree."""
    a, b = ort_session(fp32), ort_session(int8)
    same = []
    for i in range(0, len(inputs), batch):
        x = {input_name: inputs[i:i + batch]}
        same.append(a.run(["logits"], x)[0].argmax(1) == b.run(["logits"], x)[0].argmax(1))
    return float(np.concatenate(same).mean())
