"""Export stages to TFLite (LiteRT), verify them on the LiteRT interpreter, quantize them.

Two converters, chosen by the stage's source framework:

* **torch** stages go through ``litert-torch`` (``litert_torch.convert``), with batch 1 and the
  stage's NCHW input (the converter keeps the layout the stage was fed in and moves to NHWC
  inside the graph). INT8 and fp16 are done on the float ``.tflite`` by the AI Edge Quantizer
  (``ai-edge-quantizer``, installed with litert-torch): static int8 weights (per channel) and
  activations (per tensor), calibrated on the stage's real inputs; fp16 stores the weights of
  convolutions and dense layers as fp16.
* **keras** stages go through ``tf.lite.TFLiteConverter`` from a SavedModel written by
  ``keras.export.ExportArchive`` (Keras 3's own route to TFLite), with a dynamic batch and NHWC
  input. INT8 is the converter's full-integer post-training quantization with a representative
  dataset of the stage's real inputs (``TFLITE_BUILTINS_INT8`` only: every op integer); fp16
  uses ``supported_types = [tf.float16]``.

Either way the model's serving signature names its input and outputs as the manifest does
(``image``/``carry`` -> ``carry``/``logits``), which is how the runtime adapter finds them.

Options (:class:`~stagewise.converters.build.BuildOptions`): ``int8`` (with ``int8_tolerance``:
a stage whose top-1 agreement with the float model falls below it keeps the float model, and the
manifest records the measured agreement either way), ``fp16`` (the float model is stored with
fp16 weights; also the fallback when INT8 is refused), and ``extra["tflite_int8_io"]`` (or the
``int8_io`` field when present): the INT8 model takes and returns int8 tensors instead of
float32 (for integer-only NPUs such as the Edge TPU); the runtime adapter (de)quantizes with the
model's own scale and zero point, so the executor never sees the difference.

Verification runs the exported model on the LiteRT interpreter through the same adapter the
runtime uses and compares it with the source framework on the stage's real inputs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from stagewise.errors import ConversionError, VerificationError
from stagewise.runtimes.base import LoadOptions, StageIO
from stagewise.runtimes.litert_adapter import LiteRTStage, interpreter_module

from .build import BuildOptions, StageInputs, StagePlan, stage_runner, keep_int8

FP16_TOLERANCE = 2e-2
"""Relative tolerance (of the largest output magnitude) of fp16-weight models against the source."""

SIGNATURE = "serving_default"


def int8_io(options: BuildOptions) -> bool:
    """Whether INT8 models should have int8 inputs/outputs (for integer-only accelerators)."""
    return bool(options.int8_io or options.extra.get("tflite_int8_io", False))


def litert_stage(path: Path, plan: StagePlan, threads: int = 1) -> LiteRTStage:
    """The stage at ``path`` on the LiteRT interpreter, exactly as the runtime opens it."""
    return LiteRTStage(path, StageIO(plan.input_name, tuple(plan.output_names)), LoadOptions(threads=threads))


def _run(stage: LiteRTStage, x: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
    parts = [stage.run(x[i:i + batch]) for i in range(0, len(x), batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def verify_tflite(path: Path, plan: StagePlan, inputs: np.ndarray, tolerance: float, threads: int = 1) -> dict:
    """Compare the ``.tflite`` at ``path`` (on LiteRT) with the source stage on ``inputs``.

    Returns ``{"max_abs_diff": {output: value}, "top1_agreement": fraction, "n": count, ...}``;
    raises :class:`VerificationError` when an output differs by more than ``tolerance`` relative
    to its largest magnitude.
    """
    expected = stage_runner(plan.framework).outputs(plan, inputs)
    stage = litert_stage(path, plan, threads)
    got = _run(stage, inputs)
    diffs = {}
    for name in plan.output_names:
        e, g = expected[name], got[name]
        if e.shape != g.shape:
            raise VerificationError(f"{path.name}: output {name!r} has shape {g.shape} on LiteRT, "
                                    f"{e.shape} in {plan.framework}")
        diff = float(np.abs(e - g).max())
        diffs[name] = diff
        if diff > tolerance * max(1.0, float(np.abs(e).max())):
            raise VerificationError(
                f"{path.name}: output {name!r} differs from {plan.framework} by {diff:.3g} (tolerance {tolerance:g} "
                "relative); the TFLite converter did not reproduce this stage faithfully")
    agreement = float((expected["logits"].argmax(1) == got["logits"].argmax(1)).mean())
    record = {"max_abs_diff": diffs, "top1_agreement": agreement, "n": int(len(inputs)), "tolerance": tolerance,
              "runtime": "litert", "signature": stage.signature}
    if stage.quantization:
        record["io_quantization"] = stage.quantization
    return record


def top1_agreement(a: Path, b: Path, plan: StagePlan, inputs: np.ndarray, threads: int = 1) -> float:
    """Fraction of ``inputs`` on which the two ``.tflite`` models' ``logits`` argmax agree (on LiteRT)."""
    la = _run(litert_stage(a, plan, threads), inputs)["logits"]
    lb = _run(litert_stage(b, plan, threads), inputs)["logits"]
    return float((la.argmax(1) == lb.argmax(1)).mean())


