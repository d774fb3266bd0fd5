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
* Mixed precision: a stage whose INT8 fails the INT8 gate is quantized again by the AI Edge
  Quantizer with some weighted ops (convolutions, fully connected) left in float together with
  the ops producing their inputs, ranked by what each alone in float does to the stage's logits
  on LiteRT; their number doubles until one passes, within ``--int8-search-seconds``. If no such
  mix passes, int8 weights with int16 activations (the quantizer's a16w8 recipe) are tried; they
  are kept only when they pass and run faster than the float model. The tensor statistics are
  collected once per stage and reused by every candidate.
* ``int8_io``: the INT8 model takes and returns int8 tensors (integer-only NPUs such as the
  Edge TPU); the runtime adapter (de)quantizes with the model's own scale and zero point.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from stagewise.extras import require
from stagewise.runtimes.litert_adapter import interpreter_module

from .export import (RANKING_IMAGES, Exported, Exporter, Judge, SearchClock, StageInputs, TensorSpec,
                     exclude_most_sensitive, tried_entry)
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
_INT16_ACTIVATIONS = {"num_bits": 16, "symmetric": True, "granularity": "TENSORWISE", "dtype": "INT"}
WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "BATCH_MATMUL")
"""Ops the mixed-precision search may leave in float (the ones with INT8 weights)."""
_FP16_RECIPE = [{"regex": ".*", "operation": op, "algorithm_key": "float_casting",
                 "op_config": {"weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"},
                               "compute_precision": "FLOAT", "explicit_dequantize": True,
                               "skip_checks": False, "min_weight_elements": 0}}
                for op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]


def _samples(plan: StagePlan, x: np.ndarray) -> dict:
    return {SIGNATURE: [{plan.input_name: x[i:i + 1]} for i in range(len(x))]}


def _edge_quantize(fp32: Path, recipe: list[dict], calibration: dict | None, out: Path) -> None:
    """Quantize ``fp32`` with the AI Edge Quantizer by ``recipe`` into ``out``, with the tensor statistics of
    :func:`_edge_ranges` (``None``: a recipe that needs none)."""
    aeq = require("ai_edge_quantizer.quantizer", "tflite", "quantizing TFLite stages")
    with quiet():
        q = aeq.Quantizer(str(fp32))
        q.load_quantization_recipe(recipe)
        q.quantize(calibration).export_model(str(out), overwrite=True)


def _edge_ranges(plan: StagePlan, fp32: Path, calibrate: np.ndarray, int8_io: bool) -> dict:
    """The AI Edge Quantizer's statistics of every tensor of ``fp32`` on the ``calibrate`` inputs (one calibration
    pass; every recipe and exclusion step of the stage reuses them)."""
    aeq = require("ai_edge_quantizer.quantizer", "tflite", "quantizing TFLite stages")
    with quiet():
        q = aeq.Quantizer(str(fp32))
        q.load_quantization_recipe(_int8_recipe(int8_io))
        return q.calibrate(_samples(plan, calibrate))


def _int8_recipe(int8_io: bool, float_tensors: Sequence[str] = (), int16_activations: bool = False) -> list[dict]:
    """Static INT8 everywhere (int16 activations with ``int16_activations``); float model inputs/outputs
    unless ``int8_io``; the ops producing ``float_tensors`` not quantized (later recipe entries override
    earlier ones)."""
    recipe = list(_INT8_RECIPE)
    if int16_activations:
        config = recipe[0]["op_config"]
        recipe = [dict(recipe[0], op_config=dict(config, activation_tensor_config=_INT16_ACTIVATIONS))]
    if not int8_io:
        recipe += [{"regex": ".*", "operation": op, "algorithm_key": "no_quantize"} for op in ("INPUT", "OUTPUT")]
    # an op's scope is its output tensor names, each followed by ";"
    return recipe + [{"regex": f"(^|;){re.escape(name)};", "operation": "*", "algorithm_key": "no_quantize"}
                     for name in float_tensors]


