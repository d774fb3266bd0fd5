"""The ONNX exporter: the source's ONNX frontend, verification on ONNX Runtime, INT8 with ONNX Runtime's quantizer.

INT8 is ONNX Runtime's static QDQ quantization (uint8 activations, int8 per-channel weights),
calibrated on the stage's real inputs after ``quant_pre_process``. Mixed precision: when the
fully quantized stage misses the agreement tolerance, ONNX Runtime's QDQ debugging tools
(``qdq_loss_debug``) rank the nodes by the signal-to-quantization-noise ratio of their quantized
inputs and weights, and the most damaged ones are excluded (``nodes_to_exclude``) in doubling
steps until the tolerance is met.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.qdq_loss_debug import (collect_activations, create_activation_matching,
                                                     modify_model_output_intermediate_tensors)
from onnxruntime.quantization.shape_inference import quant_pre_process

from .export import Exported, Exporter, Judge, StageInputs, TensorSpec
from .options import BuildOptions
from .plans import StagePlan

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8",
              "tensor(uint8)": "uint8", "tensor(int64)": "int64", "tensor(int32)": "int32"}


class _Batches(CalibrationDataReader):
    def __init__(self, input_name: str, tensors: np.ndarray, batch: int = 16):
        self._chunks = iter([{input_name: tensors[i:i + batch]} for i in range(0, len(tensors), batch)])

    def get_next(self) -> dict | None:
        return next(self._chunks, None)


def worst_channel_sqnr(reference: Sequence[np.ndarray], quantized: Sequence[np.ndarray]) -> float:
    """The lowest per-channel signal-to-quantization-noise ratio (dB) of a tensor, channels on axis 1.

    Taken per channel because one channel with a large range can make a per-tensor scale wipe
    out the others while the tensor's overall ratio still looks fine. Channels without signal
    are ignored.
    """
    x = np.concatenate([np.asarray(r, dtype=np.float64) for r in reference])
    y = np.concatenate([np.asarray(q, dtype=np.float64) for q in quantized])
    axes = tuple(i for i in range(x.ndim) if i != 1) if x.ndim > 1 else (0,)
    signal = (x * x).sum(axis=axes)
    noise = ((x - y) ** 2).sum(axis=axes)
    alive = signal > 1e-12 * max(float(signal.max()), 1e-30)
    if not alive.any():
        return float("inf")
    return float(10 * np.log10(signal[alive] / np.maximum(noise[alive], 1e-30)).min())


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
                 options: BuildOptions, exclude: Sequence[str] = (), tag: str = "int8") -> Exported:
        """ONNX Runtime's static QDQ quantization of every node but ``exclude`` (node names of the
        pre-processed float model, see :meth:`prepared`)."""
        out = workdir / f"{plan.name}.{tag}.onnx"
        quantize_static(str(self.prepared(fp32, workdir)), str(out), _Batches(plan.input_name, inputs.calibrate),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude))
        return Exported((out,), {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
                                 "per_channel": True, "activations": "uint8", "weights": "int8",
                                 "calibration_images": int(len(inputs.calibrate)), "float_layers": list(exclude)})

    def prepared(self, fp32: Exported, workdir: Path) -> Path:
        """The float model after ONNX Runtime's quantization pre-processing (made once per stage)."""
        path = workdir / f"{fp32.files[0].stem}.prepared.onnx"
        if not path.exists():
            quant_pre_process(str(fp32.files[0]), str(path), skip_symbolic_shape=True)
        return path

    def sensitivity(self, plan: StagePlan, fp32: Exported, quantized: Exported, workdir: Path,
                    inputs: np.ndarray) -> list[tuple[str, float, list[str]]]:
        """Quantized tensors, most damaged first, with the nodes to keep in float to leave each unquantized.

        Damage is the lowest per-channel signal-to-quantization-noise ratio (dB) between a tensor
        before and after its quantize/dequantize pair (ONNX Runtime's QDQ debugging tools); a
        tensor stays float when the node producing it and every node reading it are excluded.
        """
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            augmented = Path(tmp) / "augmented.onnx"
            modify_model_output_intermediate_tensors(str(quantized.files[0]), str(augmented))
            activations = collect_activations(str(augmented), _Batches(plan.input_name, inputs, batch=8))
        graph = onnx.load(str(self.prepared(fp32, workdir))).graph
        shapes = {v.name: [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
                  for v in [*graph.value_info, *graph.input, *graph.output]}

        def shaped(name: str, values: Sequence[np.ndarray]) -> list[np.ndarray]:
            # the debugging tools hand tensors back flattened; restore (batch, channels, ...) where known
            shape = shapes.get(name)
            if not shape or any(d <= 0 for d in shape[1:]):
                return [np.asarray(v)[None] for v in values]
            return [np.asarray(v).reshape(-1, *shape[1:]) for v in values]

        noise = {name: worst_channel_sqnr(shaped(name, match["pre_qdq"]), shaped(name, match["post_qdq"]))
                 for name, match in create_activation_matching(activations).items()}
        nodes: dict[str, set[str]] = {}
        for node in graph.node:
            for tensor in [*node.input, *node.output]:
                nodes.setdefault(tensor, set()).add(node.name)
        ranked = sorted((value, name) for name, value in noise.items() if name in nodes and np.isfinite(value))
        return [(name, value, sorted(nodes[name])) for value, name in ranked]

    def quantize_mixed(self, plan: StagePlan, fp32: Exported, workdir: Path, inputs: StageInputs,
                       options: BuildOptions, judge: Judge) -> Exported:
        """Quantize everything; if that misses the tolerance, keep the 1, 2, 4, … most damaged tensors
        (:meth:`sensitivity`) in float, with the nodes around them, until it is met, while at most
        half of the nodes are excluded; else return the fully quantized model."""
        full = self.quantize(plan, fp32, workdir, inputs, options)
        if judge(full).meets(options.int8_tolerance):
            return full
        ranking = self.sensitivity(plan, fp32, full, workdir, inputs.calibrate[:32])
        total = len(onnx.load(str(self.prepared(fp32, workdir))).graph.node)
        tried = []
        count = 1
        while count <= len(ranking):
            exclude = sorted({node for _, _, around in ranking[:count] for node in around})
            if len(exclude) > total // 2:
                break
            candidate = self.quantize(plan, fp32, workdir, inputs, options, exclude, tag=f"mixed{count}")
            verdict = judge(candidate)
            tried.append({"float_tensors": [name for name, _, _ in ranking[:count]], "float_layers": len(exclude),
                          "agreement_with_fp32": verdict.rate})
            if verdict.meets(options.int8_tolerance):
                return Exported(candidate.files, dict(candidate.record, search=tried,
                                                      sensitivity="lowest per-channel SQNR of a quantized tensor"))
            count *= 2
        return Exported(full.files, dict(full.record, search=tried))
