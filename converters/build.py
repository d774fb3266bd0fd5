"""From torch stage modules to a calibrated bundle.

The pipeline, shared by early-exit and cascade conversions:

1. compute each stage's real input tensors (fp32 torch) for a few calibration images;
2. export every stage to each requested artifact format, verify it against torch, and
   quantize it to INT8 when asked (a stage whose top-1 agreement with fp32 falls below the
   tolerance stays fp32, and the manifest says so);
3. load the exported stages on the real runtime, record every stage's logits on the
   calibration images and each stage's latency on this machine;
4. pick operating points from those logits and latencies and publish the bundle atomically.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

import stagewise
from stagewise.bundle import write_bundle
from stagewise.datasets import ImageSet
from stagewise.errors import ConversionError
from stagewise.images import Preprocess
from stagewise.progress import progress_bar
from stagewise.runtimes import load
from stagewise.runtimes.base import RUNTIMES
from stagewise.runtimes.calibrate import DEFAULT_DROPS, calibrate_manifest


@dataclass
class StagePlan:
    """One stage ready for export: a model from its input tensor to its outputs.

    ``module`` returns ``logits`` or, when ``has_carry``, ``(carry, logits)``. ``source`` is
    the manifest's stage input without the tensor name: ``{"source": "image", "size": [h, w]}``
    or ``{"source": "carry", "from": <earlier stage name>}``. ``framework`` says what ``module``
    is: ``"torch"`` (an ``nn.Module``, NCHW) or ``"keras"`` (a ``keras.Model``, NHWC; see
    :mod:`stagewise.converters.keras_source`); :func:`stage_runner` runs it.
    """

    name: str
    module: Any
    source: dict
    has_carry: bool
    exit: dict
    macs: int
    params: int
    head: dict | None = None
    framework: str = "torch"

    @property
    def input_name(self) -> str:
        # not "carry": a middle early-exit stage also *outputs* "carry", and ONNX (whose exporter then
        # silently renames the input to "carry.1") and OpenVINO need distinct tensor names
        return "image" if self.source["source"] == "image" else "carry_in"

    @property
    def output_names(self) -> list[str]:
        return ["carry", "logits"] if self.has_carry else ["logits"]


@dataclass(frozen=True)
class BuildOptions:
    """Choices of a conversion. Drops are fractions of top-1 (0.005 = half a point)."""

    formats: tuple[str, ...] = ("onnx",)
    int8: bool = False
    int8_tolerance: float = 0.98
    quantization_images: int = 256
    target_drops: tuple[float, ...] = DEFAULT_DROPS
    default_drop: float = 0.005
    threads: int = 1
    profile_images: int = 40
    verify_tolerance: float = 1e-3
    overwrite: bool = False
    seed: int = 0
    fp16: bool = False  # OpenVINO artifacts: fp16 weights (compute stays f32 on CPU)
    npu: bool = False  # OpenVINO artifacts: NPU preset (static batch-1 shapes, fp16 weights, NPU INT8 scheme)
    int8_io: bool = False  # TFLite artifacts: INT8 models take/return int8 tensors (integer-only NPUs)
    extra: dict = field(default_factory=dict)
    # the calibration suite: a stagewise.calibration.Goal (default: the default_drop point) and Settings
    # (exit score, temperatures, alphas, front points; default: target_drops, temperatures fitted)
    goal: Any = None
    calibration: Any = None
    labelled: bool = True  # False: calibrate against the full model's own answers (labels are ignored)


@dataclass
class StageInputs:
    """Real fp32 inputs of one stage: for verification, quantization and agreement checks."""

    verify: np.ndarray
    calibrate: np.ndarray
    agree: np.ndarray


Exporter = Callable[[StagePlan, Path, StageInputs, BuildOptions], tuple[dict, dict[str, Path]]]


def torch_stage_inputs(plans: Sequence[StagePlan], preprocess: Preprocess, images: list[np.ndarray],
                       batch: int = 64) -> list[np.ndarray]:
    """Every stage's fp32 input tensor for ``images``, computed through the torch stages."""
    import torch

    per_stage: list[list[np.ndarray]] = [[] for _ in plans]
    index = {p.name: k for k, p in enumerate(plans)}
    with torch.no_grad():
        for i in range(0, len(images), batch):
            chunk = images[i:i + batch]
            carries: dict[int, torch.Tensor] = {}
            for k, plan in enumerate(plans):
                if plan.source["source"] == "image":
                    x = torch.from_numpy(preprocess.tensor(chunk, tuple(plan.source["size"])))
                else:
                    x = carries[index[plan.source["from"]]]
                per_stage[k].append(x.numpy())
                out = plan.module(x)
                if plan.has_carry:
                    carries[k] = out[0]
    return [np.concatenate(xs) for xs in per_stage]