def check_signature(path: Path, plan: StagePlan) -> None:
    """Raise unless the model's serving signature names the stage's input and outputs."""
    interp = interpreter_module().Interpreter(model_path=str(path))
    signatures = interp.get_signature_list()
    sig = signatures.get(SIGNATURE)
    if sig is None or set(sig["inputs"]) != {plan.input_name} or set(sig["outputs"]) != set(plan.output_names):
        raise ConversionError(f"{path.name}: expected a {SIGNATURE!r} signature {plan.input_name} -> "
                              f"{', '.join(plan.output_names)}, the converter wrote {signatures}")


@contextlib.contextmanager
def _quiet():
    """Silence converters' progress output (they print to stdout/stderr and warn freely)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


# --- torch -> TFLite (litert-torch, AI Edge Quantizer) ----------------------------------------

class _TorchConverter:
    def __init__(self, plan: StagePlan, workdir: Path, inputs: StageInputs):
        self.plan, self.workdir, self.inputs = plan, workdir, inputs

    def fp32(self, out: Path) -> dict:
        import torch

        try:
            os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
            import litert_torch
        except ImportError as exc:
            raise ConversionError('exporting torch stages to TFLite needs litert-torch: pip install "stagewise[tflite]"'
                                  f" ({exc})") from exc
        plan = self.plan

        class Named(torch.nn.Module):
            """The stage with named outputs (they become the signature's output names)."""

            def __init__(self, module: torch.nn.Module):
                super().__init__()
                self.module = module

            def forward(self, **kwargs: torch.Tensor) -> dict[str, torch.Tensor]:
                out = self.module(kwargs[plan.input_name])
                out = out if isinstance(out, (tuple, list)) else (out,)
                return dict(zip(plan.output_names, out))

        example = torch.from_numpy(np.ascontiguousarray(self.inputs.verify[:1]))
        try:
            with _quiet():
                edge = litert_torch.convert(Named(plan.module.eval()).eval(), sample_args=(),
                                            sample_kwargs={plan.input_name: example})
                edge.export(str(out))
        except Exception as exc:  # the converter raises many unrelated types
            raise ConversionError(f"litert_torch.convert failed for stage {plan.name}: {exc}") from exc
        return {"tool": "litert_torch.convert", "version": _version("litert-torch"), "batch": 1}

    def _quantizer(self, fp32: Path, recipe: list[dict], calibrate: np.ndarray | None, out: Path) -> None:
        try:
            from ai_edge_quantizer import quantizer as aeq
        except ImportError as exc:
            raise ConversionError('quantizing torch-sourced TFLite stages needs ai-edge-quantizer: '
                                  f'pip install "stagewise[tflite]" ({exc})') from exc
        with _quiet(), contextlib.redirect_stderr(io.StringIO()):
            q = aeq.Quantizer(str(fp32))
            q.load_quantization_recipe(recipe)
            calibration = None
            if calibrate is not None:
                data = [{self.plan.input_name: calibrate[i:i + 1]} for i in range(len(calibrate))]
                calibration = q.calibrate({SIGNATURE: data})
            result = q.quantize(calibration)
            result.export_model(str(out), overwrite=True)

    def int8(self, fp32: Path, out: Path, calibrate: np.ndarray, integer_io: bool) -> dict:
        recipe = [{"regex": ".*", "operation": "*", "algorithm_key": "min_max_uniform_quantize",
                   "op_config": {"activation_tensor_config": {"num_bits": 8, "symmetric": False,
                                                              "granularity": "TENSORWISE", "dtype": "INT"},
                                 "weight_tensor_config": {"num_bits": 8, "symmetric": True,
                                                          "granularity": "CHANNELWISE", "dtype": "INT"},
                                 "compute_precision": "INTEGER", "explicit_dequantize": False,
                                 "skip_checks": False, "min_weight_elements": 0}}]
        if not integer_io:
            recipe += [{"regex": ".*", "operation": op, "algorithm_key": "no_quantize"} for op in ("INPUT", "OUTPUT")]
        self._quantizer(fp32, recipe, calibrate, out)
        return {"tool": "ai_edge_quantizer (static int8, min-max)", "version": _version("ai-edge-quantizer"),
                "activations": "int8 per-tensor (asymmetric)", "weights": "int8 per-channel (symmetric)",
                "io": "int8" if integer_io else "float32", "calibration_images": int(len(calibrate))}

    def fp16(self, fp32: Path, out: Path) -> dict:
        recipe = [{"regex": ".*", "operation": op, "algorithm_key": "float_casting",
                   "op_config": {"weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"},
                                 "compute_precision": "FLOAT", "explicit_dequantize": True,
                                 "skip_checks": False, "min_weight_elements": 0}}
                  for op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
        self._quantizer(fp32, recipe, None, out)
        return {"tool": "ai_edge_quantizer (float_casting)", "weights": "fp16", "compute": "fp32 on CPU"}


# --- keras -> TFLite (tf.lite.TFLiteConverter) ------------------------------------------------

class _KerasConverter:
    def __init__(self, plan: StagePlan, workdir: Path, inputs: StageInputs):
        self.plan, self.workdir, self.inputs = plan, workdir, inputs
        self._saved: Path | None = None

    def saved_model(self) -> Path:
        """The stage as a SavedModel with a ``serving_default`` signature named as the manifest says."""
        if self._saved is None:
            from .keras_source import stage_saved_model

            directory = tempfile.mkdtemp(prefix=f"{self.plan.name}-savedmodel-", dir=self.workdir)
            with _quiet():
                self._saved = stage_saved_model(self.plan, directory, self.inputs.verify.shape)
        return self._saved

    def _convert(self, out: Path, configure: Any = None) -> None:
        from .keras_source import tf

        converter = tf.lite.TFLiteConverter.from_saved_model(str(self.saved_model()), signature_keys=[SIGNATURE])
        if configure:
            configure(converter)
        try:
            with _quiet():
                out.write_bytes(converter.convert())
        except Exception as exc:
            raise ConversionError(f"tf.lite.TFLiteConverter failed for stage {self.plan.name}: {exc}") from exc

    def fp32(self, out: Path) -> dict:
        from .keras_source import tf

        self._convert(out)
        return {"tool": "tf.lite.TFLiteConverter.from_saved_model (keras.export.ExportArchive)",
                "version": tf.__version__, "batch": "dynamic"}

    def int8(self, fp32: Path, out: Path, calibrate: np.ndarray, integer_io: bool) -> dict:
        from .keras_source import tf

        name = self.plan.input_name

        def representative():
            for i in range(len(calibrate)):
                yield {name: calibrate[i:i + 1]}

        def configure(c: Any) -> None:
            c.optimizations = [tf.lite.Optimize.DEFAULT]
            c.representative_dataset = representative
            c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            if integer_io:
                c.inference_input_type = tf.int8
                c.inference_output_type = tf.int8

        self._convert(out, configure)
        return {"tool": "tf.lite.TFLiteConverter full-integer post-training quantization", "version": tf.__version__,
                "activations": "int8 per-tensor (asymmetric)", "weights": "int8 per-channel (symmetric)",
                "ops": "TFLITE_BUILTINS_INT8", "io": "int8" if integer_io else "float32",
                "calibration_images": int(len(calibrate))}

    def fp16(self, fp32: Path, out: Path) -> dict:
        from .keras_source import tf

        def configure(c: Any) -> None:
            c.optimizations = [tf.lite.Optimize.DEFAULT]
            c.target_spec.supported_types = [tf.float16]

        self._convert(out, configure)
        return {"tool": "tf.lite.TFLiteConverter (supported_types float16)", "weights": "fp16",
                "compute": "fp32 on CPU"}


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _converter(plan: StagePlan, workdir: Path, inputs: StageInputs) -> Any:
    if plan.framework == "torch":
        return _TorchConverter(plan, workdir, inputs)
    if plan.framework == "keras":
        return _KerasConverter(plan, workdir, inputs)
    raise ConversionError(f"no TFLite converter for {plan.framework!r} stages; stagewise converts torch and keras")


def export_tflite_stage(plan: StagePlan, workdir: Path, inputs: StageInputs,
                        options: BuildOptions) -> tuple[dict, dict[str, Path]]:
    """TFLite artifact of one stage: fp32 (or fp16 weights), or INT8 when it keeps agreement with them."""
    interpreter_module()  # fail early, with the install hint, when LiteRT is missing
    workdir = Path(workdir)
    converter = _converter(plan, workdir, inputs)
    fp32 = workdir / f"{plan.name}.fp32.tflite"
    conversion = converter.fp32(fp32)
    check_signature(fp32, plan)
    verification = verify_tflite(fp32, plan, inputs.verify, options.verify_tolerance, options.threads)
    verification["conversion"] = conversion
    artifact: dict[str, Any] = {"precision": "fp32", "verification": verification}
    chosen = reference = fp32
    if getattr(options, "fp16", False):
        half = workdir / f"{plan.name}.fp16.tflite"
        record = converter.fp16(fp32, half)
        check_signature(half, plan)
        tolerance = max(options.verify_tolerance, FP16_TOLERANCE)
        verification16 = verify_tflite(half, plan, inputs.verify, tolerance, options.threads)
        verification16.update(conversion=conversion, fp16=record, fp32_max_abs_diff=verification["max_abs_diff"])
        artifact.update(precision="fp16", verification=verification16)
        chosen = reference = half
    if options.int8:
        int8 = workdir / f"{plan.name}.int8.tflite"
        integer_io = int8_io(options)
        record = converter.int8(fp32, int8, inputs.calibrate, integer_io)
        check_signature(int8, plan)
        record["io_quantization"] = litert_stage(int8, plan).quantization
        agreement = top1_agreement(reference, int8, plan, inputs.agree, options.threads)
        kept = keep_int8(record, agreement, len(inputs.agree), options)
        if reference is not fp32:
            record["float_reference"] = "fp16 weights"
        artifact["quantization"] = record
        if kept:
            artifact["precision"], chosen = "int8", int8
    rel = f"tflite/{plan.name}.tflite"
    artifact["files"] = [{"path": rel}]
    return artifact, {rel: chosen}


def describe(path: Path) -> dict:
    """Operator counts, tensor types and size of a ``.tflite`` file (for reports and tests)."""
    interp = interpreter_module().Interpreter(model_path=str(path))
    ops: dict[str, int] = {}
    for op in interp._get_ops_details():
        ops[op["op_name"]] = ops.get(op["op_name"], 0) + 1
    return {"bytes": path.stat().st_size, "ops": ops, "signatures": json.loads(json.dumps(interp.get_signature_list())),
            "inputs": [(d["name"], np.dtype(d["dtype"]).name) for d in interp.get_input_details()],
            "outputs": [(d["name"], np.dtype(d["dtype"]).name) for d in interp.get_output_details()]}
