"""Export torch stage modules to OpenVINO IR (``.xml`` + ``.bin``), verify, and quantize with NNCF.

One stage becomes one IR pair, converted with ``openvino.convert_model`` either from the stage's
ONNX export (the default) or straight from the torch module. Measured on real images
(benchmarks/openvino_conversion.py: EfficientNet-Lite0@224, Lite2@260, the CIFAR-10 ResNet) both
routes give the same graph (same op count) and agree with PyTorch to about 1e-6 of the largest
logit; the ONNX route was closer on all three (max and mean absolute difference 5-20% smaller) and
converted faster, and it reads the very graph the bundle's ONNX artifact holds. ``"torch"`` takes
the direct route; ``"best"`` converts both and keeps the one closer to PyTorch on the
verification inputs.

Options (from :class:`~stagewise.converters.build.BuildOptions`):

* ``fp16``: store weights as fp16 (``save_model(compress_to_fp16=True)``, about half the size);
  the stage still runs in f32 on CPU. Verified against PyTorch with :data:`FP16_TOLERANCE`.
* ``int8``: NNCF post-training quantization (``nncf.quantize``) on the stage's real calibration
  inputs; a stage whose top-1 agreement with the float IR falls below ``int8_tolerance`` keeps
  its float IR, and the manifest records the measured agreement either way.
* ``npu``: the NPU preset: every stage gets a fully static batch-1 input shape (NPUs compile
  only static shapes; the runtime feeds larger batches row by row), fp16 weights (NPUs compute
  in fp16), and INT8 with NNCF's NPU hardware config (``target_device=NPU``), symmetric
  per-tensor activations and symmetric per-channel weights.

Keras stages have their own converter (:mod:`stagewise.converters.keras_export`, from the
stage's SavedModel) and reuse :func:`save_ir`, :func:`verify_ir` (which runs the source model
through the pipeline's runner for its framework), :func:`quantize_ir`, :func:`cpu_stage`,
:func:`top1_agreement` and :func:`npu_target_record` from here.

``extra`` keys: ``openvino_source`` (``"onnx"``, the default, ``"torch"`` or ``"best"``), ``openvino_preset``
(NNCF preset ``"performance"``: symmetric activations, or ``"mixed"``: asymmetric activations),
``openvino_weights_per_channel`` (default True).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import openvino as ov
import torch

from stagewise.errors import ConversionError, VerificationError
from stagewise.runtimes.base import LoadOptions, StageIO
from stagewise.runtimes.openvino_adapter import OpenVinoStage

from .build import BuildOptions, StageInputs, StagePlan, keep_int8
from .onnx_export import export_onnx

SOURCES = ("torch", "onnx", "best")
FP16_TOLERANCE = 2e-2
"""Relative tolerance (of the largest output magnitude) for fp16-weight IR against PyTorch."""


def convert_stage(plan: StagePlan, example: np.ndarray, batch: int | None, source: str = "onnx",
                  workdir: Path | None = None) -> ov.Model:
    """An ``ov.Model`` of ``plan.module`` with named input/outputs and batch ``batch`` (None: dynamic).

    Every dimension but the batch is fixed to the example's, as the stage will be fed.
    """
    shape = [-1 if batch is None else batch, *example.shape[1:]]
    framework = getattr(plan, "framework", "torch")
    if framework != "torch":
        raise ConversionError(f"stage {plan.name}: this converter reads torch stages; {framework} stages go through "
                              "their own exporter (stagewise.converters.keras_export for Keras)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if source == "torch":
                model = ov.convert_model(plan.module.eval(), example_input=torch.from_numpy(example[:1]),
                                         input=[ov.PartialShape(shape)])
            elif source == "onnx":
                with tempfile.TemporaryDirectory(dir=workdir) as tmp:
                    path = Path(tmp) / f"{plan.name}.onnx"
                    export_onnx(plan.module, torch.from_numpy(example[:1]), path, plan.input_name, plan.output_names)
                    model = ov.convert_model(str(path), input=[ov.PartialShape(shape)])
            else:
                raise ConversionError(f"unknown OpenVINO conversion source {source!r}; choose torch, onnx or best")
    except ConversionError:
        raise
    except Exception as exc:  # the frontends raise many unrelated types
        raise ConversionError(f"openvino.convert_model failed for stage {plan.name} (from {source}): {exc}") from exc
    if len(model.outputs) != len(plan.output_names):
        raise ConversionError(f"stage {plan.name}: the converted model has {len(model.outputs)} outputs, "
                              f"expected {len(plan.output_names)} ({', '.join(plan.output_names)})")
    model.inputs[0].get_tensor().set_names({plan.input_name})
    for out, name in zip(model.outputs, plan.output_names):
        out.get_tensor().set_names({name})
    model.set_friendly_name(plan.name)
    return model


def save_ir(model: ov.Model, xml: Path, fp16: bool) -> tuple[Path, Path]:
    """Write ``xml`` and its ``.bin``; fp16 compresses float weights to half precision."""
    ov.save_model(model, str(xml), compress_to_fp16=fp16)
    return xml, xml.with_suffix(".bin")


def cpu_stage(ir: tuple[Path, Path], plan: StagePlan, threads: int = 1) -> OpenVinoStage:
    """The IR compiled on CPU in f32 with the runtime's own adapter (no model cache)."""
    return OpenVinoStage(list(ir), StageIO(plan.input_name, tuple(plan.output_names)),
                         LoadOptions(threads=threads, device="CPU", extra={"cache_dir": False}))


