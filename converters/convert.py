"""Conversion jobs: what the CLI's ``convert`` (flags or a TOML config) asks for, and running it.

A TOML config names the same things as the flags::

    name = "effnet-cascade"
    kind = "cascade"                 # or "early_exit"
    out = "effnet.swb"
    data = "path/to/images"          # labelled images (class folders, archive or labels.tsv)

    [[stages]]                       # cascade: one table per stage
    model = "stagewise.converters.zoo:efficientnet_lite0"
    size = 224

    [[stages]]
    model = "stagewise.converters.zoo:efficientnet_lite2"
    size = 260

    [exit]
    score = "max_softmax"
    combine = "mean_probs"

    [build]
    format = "onnx"                  # or several: "onnx,openvino" (old name: backend)
    int8 = true
    target_drop = 0.5                # points of top-1

For ``kind = "early_exit"`` give ``model = "file.py:factory"`` and ``exits = ["layer1", ...]``
at the top level instead of ``[[stages]]``, and optionally how the exits are trained::

    [training]
    mode = "joint"                   # frozen | joint | given (default: given if the model carries heads)
    epochs = 4
    lr = 0.02                        # backbone; head_lr = 0.1 for the heads
    freeze = ["stem"]
    exit_weights = [0.5, 0.75]
    augment = "flip_crop"

For ``kind = "glance_focus"`` (AnchorNet) give one ``[[stages]]`` table (the glance model) and a
``[focus]`` table: ``model``, ``size``, ``patches``, ``iou`` and ``patch_fraction``. Flags given
on the command line win over the file.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stagewise.bundle import check_output, remove_stale_build_dirs
from stagewise.datasets import ImageSet, open_image_set
from stagewise.errors import ConversionError
from stagewise.images import Preprocess

from .build import build_bundle
from .exit_placement import auto_exit_count, choose_exits
from .factory import build_model
from .heads import FineTuning, HeadTraining
from .options import BuildOptions
from .plans import cascade_plans, early_exit_plans, glance_focus_plans
from .source import source_of

#: Images the linear probes of automatic exit placement are fitted on (at most).
PROBE_IMAGES = 5000

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


@dataclass
class StageSource:
    """One source model: a factory spec (``file.py:factory``, ``module:factory``) or the model
    object itself, and, for cascades, its input size."""

    model: Any
    size: int | None = None
    name: str | None = None


def stage_source(stage: Any) -> StageSource:
    """A ``"factory@SIZE"`` string (``--stage``, ``--focus``) or a ``(model, size)`` pair as a :class:`StageSource`."""
    if isinstance(stage, str):
        factory, _, size = stage.rpartition("@")
        if not factory or not size.isdigit():
            raise ConversionError(f"stage {stage!r}: write MODEL@SIZE, e.g. models.py:small@128")
        return StageSource(factory, int(size))
    return StageSource(stage[0], int(stage[1]))


@dataclass
class ConvertJob:
    """Everything a conversion needs; built from flags and/or a TOML config."""

    kind: str
    sources: list[StageSource]
    out: Path
    data: Path | None = None
    calibration_data: Path | None = None
    calibration_fraction: float = 0.2
    max_head_images: int | None = None
    max_calibration_images: int | None = None
    exits: list[str] = field(default_factory=list)
    name: str | None = None
    input: dict = field(default_factory=dict)
    input_size: int | None = None
    score: str = "max_softmax"
    combine: str = "own"
    head: HeadTraining = HeadTraining()
    build: BuildOptions = BuildOptions()
    focus: StageSource | None = None
    patches: int = 3
    iou: float = 0.3
    patch_fraction: float = 0.7


def job_from_toml(path: Path, overrides: dict[str, Any]) -> ConvertJob:
    """Read a TOML conversion config; ``overrides`` (non-None flag values) win over it."""
    try:
        cfg = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConversionError(f"cannot read config {path}: {exc}") from exc
    kind = cfg.get("kind", "cascade" if "stages" in cfg else "early_exit")
    if kind in ("cascade", "glance_focus"):
        sources = [StageSource(s["model"], s.get("size"), s.get("name")) for s in cfg.get("stages", [])]
    else:
        sources = [StageSource(cfg["model"], cfg.get("size"))] if "model" in cfg else []
    if not sources:
        raise ConversionError(f"{path}: give `model = ...` (early exit) or [[stages]] tables (cascade)")
    build_cfg = cfg.get("build", {})
    exit_cfg = cfg.get("exit", {})
    train_cfg = cfg.get("training", {})
    focus_cfg = cfg.get("focus", {})
    base = path.parent
    values = {
        "kind": kind, "sources": sources, "name": cfg.get("name"),
        "out": base / cfg["out"] if "out" in cfg else None,
        "data": base / cfg["data"] if "data" in cfg else None,
        "calibration_data": base / cfg["calibration_data"] if "calibration_data" in cfg else None,
        "exits": list(cfg.get("exits", [])), "input": dict(cfg.get("input", {})),
        "score": exit_cfg.get("score", "max_softmax"), "combine": exit_cfg.get("combine", "own"),
        "formats": build_cfg.get("format", build_cfg.get("backend")), "int8": build_cfg.get("int8"),
        "target_drop": build_cfg.get("target_drop"), "threads": build_cfg.get("threads"),
        "fp16": build_cfg.get("fp16"), "npu": build_cfg.get("npu"),
        "int8_io": build_cfg.get("int8_io"), "head_kind": exit_cfg.get("head"),
        "train_exits": train_cfg.get("mode"), "head_width": train_cfg.get("head_width"),
        "epochs": train_cfg.get("epochs"), "lr": train_cfg.get("lr"), "head_lr": train_cfg.get("head_lr"),
        "freeze": ",".join(train_cfg["freeze"]) if isinstance(train_cfg.get("freeze"), list) else train_cfg.get("freeze"),
        "exit_weights": train_cfg.get("exit_weights"), "augment": train_cfg.get("augment"),
        "int8_tolerance": build_cfg.get("int8_tolerance"), "int8_mixed": build_cfg.get("int8_mixed"),
        "focus": StageSource(focus_cfg["model"], focus_cfg.get("size")) if "model" in focus_cfg else None,
        "patches": focus_cfg.get("patches"), "iou": focus_cfg.get("iou"),
        "patch_fraction": focus_cfg.get("patch_fraction"),
    }
    values.update({k: v for k, v in overrides.items() if v is not None and v != () and v != []})
    return make_job(**values)


def head_training(head_kind: str | None = None, train_exits: str | None = None, head_width: int | None = None,
                  epochs: int | None = None, lr: float | None = None, head_lr: float | None = None,
                  freeze: str | None = None, exit_weights: Sequence[float] | None = None,
                  augment: str | None = None) -> HeadTraining:
    """Exit-head settings from flag-style values (None: the default)."""
    tuning = {k: v for k, v in (("epochs", epochs), ("lr", lr), ("head_lr", head_lr), ("freeze", freeze),
                                ("exit_weights", tuple(exit_weights) if exit_weights else None),
                                ("augment", augment)) if v is not None}
    head = {k: v for k, v in (("kind", head_kind), ("mode", train_exits), ("width", head_width)) if v is not None}
    return HeadTraining(**head, tuning=FineTuning(**tuning))


def make_job(kind: str, sources: list[StageSource], out: Path | None, formats: str | None = None,
             int8: bool | None = None, target_drop: float | None = None, threads: int | None = None,
             force: bool = False, fp16: bool | None = None, npu: bool | None = None, int8_io: bool | None = None,
             int8_tolerance: float | None = None, int8_mixed: bool | None = None,
             head_kind: str | None = None, train_exits: str | None = None, head_width: int | None = None,
             epochs: int | None = None, lr: float | None = None, head_lr: float | None = None,
             freeze: str | None = None, exit_weights: Sequence[float] | None = None, augment: str | None = None,
             **fields: Any) -> ConvertJob:
    """A job from flag-style values (``target_drop`` in points, ``formats`` comma-separated)."""
    if out is None:
        raise ConversionError("say where to write the bundle with --out (a directory, or a file ending in .swb)")
    build = BuildOptions(formats=tuple(f.strip() for f in (formats or "onnx").split(",") if f.strip()),
                         int8=bool(int8), default_drop=(0.5 if target_drop is None else target_drop) / 100,
                         threads=threads or 1, overwrite=force, fp16=bool(fp16), npu=bool(npu), int8_io=bool(int8_io),
                         int8_tolerance=0.99 if int8_tolerance is None else int8_tolerance,
                         int8_mixed=True if int8_mixed is None else int8_mixed)
    if "head" not in fields:
        fields["head"] = head_training(head_kind, train_exits, head_width, epochs, lr, head_lr, freeze, exit_weights,
                                       augment)
    return ConvertJob(kind=kind, sources=sources, out=Path(out), build=build,
                      **{k: v for k, v in fields.items() if v is not None})


def _preprocess(job: ConvertJob, model: Any) -> Preprocess:
    spec = {**getattr(model, "stagewise_input", {}), **job.input}
    missing = [k for k in ("mean", "std") if k not in spec]
    if missing:
        raise ConversionError(
            f"the model does not declare its input normalisation; pass --mean and --std (0-255 units), "
            f"missing: {', '.join(missing)}")
    layout = source_of(model).layout
    return Preprocess(mean=tuple(spec["mean"]), std=tuple(spec["std"]), layout=layout,
                      resize=spec.get("resize", "shorter_crop"), crop_fraction=spec.get("crop_fraction", 0.875),
                      interpolation=spec.get("interpolation", "bilinear"))


def _size(job: ConvertJob, source: StageSource, model: Any, images: ImageSet) -> tuple[int, int]:
    size = source.size or job.input_size or getattr(model, "stagewise_input", {}).get("size")
    if size:
        return (size, size) if isinstance(size, int) else tuple(size)
    shapes = {images.image(i).shape[:2] for i in range(min(len(images), 50))}
    if len(shapes) == 1:
        return shapes.pop()
    raise ConversionError("the images have different sizes, so the model's input size is not fixed by them; "
                          "pass --input-size")


def _cap(images: ImageSet, limit: int | None, seed: int) -> ImageSet:
    if limit is None or len(images) <= limit:
        return images
    return images.split([limit / len(images)], seed=seed)[0]


def run_job(job: ConvertJob) -> Path:
    """Convert, calibrate and write the bundle that ``job`` describes; returns its path.

    Before any work: ``job.out`` must be writable, and if it exists, be a stagewise bundle that
    ``job.build.overwrite`` (--force) allows to replace; build folders that killed conversions left
    in the temporary directory are removed.
    """
    if job.out.exists() and not job.build.overwrite:
        raise ConversionError(f"{job.out} already exists; pass --force to replace it")
    check_output(job.out, job.build.overwrite)
    remove_stale_build_dirs()
    if job.data is None:
        raise ConversionError("conversion needs labelled images: pass --data (class folders, archive or labels.tsv)")
    data = open_image_set(job.data)
    if job.calibration_data is not None:
        train, calib = data, open_image_set(job.calibration_data)
    elif job.kind in ("cascade", "glance_focus"):  # no heads to train: every labelled image calibrates
        train, calib = data, data
    else:
        train, calib = data.split([1 - job.calibration_fraction, job.calibration_fraction], seed=job.build.seed)
    calib = _cap(calib, job.max_calibration_images, job.build.seed)
    if job.kind == "early_exit":
        if len(job.sources) != 1 or not job.exits:
            raise ConversionError("an early-exit conversion needs one model and --exits (cut points, comma-separated; "
                                  "`stagewise cuts MODEL` lists them)")
        model = build_model(job.sources[0].model)
        pre = _preprocess(job, model)
        size, head_images = _size(job, job.sources[0], model, train), _cap(train, job.max_head_images, job.build.seed)
        cuts, placement = job.exits, None
        if (max_exits := auto_exit_count(job.exits)) is not None:
            source = source_of(model)
            training = job.head.resolved(model)
            carried = getattr(model, "stagewise_exits", None) if training.mode == "given" else None
            cuts, placement = choose_exits(source, source.prepare(model), pre, size, max_exits,
                                           _cap(head_images, PROBE_IMAGES, job.build.seed), calib, job.build, carried)
        plans = early_exit_plans(model, cuts, pre, size, head_images, job.head, job.score, held_out=calib)
        if placement is not None:
            plans[0].head = dict(plans[0].head, placement=placement)
    elif job.kind == "cascade":
        models = [(s, build_model(s.model, s.size)) for s in job.sources]
        pre = _preprocess(job, models[0][1])
        named = [(s.name or f"stage{k}", m, _size(job, s, m, calib)) for k, (s, m) in enumerate(models)]
        plans = cascade_plans(named, job.combine, job.score)
    elif job.kind == "glance_focus":
        if len(job.sources) != 1 or job.focus is None:
            raise ConversionError("a glance-and-focus conversion needs one glance model (--stage MODEL@SIZE) and one "
                                  "focus model (--focus MODEL@SIZE)")
        glance, focus = job.sources[0], job.focus
        models = [(glance, build_model(glance.model, glance.size)), (focus, build_model(focus.model, focus.size))]
        pre = _preprocess(job, models[0][1])
        plans = glance_focus_plans((glance.name or "glance", models[0][1], _size(job, glance, models[0][1], calib)),
                                   (models[1][1], _size(job, focus, models[1][1], calib)), job.patches, job.iou,
                                   job.patch_fraction, job.score)
    else:
        raise ConversionError(f"unknown conversion kind {job.kind!r}; use early_exit, cascade or glance_focus")
    labels = getattr(model if job.kind == "early_exit" else models[0][1], "stagewise_labels", None) or calib.classes
    if len(np.unique(calib.targets)) < 2:
        raise ConversionError("calibration images must cover at least two classes")
    name = job.name or job.out.stem
    return build_bundle(job.out, name, plans, pre, labels, calib, job.build, kind=job.kind)