class TorchRunner:
    """How the pipeline runs torch stage modules: stage inputs, named outputs and the version."""

    framework = "torch"

    @staticmethod
    def version() -> str:
        import torch

        return torch.__version__

    @staticmethod
    def stage_inputs(plans: Sequence[StagePlan], preprocess: Preprocess, images: list[np.ndarray]) -> list[np.ndarray]:
        return torch_stage_inputs(plans, preprocess, images)

    @staticmethod
    def outputs(plan: StagePlan, x: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        with torch.no_grad():
            out = plan.module.eval()(torch.from_numpy(np.ascontiguousarray(x)))
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {name: o.numpy() for name, o in zip(plan.output_names, out)}


RUNNERS: dict[str, str] = {
    "torch": "stagewise.converters.build:TorchRunner",
    "keras": "stagewise.converters.keras_source:KerasRunner",
}
"""Source frameworks: each runner has ``version()``, ``stage_inputs(plans, preprocess, images)``
and ``outputs(plan, x) -> {name: array}`` (numpy in, numpy out)."""


def stage_runner(framework: str) -> Any:
    """The runner of a source ``framework`` (``"torch"`` or ``"keras"``), imported on first use."""
    if framework not in RUNNERS:
        raise ConversionError(f"unknown source framework {framework!r}; choose from {', '.join(RUNNERS)}")
    module, _, name = RUNNERS[framework].partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ConversionError(f"{framework} source models need a package that is not installed ({exc}); "
                              f'install it with pip install "stagewise[{framework}]"') from exc


def export_onnx_stage(plan: StagePlan, workdir: Path, inputs: StageInputs, options: BuildOptions) -> tuple[dict, dict[str, Path]]:
    """ONNX artifact of one stage (fp32, or INT8 QDQ when it keeps agreement with fp32)."""
    import torch

    from .onnx_export import export_onnx, verify_onnx

    fp32 = workdir / f"{plan.name}.onnx"
    example = torch.from_numpy(inputs.verify[:1])
    export_onnx(plan.module, example, fp32, plan.input_name, plan.output_names)
    verification = verify_onnx(fp32, plan.module, torch.from_numpy(inputs.verify), plan.input_name,
                               plan.output_names, options.verify_tolerance)
    return finish_onnx_artifact(plan, fp32, inputs, options, {"precision": "fp32", "verification": verification})


def finish_onnx_artifact(plan: StagePlan, fp32: Path, inputs: StageInputs, options: BuildOptions,
                         artifact: dict) -> tuple[dict, dict[str, Path]]:
    """Quantize a verified fp32 ONNX stage when asked, keep INT8 only if it agrees with fp32
    (:func:`keep_int8`), and list the chosen file in ``artifact``."""
    from .onnx_quantize import quantize_onnx, top1_agreement

    chosen = fp32
    if options.int8:
        int8 = fp32.with_name(f"{plan.name}.int8.onnx")
        record = quantize_onnx(fp32, int8, plan.input_name, inputs.calibrate)
        artifact["quantization"] = record
        if keep_int8(record, top1_agreement(fp32, int8, plan.input_name, inputs.agree), len(inputs.agree), options):
            artifact["precision"], chosen = "int8", int8
    rel = f"onnx/{chosen.name}"
    artifact["files"] = [{"path": rel}]
    return artifact, {rel: chosen}


def keep_int8(record: dict, agreement: float, images: int, options: BuildOptions) -> bool:
    """The accuracy-aware fallback shared by every exporter: record the INT8 model's top-1
    agreement with fp32 in ``record`` and say whether it reaches ``options.int8_tolerance``."""
    kept = agreement >= options.int8_tolerance
    record.update(agreement_with_fp32=agreement, agreement_images=int(images), tolerance=options.int8_tolerance,
                  kept_fp32=not kept)
    return kept


EXPORTERS: dict[str, str] = {
    "onnx": "stagewise.converters.build:export_onnx_stage",
    "openvino": "stagewise.converters.openvino_export:export_openvino_stage",
    "tflite": "stagewise.converters.tflite_export:export_tflite_stage",
}

FRAMEWORK_EXPORTERS: dict[str, dict[str, str]] = {
    "torch": EXPORTERS,
    "keras": {
        "onnx": "stagewise.converters.keras_export:export_onnx_keras_stage",
        "openvino": "stagewise.converters.keras_export:export_openvino_keras_stage",
        "tflite": "stagewise.converters.tflite_export:export_tflite_stage",
    },
}
"""Exporters per source framework (see docs/litert.md for the source -> backend matrix)."""


def exporter(artifact_format: str, framework: str = "torch") -> Exporter:
    """The export function for ``artifact_format`` from ``framework`` stages, imported on first use."""
    table = FRAMEWORK_EXPORTERS.get(framework, {})
    if artifact_format not in table:
        raise ConversionError(f"unknown artifact format {artifact_format!r} for {framework} models; "
                              f"choose from {', '.join(table)}")
    module, _, name = table[artifact_format].partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ConversionError(f"exporting {artifact_format!r} artifacts needs a package that is not installed ({exc}); "
                              f'install it with pip install "stagewise[{artifact_format if framework == "torch" else framework}]"'
                              ) from exc


def _primary_runtime(formats: Sequence[str]) -> str:
    for runtime in RUNTIMES.values():
        if runtime.artifact_format == formats[0]:
            return runtime.name
    raise ConversionError(f"no runtime reads {formats[0]!r} artifacts")


def build_bundle(out: str | Path, name: str, plans: Sequence[StagePlan], preprocess: Preprocess,
                 labels: Sequence[str], calibration: ImageSet, options: BuildOptions = BuildOptions(),
                 kind: str = "early_exit", source_framework: str | None = None) -> Path:
    """Export, verify, quantize, calibrate on ``calibration`` images and write the bundle at ``out``."""
    frameworks = {plan.framework for plan in plans}
    if len(frameworks) != 1 or (source_framework or next(iter(frameworks))) not in frameworks:
        raise ConversionError(f"all stages must come from one framework; got {sorted(frameworks)}"
                              + (f" for source_framework={source_framework!r}" if source_framework else ""))
    source_framework = next(iter(frameworks))
    runner = stage_runner(source_framework)
    exporters = {fmt: exporter(fmt, source_framework) for fmt in options.formats}
    if len(calibration) < 20:
        raise ConversionError(f"calibration needs labelled images; got {len(calibration)} (use at least a few hundred)")
    rng = np.random.default_rng(options.seed)
    n_small = min(len(calibration), max(options.quantization_images, 64))
    sample = rng.choice(len(calibration), size=n_small, replace=False)
    images = [calibration.image(int(i)) for i in progress_bar(sample, "decoding calibration sample")]
    stage_inputs = runner.stage_inputs(plans, preprocess, images)
    classes = runner.outputs(plans[-1], stage_inputs[-1][:1])["logits"].shape[1]
    if classes != len(labels):
        raise ConversionError(f"the model predicts {classes} classes but {len(labels)} labels were given; "
                              "the images' classes must match the model's outputs")
    half = max(1, n_small // 2)
    inputs = [StageInputs(verify=x[:16], calibrate=x[:half], agree=x[half:] if n_small > half else x) for x in stage_inputs]

    with tempfile.TemporaryDirectory(prefix="stagewise-build-") as tmp:
        work = Path(tmp)
        stages, files = [], {}
        for plan, plan_inputs in progress_bar(list(zip(plans, inputs)), "exporting stages"):
            artifacts = {}
            for fmt in options.formats:
                (work / fmt).mkdir(exist_ok=True)
                artifacts[fmt], produced = exporters[fmt](plan, work / fmt, plan_inputs, options)
                files.update(produced)
            stages.append(_stage_entry(plan, artifacts))
        manifest = {
            "format": "stagewise-bundle", "format_version": 1, "name": name,
            "producer": {"stagewise": stagewise.__version__, "source_framework": source_framework,
                         "source_version": runner.version(),
                         "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "kind": kind},
            "task": {"type": "classification", "labels": list(labels), "top_k": min(5, len(labels))},
            "input": preprocess.to_manifest(),
            "stages": stages,
            "operating_points": [{"name": "full", "thresholds": [None] * len(stages), "goal": {"kind": "full"}}],
            "default_operating_point": "full",
        }
        staged = write_bundle(work / "staged", manifest, files)
        manifest = _calibrate_on_runtime(staged, manifest, calibration, options, files)
        return write_bundle(out, manifest, files, overwrite=options.overwrite)


def _stage_entry(plan: StagePlan, artifacts: dict) -> dict:
    source = dict(plan.source, tensor=plan.input_name)
    entry = {"name": plan.name, "input": source, "artifacts": artifacts,
             "outputs": {name: name for name in plan.output_names}, "exit": plan.exit,
             "cost": {"macs": plan.macs, "params": plan.params}}
    if plan.head:
        entry["head"] = plan.head
    return entry


def _calibrate_on_runtime(staged: Path, manifest: dict, calibration: ImageSet, options: BuildOptions,
                          files: dict | None = None) -> dict:
    with load(staged, backend=_primary_runtime(options.formats), threads=options.threads) as cascade:
        images = [calibration.image(i) for i in progress_bar(range(len(calibration)), "decoding calibration images")]
        manifest = calibrate_manifest(cascade, manifest, images, calibration.labels if options.labelled else None,
                                      calibration.origin, default_drop=options.default_drop,
                                      target_drops=options.target_drops, seed=options.seed,
                                      profile_images=options.profile_images, goal=options.goal,
                                      settings=options.calibration, files=files)
    manifest["producer"]["machine"] = platform.machine()
    return manifest