def _run(stage: OpenVinoStage, x: np.ndarray, name: str, batch: int = 64) -> np.ndarray:
    return np.concatenate([stage.run(x[i:i + batch])[name] for i in range(0, len(x), batch)])


def verify_ir(ir: tuple[Path, Path], plan: StagePlan, inputs: np.ndarray, tolerance: float,
              threads: int = 1) -> dict:
    """Compare the IR (on CPU, f32) with ``plan.module`` on ``inputs``; raise beyond ``tolerance``.

    Returns ``{"max_abs_diff": {output: value}, "top1_agreement": fraction, "n": count, "tolerance": t}``.
    """
    expected = reference_outputs(plan, inputs)
    stage = cpu_stage(ir, plan, threads)
    got = stage.run(inputs)
    diffs = {}
    for name in plan.output_names:
        e = expected[name]
        diff = float(np.abs(e - got[name]).max())
        diffs[name] = diff
        if diff > tolerance * max(1.0, float(np.abs(e).max())):
            raise VerificationError(
                f"{ir[0].name}: output {name!r} differs from the source model by {diff:.3g} (tolerance {tolerance:g} "
                "relative); OpenVINO did not reproduce this stage faithfully")
    agreement = float((expected["logits"].argmax(1) == got["logits"].argmax(1)).mean())
    return {"max_abs_diff": diffs, "top1_agreement": agreement, "n": int(len(inputs)), "tolerance": tolerance}


def reference_outputs(plan: StagePlan, x: np.ndarray) -> dict[str, np.ndarray]:
    """The source model's outputs by name for stage input ``x`` (torch, or the pipeline's runner)."""
    framework = getattr(plan, "framework", "torch")
    if framework != "torch":
        from . import build

        return build.stage_runner(framework).outputs(plan, x)
    with torch.no_grad():
        out = plan.module.eval()(torch.from_numpy(np.ascontiguousarray(x)))
    out = out if isinstance(out, (tuple, list)) else (out,)
    return {name: o.numpy() for name, o in zip(plan.output_names, out)}


