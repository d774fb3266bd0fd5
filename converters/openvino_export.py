"""The OpenVINO exporter: IR (``.xml`` + ``.bin``) through ``openvino.convert_model``, verified on OpenVINO, NNCF INT8.

How OpenVINO reads a stage (``BuildOptions.openvino_route``): ``auto`` takes the route measured
best for the source (benchmarks/openvino_conversion.py: for torch stages the ONNX export, about
5-20% closer to PyTorch than converting the module and faster; for Keras stages the SavedModel),
``onnx`` the source's ONNX export, ``native`` the framework model itself (torch module or Keras
SavedModel), ``best`` both, keeping the one closer to the source on the verification inputs.

* ``fp16``: weights stored as fp16 (``save_model(compress_to_fp16=True)``, about half the size);
  the stage still runs in f32 on CPU.
* ``int8``: NNCF post-training quantization (``nncf.quantize``, fast bias correction) on the
  stage's real calibration inputs; when that fails the INT8 gate, the other :func:`recipes`
  (overflow fix on every layer, full bias correction, the mixed preset), and then, within
  ``--int8-search-seconds``, NNCF's accuracy control (``nncf.quantize_with_accuracy_control``,
  validation = the gate's measure on the held-back images) with the best of them, which reverts
  the most harmful layers to float.
* ``npu``: every stage gets a fully static batch-1 input (NPUs compile only static shapes; the
  runtime feeds larger batches row by row), fp16 weights and NNCF's NPU scheme; the chosen IR
  is checked against the NPU constraints (:func:`check_npu_constraints`) and the manifest
  records the check as the artifact's ``target``.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import openvino as ov

from stagewise.errors import ConversionError, VerificationError
from stagewise.extras import require
from stagewise.runtimes.base import LoadOptions

from .export import Exported, Exporter, Judge, SearchClock, StageInputs, TensorSpec, tried_entry, try_recipes
from .options import BuildOptions
from .plans import StagePlan


@dataclass(frozen=True)
class Recipe:
    """One NNCF post-training setting: preset (``performance``: symmetric activations, ``mixed``: asymmetric),
    fast (one step per layer) or full bias correction (NNCF's ``BiasCorrection``, statistics layer by layer),
    the overflow fix (7-bit weights against the int16 saturation of CPUs without VNNI) on the first layer only
    (NNCF's default) or on every layer, and NNCF's channel alignment (cross-layer equalisation of conv pairs)."""

    preset: str = "performance"
    fast_bias_correction: bool = True
    overflow_fix_everywhere: bool = False
    channel_alignment: bool = False

    @property
    def name(self) -> str:
        extras = [text for on, text in ((self.overflow_fix_everywhere, "overflow fix on every layer"),
                                        (self.channel_alignment, "channel alignment")) if on]
        return ", ".join([f"NNCF {self.preset}", f"{'fast' if self.fast_bias_correction else 'full'} bias correction",
                          *extras])


def recipes(options: BuildOptions) -> tuple[Recipe, ...]:
    """The settings the search tries, in order: the chosen preset with fast bias correction, then with the overflow
    fix on every layer, then with full bias correction, then (CPU builds with the performance preset) the mixed
    preset with full bias correction. On this project's benchmarks (``benchmarks/int8_recipes``) the overflow fix
    lifted EfficientNet-Lite0 and full bias correction the CIFAR-10 exits, each at the same speed (docs/int8.md)."""
    chosen = (Recipe(options.openvino_preset), Recipe(options.openvino_preset, overflow_fix_everywhere=True),
              Recipe(options.openvino_preset, False))
    return chosen + ((Recipe("mixed", False),) if options.openvino_preset == "performance" and not options.npu else ())


def _routes(plan: StagePlan, options: BuildOptions) -> tuple[str, ...]:
    route = options.openvino_route
    if route == "auto":
        return (plan.adapter.openvino_route,)
    return ("native", "onnx") if route == "best" else (route,)


def _read(plan: StagePlan, example: np.ndarray, workdir: Path, route: str) -> Any:
    """The stage as an ``ov.Model`` by ``route``, with the manifest's tensor names."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if route == "onnx":
                with tempfile.TemporaryDirectory(dir=workdir) as tmp:
                    path = Path(tmp) / f"{plan.name}.onnx"
                    plan.adapter.export_onnx(plan, example, path)
                    model = ov.convert_model(str(path))
            else:
                model = plan.adapter.export_openvino(plan, example, workdir)
    except ConversionError:
        raise
    except Exception as exc:  # the frontends raise many unrelated types
        raise ConversionError(f"openvino.convert_model failed for stage {plan.name} (route {route}): {exc}") from exc
    names = [next(iter(o.get_names()), "") for o in model.outputs]
    if len(names) != len(plan.output_names):
        raise ConversionError(f"stage {plan.name}: OpenVINO read {len(names)} outputs {names}, expected "
                              f"{plan.output_names}")
    if sorted(names) != sorted(plan.output_names):
        for out, name in zip(model.outputs, plan.output_names):
            out.get_tensor().set_names({name})
    if len(model.inputs) == 1:
        model.inputs[0].get_tensor().set_names({plan.input_name})
    model.set_friendly_name(plan.name)
    return model


def _shape(model: Any, example: np.ndarray, batch: int | None) -> None:
    if len(model.inputs) == 1:
        model.reshape({model.inputs[0]: ov.PartialShape([-1 if batch is None else batch, *example.shape[1:]])})


def _save(model: Any, xml: Path, fp16: bool) -> tuple[Path, Path]:
    ov.save_model(model, str(xml), compress_to_fp16=fp16)
    return xml, xml.with_suffix(".bin")


def float_layers(model: Any) -> list[str]:
    """Convolutions and matrix products of a quantized IR whose inputs are not fake-quantized (kept in float)."""
    kept = []
    for op in model.get_ordered_ops():
        if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul"):
            sources = [op.input_value(i).get_node().get_type_name() for i in range(op.get_input_size())]
            if "FakeQuantize" not in sources:
                kept.append(op.get_friendly_name())
    return kept


def _spec(port: Any) -> TensorSpec:
    shape = port.get_partial_shape()
    return TensorSpec(port.get_any_name(), port.get_element_type().to_dtype().name,
                      tuple(d.get_length() if d.is_static else None for d in shape))


class OpenVinoExporter(Exporter):
    """:class:`~stagewise.converters.export.Exporter` for OpenVINO IR artifacts."""

    format = "openvino"
    runtime = "openvino"
    supports_fp16 = True

    def wants_fp16(self, options: BuildOptions) -> bool:
        return options.fp16 or options.npu

    def load_options(self, threads: int) -> LoadOptions:
        return LoadOptions(threads=threads, device="CPU", extra={"cache_dir": False})

    def export(self, plan: StagePlan, workdir: Path, inputs: StageInputs, options: BuildOptions) -> Exported:
        example = inputs.verify[:1]
        batch = 1 if options.npu else None
        candidates, errors = [], []
        for route in _routes(plan, options):
            model = _read(plan, example, workdir, route)
            _shape(model, example, batch)
            exported = Exported(_save(model, workdir / f"{plan.name}.{route}.xml", False),
                                {"tool": "openvino.convert_model", "route": route,
                                 "openvino": ov.get_version().split("-")[0], "static_batch": batch})
            if len(_routes(plan, options)) == 1:
                return exported
            try:
                record = self.verify(plan, exported, inputs.verify, options.verify_tolerance, options.threads)
            except VerificationError as exc:
                errors.append(str(exc))
                continue
            candidates.append((max(record["max_abs_diff"].values()), route, exported))
        if not candidates:
            raise VerificationError("; ".join(errors))
        _, route, best = min(candidates, key=lambda c: c[0])
        return Exported(best.files, dict(best.record, candidates={r: d for d, r, _ in candidates}))

    def signature(self, files: Sequence[Path]) -> tuple[list[TensorSpec], list[TensorSpec]]:
        model = ov.Core().read_model(str(files[0]))
        return [_spec(p) for p in model.inputs], [_spec(p) for p in model.outputs]

    def fp16(self, plan: StagePlan, fp32: Exported, workdir: Path, example: np.ndarray,
             options: BuildOptions) -> Exported:
        model = ov.Core().read_model(str(fp32.files[0]))
        return Exported(_save(model, workdir / f"{plan.name}.fp16.xml", True), {"weights": "fp16",
                                                                               "compute": "f32 on CPU"})

    def quantize(self, plan: StagePlan, fp32: Exported, workdir: Path, inputs: StageInputs,
                 options: BuildOptions, controlled: bool = False, recipe: Recipe | None = None,
                 tag: str = "int8") -> Exported:
        """NNCF post-training INT8 of the float IR on real stage inputs by ``recipe`` (default: the first of
        :func:`recipes`); ``controlled``: NNCF's accuracy control (``quantize_with_accuracy_control``) reverts
        the layers that cost most to float until the INT8 gate's measure (``options.gate``: top-1 against the
        labels, the float model's probability of the answered class without labels, or agreement) on the
        held-back images drops by no more than the gate allows."""
        recipe = recipe or recipes(options)[0]
        nncf = require("nncf", "openvino-convert", "INT8 OpenVINO artifacts")
        nncf.set_log_level(logging.WARNING)
        parameters = require("nncf.quantization.advanced_parameters", "openvino-convert", "INT8 OpenVINO artifacts")
        model = ov.Core().read_model(str(fp32.files[0]))
        static = model.inputs[0].get_partial_shape()[0]
        batch = static.get_length() if static.is_static else 1
        items = [inputs.calibrate[i:i + batch] for i in range(0, len(inputs.calibrate) - batch + 1, batch)]
        target = "NPU" if options.npu else "CPU"
        per_channel = options.openvino_weights_per_channel
        common = dict(preset=nncf.QuantizationPreset(recipe.preset), target_device=nncf.TargetDevice[target],
                      subset_size=len(items), fast_bias_correction=recipe.fast_bias_correction)
        advanced = parameters.AdvancedQuantizationParameters(
            weights_quantization_params=parameters.QuantizationParameters(per_channel=per_channel),
            disable_channel_alignment=not recipe.channel_alignment,
            **({"overflow_fix": parameters.OverflowFix.ENABLE} if recipe.overflow_fix_everywhere else {}))
        record: dict[str, Any] = {}
        try:
            if not controlled:
                quantized = nncf.quantize(model, nncf.Dataset(items), advanced_parameters=advanced, **common)
            else:
                n = len(inputs.agree) - len(inputs.agree) % batch
                targets = None if inputs.agree_targets is None else inputs.agree_targets[:n]
                reference = self.run(plan, fp32.files, inputs.agree[:n], options.threads)["logits"]
                measure = options.gate.per_image(reference, targets)
                checks = [(inputs.agree[i:i + batch], np.arange(i, i + batch)) for i in range(0, n, batch)]

                def validate(compiled: Any, data: Any) -> tuple[float, list[float]]:
                    output = compiled.output("logits")
                    values = np.concatenate([measure(compiled(x)[output], rows) for x, rows in data])
                    return float(values.mean()), [float(v) for v in values]

                max_drop = options.gate.quantizer_max_drop(n)
                quantized = nncf.quantize_with_accuracy_control(
                    model, nncf.Dataset(items), nncf.Dataset(checks), validate, max_drop=max_drop,
                    drop_type=nncf.DropType.ABSOLUTE, advanced_quantization_parameters=advanced, **common)
                record = {"accuracy_control": "nncf.quantize_with_accuracy_control",
                          "metric": {"accuracy": "top-1" if targets is not None else "float probability of the answer",
                                     "agreement": "top-1 agreement"}[options.gate.rule],
                          "max_drop": max_drop, "float_layers": float_layers(quantized)}
        except Exception as exc:  # NNCF raises many unrelated types
            raise ConversionError(f"NNCF quantization failed for stage {plan.name}: {exc}") from exc
        activations = "symmetric" if recipe.preset == "performance" else "asymmetric"
        files = _save(quantized, workdir / f"{plan.name}.{tag}.xml", self.wants_fp16(options))
        return Exported(files, {"tool": "nncf.quantize", "nncf": nncf.__version__, "format": "OpenVINO FakeQuantize",
                                "target_device": target, "preset": recipe.preset, "recipe": recipe.name,
                                "activations": f"8-bit {activations} per-tensor",
                                "weights": f"int8 symmetric {'per-channel' if per_channel else 'per-tensor'}",
                                "per_channel": per_channel, "fast_bias_correction": recipe.fast_bias_correction,
                                "calibration_images": int(len(items) * batch), "float_layers": [], **record})

    def quantize_mixed(self, plan: StagePlan, fp32: Exported, workdir: Path, inputs: StageInputs,
                       options: BuildOptions, judge: Judge, clock: SearchClock | None = None) -> Exported:
        """Full INT8 by each of :func:`recipes`, the first passing the gate kept; else (time left on the ``clock``)
        NNCF's accuracy control with the best of them. A result with every weighted layer reverted to float is no
        INT8 model: the best full INT8 one is returned instead (the stage then falls back whole). The record's
        ``search`` lists every try."""
        found = try_recipes(recipes(options), lambda k, recipe: self.quantize(plan, fp32, workdir, inputs, options,
                                                                              recipe=recipe, tag=f"int8.r{k}"),
                            judge, clock)
        recipe, full, tried = found.recipe, found.full, found.tried
        if found.met or (clock is not None and clock.expired()):
            return Exported(full.files, dict(full.record, search=tried))
        mixed = self.quantize(plan, fp32, workdir, inputs, options, True, recipe=recipe, tag="mixed")
        weighted = float_layers(ov.Core().read_model(str(fp32.files[0])))
        tried.append(tried_entry(f"{recipe.name}, nncf.quantize_with_accuracy_control", mixed, judge(mixed)))
        if len(mixed.record["float_layers"]) < len(weighted):
            return Exported(mixed.files, dict(mixed.record, search=tried))
        tried[-1]["note"] = "every weighted layer reverted to float"
        return Exported(full.files, dict(full.record, search=tried))

    def target(self, files: Sequence[Path], options: BuildOptions) -> dict | None:
        return npu_target_record(files[0]) if options.npu else None


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



