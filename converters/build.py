"""From stage plans to a calibrated bundle.

The pipeline, shared by early-exit and cascade conversions from any source framework:

1. give every stage that reads the image uint8 pixel input (normalisation in its graph,
   :func:`~stagewise.converters.plans.pixel_plan`) and compute each stage's real inputs
   (through the source models, with the runtime's router) for a sample of the calibration images;
2. run the export pipeline (:func:`~stagewise.converters.export.export_stage`) for every stage
   and every requested artifact format: export, check, verify, quantize, keep INT8 only where
   it agrees with the float model;
3. load the exported stages on the real runtime, record every stage's logits on the
   calibration images and each stage's latency on this machine;
4. pick operating points from those logits and latencies and publish the bundle atomically.
"""

from __future__ import annotations

import datetime as _dt
import platform
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

import stagewise
from stagewise.bundle import write_bundle
from stagewise.datasets import ImageSet
from stagewise.deprecation import renamed_keywords
from stagewise.errors import ConversionError
from stagewise.images import Preprocess
from stagewise.manifest import (Artifact, CamGrid, ExitRule, Manifest, OperatingPoint, StageCost, StageInput, StageOutputs,
                                StageSpec, Task, freeze, thaw)
from stagewise.progress import progress_bar
from stagewise.runtimes import load
from stagewise.runtimes.base import RUNTIMES
from stagewise.runtimes.calibrate import calibrate_manifest
from stagewise.runtimes.routing import StageRouter, stage_tensors

from .export import StageInputs, export_stage, exporter
from .options import BuildOptions
from .plans import StagePlan, pixel_plan


def stage_inputs(plans: Sequence[StagePlan], preprocess: Preprocess, images: list[np.ndarray],
                 batch: int = 64) -> list[np.ndarray]:
    """Every stage's input for ``images`` (uint8 pixels or fp32), through the source stages (the runtime's router)."""
    router = StageRouter.from_sources([p.name for p in plans], [p.source for p in plans], preprocess,
                                      cams=[p.cam for p in plans])
    return stage_tensors(router, images, lambda k, x: plans[k].outputs(x), batch).inputs


def calibration_sample(calibration: ImageSet, size: int, seed: int = 0) -> np.ndarray:
    """The indices of a seeded random sample of ``size`` of the ``calibration`` images."""
    return np.random.default_rng(seed).choice(len(calibration), size=size, replace=False)


def sample_stage_inputs(plans: Sequence[StagePlan], preprocess: Preprocess, calibration: ImageSet, size: int,
                        seed: int = 0) -> list[np.ndarray]:
    """Every stage's input (:func:`stage_inputs`) for the :func:`calibration_sample` of ``size`` images: what a
    build quantizes and judges INT8 on."""
    sample = calibration_sample(calibration, size, seed)
    images = [calibration.image(int(i)) for i in progress_bar(sample, "decoding calibration sample")]
    return stage_inputs(plans, preprocess, images)


def primary_runtime(formats: Sequence[str]) -> str:
    """The runtime that reads the first of ``formats`` (the one a build calibrates and profiles on)."""
    for runtime in RUNTIMES.values():
        if runtime.artifact_format == formats[0]:
            return runtime.name
    raise ConversionError(f"no runtime reads {formats[0]!r} artifacts")