def quantize_ir(model: ov.Model, calibration: np.ndarray, target_device: str = "CPU", preset: str = "performance",
                weights_per_channel: bool = True) -> tuple[ov.Model, dict]:
    """NNCF post-training INT8 quantization of ``model`` on real stage inputs, one sample at a time.

    Returns the quantized model and its manifest record (without the agreement figures).
    """
    try:
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters
    except ImportError as exc:
        raise ConversionError(f"INT8 OpenVINO artifacts need NNCF ({exc}); install it with "
                              'pip install "stagewise[openvino-convert]"') from exc

    if preset not in ("performance", "mixed"):
        raise ConversionError(f"unknown NNCF preset {preset!r}; choose performance or mixed")
    static_batch = model.inputs[0].get_partial_shape()[0]
    batch = static_batch.get_length() if static_batch.is_static else 1
    items = [calibration[i:i + batch] for i in range(0, len(calibration) - batch + 1, batch)]
    advanced = AdvancedQuantizationParameters(
        weights_quantization_params=QuantizationParameters(per_channel=weights_per_channel))
    try:
        quantized = nncf.quantize(model, nncf.Dataset(items), preset=nncf.QuantizationPreset(preset),
                                  target_device=nncf.TargetDevice[target_device], subset_size=len(items),
                                  fast_bias_correction=True, advanced_parameters=advanced)
    except Exception as exc:
        raise ConversionError(f"NNCF quantization failed: {exc}") from exc
    activations = "symmetric" if preset == "performance" else "asymmetric"
    record = {"tool": "nncf.quantize", "nncf": nncf.__version__, "format": "OpenVINO FakeQuantize",
              "target_device": target_device, "preset": preset,
              "activations": f"8-bit {activations} per-tensor",
              "weights": f"int8 symmetric {'per-channel' if weights_per_channel else 'per-tensor'}",
              "per_channel": weights_per_channel, "fast_bias_correction": True,
              "calibration_images": int(len(items) * batch)}
    return quantized, record


def top1_agreement(a: OpenVinoStage, b: OpenVinoStage, inputs: np.ndarray) -> float:
    """Fraction of ``inputs`` on which the two compiled stages' ``logits`` argmax agree."""
    return float((_run(a, inputs, "logits").argmax(1) == _run(b, inputs, "logits").argmax(1)).mean())


def _convert_verified(plan: StagePlan, workdir: Path, inputs: StageInputs, options: BuildOptions, batch: int | None,
                      fp16: bool) -> tuple[ov.Model, tuple[Path, Path], dict]:
    source = options.extra.get("openvino_source", "onnx")
    if source not in SOURCES:
        raise ConversionError(f"unknown openvino_source {source!r}; choose {', '.join(SOURCES)}")
    tolerance = max(options.verify_tolerance, FP16_TOLERANCE) if fp16 else options.verify_tolerance
    tried: list[tuple[float, str, ov.Model, tuple[Path, Path], dict]] = []
    errors = []
    for src in (("torch", "onnx") if source == "best" else (source,)):
        model = convert_stage(plan, inputs.verify, batch, src, workdir)
        ir = save_ir(model, workdir / f"{plan.name}.{src}.xml", fp16)
        try:
            record = verify_ir(ir, plan, inputs.verify, tolerance, options.threads)
        except VerificationError as exc:
            errors.append(str(exc))
            continue
        record["converted_from"] = src
        tried.append((max(record["max_abs_diff"].values()), src, model, ir, record))
    if not tried:
        raise VerificationError("; ".join(errors))
    _, _, model, ir, record = min(tried, key=lambda t: t[0])
    if source == "best":
        record["candidates"] = {src: diff for diff, src, *_ in tried}
    return model, ir, record


