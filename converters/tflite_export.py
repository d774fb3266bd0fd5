"""The TFLite (LiteRT) exporter: the source's TFLite frontend, verification on LiteRT, INT8 and fp16.

* The float model comes from the source adapter: ``litert-torch`` for torch stages (batch 1,
  the stage's NCHW input moved to NHWC inside the graph), ``tf.lite.TFLiteConverter`` for Keras
  stages (dynamic batch, NHWC). Either way the serving signature names the input and outputs as
  the manifest does, which is how the runtime adapter finds them.
* INT8 and fp16 use the framework's own TFLite quantizer where it has one (Keras:
  full-integer post-training quantization, ``TFLITE_BUILTINS_INT8``, with a representative
  dataset of real stage inputs; fp16 by ``supported_types``); otherwise the AI Edge Quantizer
  on the float ``.tflite``: static int8 weights (per channel) and activations (per tensor)
  calibrated on the stage's real inputs, fp16 weights for convolutions and dense layers.
* Mixed precision: a stage whose INT8 misses the tolerance is quantized again by the AI Edge
  Quantizer with the ops behind its lowest-SNR tensors (its own validation against the float
  model) left in float, doubling their number until the tolerance is met.
* ``int8_io``: the INT8 model takes and returns int8 tensors (integer-only NPUs such as the
  Edge TPU); the runtime adapter (de)quantizes with the model's own scale and zero point.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stagewise.extras import require
from stagewise.runtimes.litert_adapter import interpreter_module

from .export import Exported, Exporter, Judge, StageInputs, TensorSpec
from .options import BuildOptions
from .plans import StagePlan
from .tooling import package_version, quiet

SIGNATURE = "serving_default"

_INT8_RECIPE = [{"regex": ".*", "operation": "*", "algorithm_key": "min_max_uniform_quantize",
                 "op_config": {"activation_tensor_config": {"num_bits": 8, "symmetric": False,
                                                            "granularity": "TENSORWISE", "dtype": "INT"},
                               "weight_tensor_config": {"num_bits": 8, "symmetric": True,
                                                        "granularity": "CHANNELWISE", "dtype": "INT"},
                               "compute_precision": "INTEGER", "explicit_dequantize": False,
                               "skip_checks": False, "min_weight_elements": 0}}]
_FP16_RECIPE = [{"regex": ".*", "operation": op, "algorithm_key": "float_casting",
                 "op_config": {"weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"},
                               "compute_precision": "FLOAT", "explicit_dequantize": True,
                               "skip_checks": False, "min_weight_elements": 0}}
                for op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]


def _samples(plan: StagePlan, x: np.ndarray) -> dict:
    return {SIGNATURE: [{plan.input_name: x[i:i + 1]} for i in range(len(x))]}


def _edge_quantize(plan: StagePlan, fp32: Path, recipe: list[dict], calibrate: np.ndarray | None, out: Path) -> Any:
    """Quantize ``fp32`` with the AI Edge Quantizer by ``recipe`` into ``out``; returns the quantizer."""
    aeq = require("ai_edge_quantizer.quantizer", "tflite", "quantizing TFLite stages")
    with quiet():
        q = aeq.Quantizer(str(fp32))
        q.load_quantization_recipe(recipe)
        calibration = None if calibrate is None else q.calibrate(_samples(plan, calibrate))
        q.quantize(calibration).export_model(str(out), overwrite=True)
    return q


def _int8_recipe(int8_io: bool, float_tensors: Sequence[str] = ()) -> list[dict]:
    """Static INT8 everywhere; float model inputs/outputs unless ``int8_io``; the ops producing
    ``float_tensors`` not quantized (later recipe entries override earlier ones)."""
    recipe = list(_INT8_RECIPE)
    if not int8_io:
        recipe += [{"regex": ".*", "operation": op, "algorithm_key": "no_quantize"} for op in ("INPUT", "OUTPUT")]
    # an op's scope is its output tensor names, each followed by ";"
    return recipe + [{"regex": f"(^|;){re.escape(name)};", "operation": "*", "algorithm_key": "no_quantize"}
                     for name in float_tensors]


def tensor_snr(quantizer: Any, plan: StagePlan, x: np.ndarray) -> list[tuple[str, float]]:
    """Intermediate tensors of a quantized model, worst signal-to-noise ratio (dB) against the float model
    first, from the AI Edge Quantizer's own side-by-side validation on the stage inputs ``x``."""
    metrics = require("ai_edge_quantizer.utils.validation_utils", "tflite", "ranking TFLite tensors")
    with quiet():
        result = quantizer.validate(_samples(plan, x), error_metrics=[metrics.ValidationErrorMetric.SNR],
                                    num_threads=1)
    comparison = result.get_signature_comparison_result(SIGNATURE)
    snr = {name: float(values["snr"]) for name, values in comparison.intermediate_tensors.items()}
    return sorted(((n, v) for n, v in snr.items() if np.isfinite(v)), key=lambda item: item[1])