def weighted_units(path: Path) -> list[list[str]]:
    """For each weighted op (:data:`WEIGHTED_OPS`) of the ``.tflite`` model, the tensors whose producers to leave
    in float with it: its outputs, the tensors it reads that other ops produce (so its inputs stay float),
    and the model outputs any of those ops read (a float op reading a model output makes it int8)."""
    interp = interpreter_module().Interpreter(model_path=str(path))
    names = {d["index"]: d["name"] for d in interp.get_tensor_details()}
    outputs = {d["index"] for d in interp.get_output_details()}
    ops = interp._get_ops_details()
    producer = {i: op for op in ops for i in op["outputs"]}
    units = []
    for op in ops:
        if op["op_name"] in WEIGHTED_OPS:
            feeding = [producer[i] for i in op["inputs"] if i in producer]
            tensors = [*op["outputs"], *(i for f in feeding for i in f["outputs"]),
                       *(i for f in [op, *feeding] for i in f["inputs"] if i in outputs)]
            units.append(list(dict.fromkeys(names[i] for i in tensors)))
    return units


class TFLiteExporter(Exporter):
    """:class:`~stagewise.converters.export.Exporter` for ``.tflite`` artifacts (run by LiteRT)."""

    format = "tflite"
    runtime = "litert"
    supports_fp16 = True

    def __init__(self) -> None:
        self._ranges: dict[tuple, dict] = {}  # per stage: the AI Edge Quantizer's tensor statistics

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
        native = plan.adapter.tflite_fp16(plan, example, out)
        if native is not None:
            return Exported((out,), native)
        _edge_quantize(fp32.files[0], _FP16_RECIPE, None, out)
        return Exported((out,), {"tool": "ai_edge_quantizer (float_casting)", "weights": "fp16",
                                 "compute": "fp32 on CPU"})

    def quantize(self, plan: StagePlan, fp32: Exported, workdir: Path, inputs: StageInputs,
                 options: BuildOptions) -> Exported:
        out = workdir / f"{plan.name}.int8.tflite"
        record = plan.adapter.tflite_int8(plan, inputs.verify[:1], out, inputs.calibrate, options.int8_io)
        if record is None:
            record = self._edge_int8(plan, fp32, inputs, options, out)
        record["io_quantization"] = self.open(plan, (out,)).quantization
        return Exported((out,), record)

    def _edge_int8(self, plan: StagePlan, fp32: Exported, inputs: StageInputs, options: BuildOptions, out: Path,
                   float_tensors: Sequence[str] = (), int16_activations: bool = False) -> dict:
        calibrate = inputs.calibrate
        key = (fp32.files[0], len(calibrate), options.int8_io)
        if key not in self._ranges:
            self._ranges[key] = _edge_ranges(plan, fp32.files[0], calibrate, options.int8_io)
        _edge_quantize(fp32.files[0], _int8_recipe(options.int8_io, float_tensors, int16_activations),
                       self._ranges[key], out)
        return {"tool": "ai_edge_quantizer (static int8, min-max)", "version": package_version("ai-edge-quantizer"),
                "activations": "int16 per-tensor (symmetric)" if int16_activations else "int8 per-tensor (asymmetric)",
                "weights": "int8 per-channel (symmetric)", "io": "int8" if options.int8_io else "float32",
                "calibration_images": int(len(calibrate)), "float_layers": list(float_tensors)}

    def sensitivity(self, plan: StagePlan, fp32: Exported, workdir: Path, inputs: StageInputs,
                    options: BuildOptions, clock: SearchClock | None = None) -> list[tuple[list[str], float]]:
        """Weighted ops (:func:`weighted_units`, as the tensors to leave in float) with the logit SNR (dB) of
        the stage quantized with only that op and its input producers in float, most helpful first, on
        :data:`RANKING_IMAGES` calibration inputs through LiteRT (ops not reached within the ``clock`` rank last)."""
        x = inputs.calibrate[:RANKING_IMAGES]
        out = workdir / f"{plan.name}.rank.tflite"
        return self.rank_by_logit_snr(plan, fp32, weighted_units(fp32.files[0]), lambda unit: Exported(
            (out,), self._edge_int8(plan, fp32, inputs, options, out, unit)), x, clock)

    def _candidate(self, plan: StagePlan, fp32: Exported, workdir: Path, inputs: StageInputs, options: BuildOptions,
                   tag: str, float_tensors: Sequence[str] = (), int16_activations: bool = False) -> Exported:
        out = workdir / f"{plan.name}.{tag}.tflite"
        record = self._edge_int8(plan, fp32, inputs, options, out, float_tensors, int16_activations)
        return Exported((out,), dict(record, io_quantization=self.open(plan, (out,)).quantization))

    def quantize_mixed(self, plan: StagePlan, fp32: Exported, workdir: Path, inputs: StageInputs,
                       options: BuildOptions, judge: Judge, clock: SearchClock | None = None) -> Exported:
        """Full INT8 (the framework's own quantizer where it has one); if that fails the gate, the
        AI Edge Quantizer's INT8 with the 1, 2, 4, … most sensitive weighted ops (:meth:`sensitivity`) and
        the ops producing their inputs left in float, while at least one weighted op stays INT8; then int8
        weights with int16 activations, kept when they pass and beat the float model's latency;
        else the full INT8 model; all within the ``clock``. The record's ``search`` lists every try."""
        full = self.quantize(plan, fp32, workdir, inputs, options)
        verdict = judge(full)
        if verdict.passes:
            return full
        tried: list[dict] = [tried_entry("int8", full, verdict)]
        if clock is not None and clock.expired():
            return Exported(full.files, dict(full.record, search=tried))
        ranking = self.sensitivity(plan, fp32, workdir, inputs, options, clock)
        record = {"search": tried, "sensitivity": "logit SNR with one weighted op and its input producers in float "
                                                  f"({min(RANKING_IMAGES, len(inputs.calibrate))} calibration images, "
                                                  "LiteRT)",
                  "ranking": [{"tensors": unit, "logit_snr_db": round(snr, 2)} for unit, snr in ranking]}
        mixed = exclude_most_sensitive([unit for unit, _ in ranking], lambda count, units: self._candidate(
            plan, fp32, workdir, inputs, options, f"mixed{count}", sorted({t for unit in units for t in unit})),
            judge, tried, "int8", clock)
        if mixed is not None:
            return Exported(mixed.files, dict(mixed.record, **record))
        if not options.int8_io and not (clock is not None and clock.expired()):
            wide = self._candidate(plan, fp32, workdir, inputs, options, "a16w8", int16_activations=True)
            verdict = judge(wide)
            speed = self.host_speed(plan, fp32, wide, inputs.calibrate[:RANKING_IMAGES])
            tried.append(dict(tried_entry("int8 weights, int16 activations", wide, verdict), **speed.record()))
            if verdict.passes and speed.speedup > 1:
                return Exported(wide.files, dict(wide.record, **record))
        return Exported(full.files, dict(full.record, **record))


def describe(path: Path) -> dict:
    """Operator counts, tensor types and size of a ``.tflite`` file (for reports and tests)."""
    interp = interpreter_module().Interpreter(model_path=str(path))
    ops: dict[str, int] = {}
    for op in interp._get_ops_details():
        ops[op["op_name"]] = ops.get(op["op_name"], 0) + 1
    return {"bytes": path.stat().st_size, "ops": ops, "signatures": json.loads(json.dumps(interp.get_signature_list())),
            "inputs": [(d["name"], np.dtype(d["dtype"]).name) for d in interp.get_input_details()],
            "outputs": [(d["name"], np.dtype(d["dtype"]).name) for d in interp.get_output_details()]}