@renamed_keywords(labels="classes")
def build_bundle(out: str | Path, name: str, plans: Sequence[StagePlan], preprocess: Preprocess,
                 classes: Sequence[str], calibration: ImageSet, options: BuildOptions = BuildOptions(),
                 kind: str = "early_exit") -> Path:
    """Export, verify, quantize, calibrate on ``calibration`` images and write the bundle at ``out``
    (``classes``: the class names, in target order; ``labels=`` is its deprecated name)."""
    frameworks = {plan.framework for plan in plans}
    if len(frameworks) != 1:
        raise ConversionError(f"all stages must come from one framework; got {sorted(frameworks)}")
    source = plans[0].adapter
    if options.pixel_input:
        plans = [pixel_plan(plan, preprocess) for plan in plans]
    exporters = {fmt: exporter(fmt) for fmt in options.formats}
    if len(calibration) < 20:
        raise ConversionError(f"calibration needs labelled images; got {len(calibration)} (use at least a few hundred)")
    wanted = options.quantization_images + options.agreement_images if options.int8 else options.quantization_images
    n_small = min(len(calibration), max(wanted, 64))
    inputs_per_stage = sample_stage_inputs(plans, preprocess, calibration, n_small, options.seed)
    predicted = plans[-1].outputs(inputs_per_stage[-1][:1])["logits"].shape[1]
    if predicted != len(classes):
        raise ConversionError(f"the model predicts {predicted} classes but {len(classes)} class names were given; "
                              "the images' classes must match the model's outputs")
    # the quantizer calibrates on the first images; the INT8 gate judges on the others (with their labels)
    split = min(options.quantization_images, max(1, n_small // 2))
    held_back = slice(split, None) if n_small > split else slice(None)
    sample_targets = calibration.targets[calibration_sample(calibration, n_small, options.seed)] \
        if options.labelled else None
    inputs = [StageInputs(verify=x[:16], calibrate=x[:split], agree=x[held_back],
                          agree_targets=None if sample_targets is None else sample_targets[held_back])
              for x in inputs_per_stage]

    with tempfile.TemporaryDirectory(prefix="stagewise-build-") as tmp:
        work = Path(tmp)
        stages, files, float_files = [], {}, {}
        for plan, plan_inputs in progress_bar(list(zip(plans, inputs)), "exporting stages"):
            artifacts = {}
            for fmt in options.formats:
                exported = export_stage(exporters[fmt], plan, work / fmt, plan_inputs, options)
                artifacts[fmt] = exported.artifact
                files.update(exported.files)
                float_files.update(exported.float_files)
            stages.append(_stage_spec(plan, artifacts))
        manifest = Manifest(
            name=name,
            producer=freeze({"stagewise": stagewise.__version__, "source_framework": source.framework,
                             "source_version": source.version(),
                             "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "kind": kind}),
            task=Task(tuple(classes), top_k=min(5, len(classes))), input=preprocess, stages=tuple(stages),
            operating_points=(OperatingPoint("full", (None,) * len(stages), freeze({"kind": "full"})),),
            default_operating_point="full")
        staged = write_bundle(work / "staged", manifest, files)
        reference = _float_reference(work / "float", manifest, float_files, options) if options.int8 else None
        manifest = _calibrate_on_runtime(staged, manifest, calibration, options, files, reference)
        return write_bundle(out, manifest, files, overwrite=options.overwrite)


def _float_reference(where: Path, manifest: Manifest, float_files: dict[str, Path], options: BuildOptions
                     ) -> Path | None:
    """A staged copy of the bundle with every stage of the calibrated format in float (``None`` when none of them
    is quantized): the float full model that a quantized bundle's drops are measured from."""
    fmt = options.formats[0]
    if all(stage.artifacts[fmt].precision != "int8" for stage in manifest.stages):
        return None

    def floating(_k: int, stage: StageSpec) -> StageSpec:
        artifact = stage.artifacts[fmt]
        precision = artifact.precision
        if precision == "int8":
            precision = "fp16" if (artifact.quantization or {}).get("float_reference") else "fp32"
        return replace(stage, artifacts={fmt: replace(artifact, precision=precision, quantization=None)})

    return write_bundle(where, manifest.with_stages(floating),
                        {path: f for path, f in float_files.items() if path.startswith(f"{fmt}/")})


def _stage_spec(plan: StagePlan, artifacts: dict[str, dict]) -> StageSpec:
    """The manifest record of one exported stage (its files' sha256 and sizes are filled in when written)."""
    names = {name: name for name in plan.output_names}
    return StageSpec(plan.name, replace(StageInput.from_dict(plan.source), tensor=plan.input_name),
                     {fmt: Artifact.from_dict(a) for fmt, a in artifacts.items()},
                     StageOutputs(names["logits"], names.get("carry"), names.get("cam")), ExitRule.from_dict(plan.exit),
                     StageCost(plan.macs, plan.params), freeze(plan.head) if plan.head else None,
                     CamGrid.from_dict(plan.cam) if plan.cam else None)


def _calibrate_on_runtime(staged: Path, manifest: Manifest, calibration: ImageSet, options: BuildOptions,
                          files: dict | None = None, float_reference: Path | None = None) -> Manifest:
    runtime = primary_runtime(options.formats)
    images = [calibration.image(i) for i in progress_bar(range(len(calibration)), "decoding calibration images")]
    float_logits = None
    if float_reference is not None:
        with load(float_reference, runtime=runtime, threads=options.threads, warmup=False) as floating:
            float_logits = floating.stage_logits(images)
    with load(staged, runtime=runtime, threads=options.threads) as cascade:
        manifest = calibrate_manifest(cascade, manifest, images, calibration.targets if options.labelled else None,
                                      calibration.origin, target_drops=options.target_drops, seed=options.seed,
                                      profile_images=options.profile_images, goal=options.calibration_goal,
                                      settings=options.calibration, files=files, float_logits=float_logits)
    return replace(manifest, producer=freeze({**thaw(manifest.producer), "machine": platform.machine()}))