def export_openvino_stage(plan: StagePlan, workdir: Path, inputs: StageInputs,
                          options: BuildOptions) -> tuple[dict, dict[str, Path]]:
    """OpenVINO IR of one stage: fp32 or fp16 weights, or NNCF INT8 when it keeps agreement with them."""
    npu = bool(getattr(options, "npu", False))
    fp16 = bool(getattr(options, "fp16", False)) or npu
    batch = 1 if npu else None
    model, ir, verification = _convert_verified(plan, workdir, inputs, options, batch, fp16)
    verification["openvino"] = ov.get_version().split("-")[0]
    artifact: dict[str, Any] = {"precision": "fp16" if fp16 else "fp32", "verification": verification}
    chosen = ir
    if options.int8:
        target = "NPU" if npu else "CPU"
        preset = options.extra.get("openvino_preset", "performance")
        per_channel = bool(options.extra.get("openvino_weights_per_channel", True))
        quantized, record = quantize_ir(model, inputs.calibrate, target, preset, per_channel)
        int8_ir = save_ir(quantized, workdir / f"{plan.name}.int8.xml", fp16)
        agreement = top1_agreement(cpu_stage(ir, plan, options.threads), cpu_stage(int8_ir, plan, options.threads),
                                   inputs.agree)
        kept = keep_int8(record, agreement, len(inputs.agree), options)
        if fp16:
            record["float_reference"] = "fp16 weights"
        artifact["quantization"] = record
        if kept:
            artifact["precision"], chosen = "int8", int8_ir
    if npu:
        artifact["target"] = npu_target_record(chosen[0])
    xml_rel, bin_rel = f"openvino/{plan.name}.xml", f"openvino/{plan.name}.bin"
    artifact["files"] = [{"path": xml_rel}, {"path": bin_rel}]
    return artifact, {xml_rel: chosen[0], bin_rel: chosen[1]}


NPU_PRECISIONS = {"f32", "f16", "i8", "u8", "i32", "i64", "boolean"}
"""Element types an NPU-preset IR may carry (f32 only at the model's inputs/outputs and in
FakeQuantize ranges; the NPU compiler computes in f16)."""


def check_npu_constraints(xml: Path) -> dict:
    """Check an IR against what the NPU path needs; raise :class:`ConversionError` if it does not fit.

    Checks: every input and output shape is fully static; no weight or constant has an element
    type outside :data:`NPU_PRECISIONS` (e.g. bf16 or f64); no op produces a dynamic shape.
    Returns what was found (shapes, constant precisions, FakeQuantize count).
    """
    model = ov.Core().read_model(str(xml))
    problems = []
    shapes = {}
    for port in [*model.inputs, *model.outputs]:
        shape = port.get_partial_shape()
        shapes[port.get_any_name()] = [d.get_length() if d.is_static else -1 for d in shape]
        if shape.is_dynamic:
            problems.append(f"{port.get_any_name()} has dynamic shape {shape}")
    constant_types = set()
    fake_quantize = 0
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind == "Constant":
            constant_types.add(op.get_output_element_type(0).get_type_name())
        if kind == "FakeQuantize":
            fake_quantize += 1
        for k in range(op.get_output_size()):
            if op.get_output_partial_shape(k).is_dynamic:
                problems.append(f"op {op.get_friendly_name()} ({kind}) has a dynamic output shape")
                break
    bad = constant_types - NPU_PRECISIONS
    if bad:
        problems.append(f"constants of element types {sorted(bad)}")
    if problems:
        raise ConversionError(f"{xml.name} does not meet the NPU constraints: {'; '.join(problems[:5])}")
    return {"shapes": shapes, "constant_types": sorted(constant_types), "fake_quantize_ops": fake_quantize}


def npu_target_record(xml: Path) -> dict:
    """The manifest's record of the NPU preset for one artifact, after checking the constraints."""
    found = check_npu_constraints(xml)
    return {"preset": "npu", "static_shapes": True, "shapes": found["shapes"],
            "constant_types": found["constant_types"], "fake_quantize_ops": found["fake_quantize_ops"],
            "checked_by": "stagewise.converters.openvino_export.check_npu_constraints",
            "compiled_on": ["CPU"]}


def ir_inputs_static(xml: Path) -> bool:
    """Whether every input of the IR at ``xml`` has a fully static shape."""
    model = ov.Core().read_model(str(xml))
    return all(not p.get_partial_shape().is_dynamic for p in model.inputs)


__all__: Sequence[str] = ("FP16_TOLERANCE", "check_npu_constraints", "convert_stage", "cpu_stage", "export_openvino_stage",
                          "ir_inputs_static", "npu_target_record", "quantize_ir", "reference_outputs", "save_ir",
                          "top1_agreement", "verify_ir")
