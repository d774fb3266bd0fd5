"""Keras stages to ONNX and OpenVINO artifacts (Keras -> TFLite lives in :mod:`.tflite_export`).

* **ONNX**: ``tf2onnx.convert.from_function`` on the stage's inference function (opset 17,
  dynamic batch, NHWC input as the stage is fed), verified on ONNX Runtime against Keras, and
  INT8-quantized with ONNX Runtime's static QDQ quantizer exactly as torch-sourced stages are
  (:func:`stagewise.converters.onnx_quantize.quantize_onnx`).
* **OpenVINO**: ``openvino.convert_model`` reads the stage's SavedModel (written by
  ``keras.export.ExportArchive``; its signature already names the input and outputs as the
  manifest does); the IR is then saved, verified and NNCF-quantized with the same helpers and
  options as torch-sourced stages (:mod:`stagewise.converters.openvino_export`: ``fp16``,
  ``npu``, ``int8``).

Both follow the exporter convention of :func:`stagewise.converters.build.export_onnx_stage`.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from stagewise.errors import ConversionError, VerificationError

from .build import BuildOptions, StageInputs, StagePlan, finish_onnx_artifact, keep_int8, stage_runner
from .keras_source import input_spec, stage_function, stage_saved_model, tf

OPSET = 17


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def export_keras_onnx(plan: StagePlan, sample_shape: tuple[int, ...], path: Path) -> Path:
    """Write the Keras stage as ONNX (input and outputs named as in the manifest, dynamic batch)."""
    try:
        import tf2onnx
    except ImportError as exc:
        raise ConversionError(f'exporting Keras stages to ONNX needs tf2onnx: pip install "stagewise[keras]" ({exc})') from exc
    try:  # tf2onnx predates numpy 2; Keras ships the patch it uses for its own ONNX export
        from keras.src.export.tf2onnx_lib import patch_tf2onnx

        patch_tf2onnx()
    except ImportError:
        pass
    spec = input_spec(plan, sample_shape)
    fn = tf.function(stage_function(plan), input_signature=[spec])
    try:
        with _quiet():
            tf2onnx.convert.from_function(fn, input_signature=[spec], opset=OPSET, output_path=str(path))
    except Exception as exc:  # the converter raises many unrelated types
        raise ConversionError(f"tf2onnx failed for Keras stage {plan.name}: {exc}") from exc
    return path


def _verify_onnx(path: Path, plan: StagePlan, inputs: np.ndarray, tolerance: float) -> dict:
    from .onnx_export import ort_session

    expected = stage_runner(plan.framework).outputs(plan, inputs)
    session = ort_session(path)
    names = [o.name for o in session.get_outputs()]
    if set(names) != set(plan.output_names) or session.get_inputs()[0].name != plan.input_name:
        raise ConversionError(f"{path.name}: tensors are {session.get_inputs()[0].name} -> {names}, expected "
                              f"{plan.input_name} -> {plan.output_names}")
    got = dict(zip(plan.output_names, session.run(plan.output_names, {plan.input_name: inputs})))
    diffs = {}
    for name in plan.output_names:
        diff = float(np.abs(expected[name] - got[name]).max())
        diffs[name] = diff
        if diff > tolerance * max(1.0, float(np.abs(expected[name]).max())):
            raise VerificationError(f"{path.name}: output {name!r} differs from Keras by {diff:.3g} (tolerance "
                                    f"{tolerance:g} relative); tf2onnx did not reproduce this stage faithfully")
    agreement = float((expected["logits"].argmax(1) == got["logits"].argmax(1)).mean())
    return {"max_abs_diff": diffs, "top1_agreement": agreement, "n": int(len(inputs)), "tolerance": tolerance,
            "conversion": {"tool": "tf2onnx.convert.from_function", "version": _version("tf2onnx"), "opset": OPSET}}


def export_onnx_keras_stage(plan: StagePlan, workdir: Path, inputs: StageInputs,
                            options: BuildOptions) -> tuple[dict, dict[str, Path]]:
    """ONNX artifact of a Keras stage (fp32, or INT8 QDQ when it keeps agreement with fp32)."""

    fp32 = export_keras_onnx(plan, inputs.verify.shape, Path(workdir) / f"{plan.name}.onnx")
    artifact: dict[str, Any] = {"precision": "fp32",
                                "verification": _verify_onnx(fp32, plan, inputs.verify, options.verify_tolerance)}
    return finish_onnx_artifact(plan, fp32, inputs, options, artifact)


def convert_keras_openvino(plan: StagePlan, workdir: Path, sample_shape: tuple[int, ...], batch: int | None) -> Any:
    """An ``ov.Model`` of the Keras stage, read by OpenVINO from its SavedModel."""
    import openvino as ov

    saved = stage_saved_model(plan, tempfile.mkdtemp(prefix=f"{plan.name}-savedmodel-", dir=workdir), sample_shape)
    try:
        with _quiet():
            model = ov.convert_model(str(saved))
    except Exception as exc:
        raise ConversionError(f"openvino.convert_model failed for Keras stage {plan.name}: {exc}") from exc
    names = [next(iter(o.get_names()), "") for o in model.outputs]
    if sorted(names) != sorted(plan.output_names):
        raise ConversionError(f"stage {plan.name}: OpenVINO read outputs {names}, expected {plan.output_names}")
    if batch is not None:
        model.reshape({model.inputs[0]: [batch, *[int(d) for d in sample_shape[1:]]]})
    model.inputs[0].get_tensor().set_names({plan.input_name})
    model.set_friendly_name(plan.name)
    return model


def export_openvino_keras_stage(plan: StagePlan, workdir: Path, inputs: StageInputs,
                                options: BuildOptions) -> tuple[dict, dict[str, Path]]:
    """OpenVINO IR of a Keras stage: fp32/fp16 weights, or NNCF INT8 when it keeps agreement with them."""
    import openvino as ov

    from . import openvino_export as ovx

    workdir = Path(workdir)
    npu = bool(getattr(options, "npu", False))
    fp16 = bool(getattr(options, "fp16", False)) or npu
    model = convert_keras_openvino(plan, workdir, inputs.verify.shape, 1 if npu else None)
    ir = ovx.save_ir(model, workdir / f"{plan.name}.keras.xml", fp16)
    tolerance = max(options.verify_tolerance, ovx.FP16_TOLERANCE) if fp16 else options.verify_tolerance
    verification = ovx.verify_ir(ir, plan, inputs.verify, tolerance, options.threads)
    verification.update(converted_from="keras SavedModel", openvino=ov.get_version().split("-")[0])
    artifact: dict[str, Any] = {"precision": "fp16" if fp16 else "fp32", "verification": verification}
    chosen = ir
    if options.int8:
        preset = options.extra.get("openvino_preset", "performance")
        per_channel = bool(options.extra.get("openvino_weights_per_channel", True))
        quantized, record = ovx.quantize_ir(model, inputs.calibrate, "NPU" if npu else "CPU", preset, per_channel)
        int8_ir = ovx.save_ir(quantized, workdir / f"{plan.name}.int8.xml", fp16)
        agreement = ovx.top1_agreement(ovx.cpu_stage(ir, plan, options.threads),
                                       ovx.cpu_stage(int8_ir, plan, options.threads), inputs.agree)
        kept = keep_int8(record, agreement, len(inputs.agree), options)
        if fp16:
            record["float_reference"] = "fp16 weights"
        artifact["quantization"] = record
        if kept:
            artifact["precision"], chosen = "int8", int8_ir
    if npu and hasattr(ovx, "npu_target_record"):
        artifact["target"] = ovx.npu_target_record(chosen[0])
    xml_rel, bin_rel = f"openvino/{plan.name}.xml", f"openvino/{plan.name}.bin"
    artifact["files"] = [{"path": xml_rel}, {"path": bin_rel}]
    return artifact, {xml_rel: chosen[0], bin_rel: chosen[1]}


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