def activation_inputs(path: Path) -> dict[str, list[str]]:
    """For each tensor an op of the ``.tflite`` model produces, the tensors produced by other ops that it reads."""
    interp = interpreter_module().Interpreter(model_path=str(path))
    names = {d["index"]: d["name"] for d in interp.get_tensor_details()}
    ops = interp._get_ops_details()
    produced = {i for op in ops for i in op["outputs"]}
    return {names[out]: [names[i] for i in op["inputs"] if i in produced] for op in ops for out in op["outputs"]}


class TFLiteExporter(Exporter):
    """:class:`~stagewise.converters.export.Exporter` for ``.tflite`` artifacts (run by LiteRT)."""

    format = "tflite"
    runtime = "litert"
    suffixes = (".tflite",)
    supports_fp16 = True

    def export(self, plan: StagePlan, workdir: Path, inputs: StageInputs, options: BuildOptions) -> Exported:
        interpreter_module()  # fail early, with the install hint, when LiteRT is missing
        path = workdir / f"{plan.name}.fp32.tflite"
        return Exported((path,), plan.adapter.export_tflite(plan, inputs.verify[:1], path))

    def signature(self, files: Sequence[Path]) -> tuple[list[TensorSpec], list[TensorSpec]]:
        interp = interpreter_module().Interpreter(model_path=str(files[0]))
        sig = interp.get_signature_list().get(SIGNATURE)
        if sig is None:
            return [], []
        runner = interp.get_signature_runner(SIGNATURE)

        def specs(details: dict) -> list[TensorSpec]:
            return [TensorSpec(name, np.dtype(d["dtype"]).name, tuple(int(x) for x in d["shape"]))
                    for name, d in details.items()]
        return specs(runner.get_input_details()), specs(runner.get_output_details())

    def verify(self, plan: StagePlan, exported: Exported, inputs: np.ndarray, tolerance: float,
               threads: int = 1) -> dict:
        record = super().verify(plan, exported, inputs, tolerance, threads)
        stage = self.open(plan, exported.files, threads)
        record["signature"] = stage.signature
        if stage.quantization:
            record["io_quantization"] = stage.quantization
        return record

    def fp16(self, plan: StagePlan, fp32: Exported, workdir: Path, example: np.ndarray,
             options: BuildOptions) -> Exported:
        out = workdir / f"{plan.name}.fp16.tflite"
        native = getattr(plan.adapter, "tflite_fp16", None)
        if native is not None:
            return Exported((out,), native(plan, example, out))
        _edge_quantize(plan, fp32.files[0], _FP16_RECIPE, None, out)
        return Exported((out,), {"tool": "ai_edge_quantizer (float_casting)", "weights": "fp16",
                                 "compute": "fp32 on CPU"})

    def quantize(self, plan: StagePlan, fp32: Exported, workdir: Path, inputs: StageInputs,
                 options: BuildOptions) -> Exported:
        out = workdir / f"{plan.name}.int8.tflite"
        native = getattr(plan.adapter, "tflite_int8", None)
        if native is not None:
            record = native(plan, inputs.verify[:1], out, inputs.calibrate, options.int8_io)
        else:
            record = self._edge_int8(plan, fp32, inputs, options, out)[1]
        record["io_quantization"] = self.open(plan, (out,)).quantization
        return Exported((out,), record)

    def _edge_int8(self, plan: StagePlan, fp32: Exported, inputs: StageInputs, options: BuildOptions, out: Path,
                   float_tensors: Sequence[str] = ()) -> tuple[Any, dict]:
        quantizer = _edge_quantize(plan, fp32.files[0], _int8_recipe(options.int8_io, float_tensors), inputs.calibrate, out)
        return quantizer, {"tool": "ai_edge_quantizer (static int8, min-max)",
                           "version": package_version("ai-edge-quantizer"),
                           "activations": "int8 per-tensor (asymmetric)", "weights": "int8 per-channel (symmetric)",
                           "io": "int8" if options.int8_io else "float32",
                           "calibration_images": int(len(inputs.calibrate)), "float_layers": list(float_tensors)}

    def quantize_mixed(self, plan: StagePlan, fp32: Exported, workdir: Path, inputs: StageInputs,
                       options: BuildOptions, judge: Judge) -> Exported:
        """Full INT8 (the framework's own quantizer where it has one); if that misses the tolerance, the
        AI Edge Quantizer's INT8 with the ops producing the 1, 2, 4, … tensors of lowest SNR
        (:func:`tensor_snr`) left unquantized together with the ops producing their inputs, up to half
        the tensors; else the full INT8 model."""
        full = self.quantize(plan, fp32, workdir, inputs, options)
        if judge(full).meets(options.int8_tolerance):
            return full
        quantizer, _ = self._edge_int8(plan, fp32, inputs, options, workdir / f"{plan.name}.rank.tflite")
        ranking = tensor_snr(quantizer, plan, inputs.calibrate[:16])
        feeding = activation_inputs(fp32.files[0])
        tried = []
        count = 1
        while count <= max(1, len(ranking) // 2):
            # a damaged tensor stays float with the ops that produce it and the activations it is computed from
            names = sorted({t for name, _ in ranking[:count] for t in [name, *feeding.get(name, [])]})
            out = workdir / f"{plan.name}.mixed{count}.tflite"
            record = self._edge_int8(plan, fp32, inputs, options, out, names)[1]
            candidate = Exported((out,), dict(record, io_quantization=self.open(plan, (out,)).quantization))
            verdict = judge(candidate)
            tried.append({"float_tensors": names, "float_layers": len(names), "agreement_with_fp32": verdict.rate})
            if verdict.meets(options.int8_tolerance):
                return Exported(candidate.files, dict(candidate.record, search=tried,
                                                      sensitivity="lowest SNR of a tensor (ai_edge_quantizer validate)"))
            count *= 2
        return Exported(full.files, dict(full.record, search=tried))


def describe(path: Path) -> dict:
    """Operator counts, tensor types and size of a ``.tflite`` file (for reports and tests)."""
    interp = interpreter_module().Interpreter(model_path=str(path))
    ops: dict[str, int] = {}
    for op in interp._get_ops_details():
        ops[op["op_name"]] = ops.get(op["op_name"], 0) + 1
    return {"bytes": path.stat().st_size, "ops": ops, "signatures": json.loads(json.dumps(interp.get_signature_list())),
            "inputs": [(d["name"], np.dtype(d["dtype"]).name) for d in interp.get_input_details()],
            "outputs": [(d["name"], np.dtype(d["dtype"]).name) for d in interp.get_output_details()]}
