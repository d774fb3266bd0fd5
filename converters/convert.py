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
at the top level instead of ``[[stages]]``; ``new_classes = true`` classifies the data's own
classes on every stage (:mod:`~stagewise.converters.new_classes`), ``cache = "features/"`` keeps
extracted features for re-runs and ``device = "cuda"`` (auto, cpu, cuda, mps) says where torch
work runs; and optionally how the exits are trained::

    [training]
    mode = "joint"                   # frozen | joint | given (default: given if the model carries heads)
    epochs = 4
    lr = 0.02                        # backbone; head_lr = 0.1 for the heads
    freeze = ["stem"]
    exit_weights = [0.5, 0.75]
    augment = "flip_crop"

A stage may say ``adapt = "bn"`` (or ``"head"``): its model is adapted to its input size first
(:mod:`~stagewise.converters.adapt`). A cascade search (:mod:`~stagewise.converters.candidates`)
replaces ``[[stages]]`` by::

    [search]
    models = ["zoo:efficientnet_lite0", "zoo:efficientnet_lite1", "zoo:efficientnet_lite2"]
    sizes = [128, 160, 192, 224]     # each model at each size (default: the size it declares)
    adapt = "bn"                     # also a BatchNorm-adapted candidate where the size is not the model's own
    max_stages = 3
    combine = ["own", "mean_probs"]

For ``kind = "glance_focus"`` (AnchorNet) give one ``[[stages]]`` table (the glance model) and a
``[focus]`` table: ``model``, ``size``, ``patches``, ``iou`` and ``patch_fraction``. Flags given
on the command line win over the file.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stagewise.bundle import check_output, remove_stale_build_dirs, update_manifest
from stagewise.datasets import ImageSet, open_image_set
from stagewise.errors import ConversionError, unknown_choice
from stagewise.exits import SCORES
from stagewise.images import RESIZERS, Preprocess
from stagewise.progress import note, phase

from .adapt import ADAPTATIONS, Adaptation
from .build import build_bundle
from .candidates import (adapt_stage_model, build_cascade, candidate_stages, declared_size, measure_candidates,
                         search_record, with_adaptations)
from .devices import check_device_name, resolve_device
from .distributed import launched_ranks, process_group, rank_device, world
from .exit_placement import auto_exit_count, choose_exits
from .export import EXPORTERS
from .factory import build_model
from .features import FeatureStore
from .heads import FineTuning, HeadTraining
from .new_classes import preview, check_classes, check_training, feature_cut, model_outputs, new_class_plans
from .options import BuildOptions
from .plans import cascade_plans, early_exit_plans, glance_focus_plans
from .search import COMBINES, choose, search_cascades
from .source import AMBIGUOUS, source_of

#: Images the linear probes of automatic exit placement are fitted on (at most).
PROBE_IMAGES = 5000
#: The kinds of conversion: a ``ConvertJob.kind``.
KINDS = ("early_exit", "cascade", "search", "glance_focus")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


@dataclass
class StageSource:
    """One source model: a factory spec (``file.py:factory``, ``module:factory``) or the model
    object itself, and, for cascades, its input size and how it is adapted to it (one of
    :data:`~stagewise.converters.adapt.ADAPTATIONS`)."""

    model: Any
    size: int | None = None
    name: str | None = None
    adapt: str = "none"


def stage_source(stage: Any, adapt: str | None = None) -> StageSource:
    """A stage as ``--stage``/``--focus`` write it, ``MODEL@SIZE`` or ``MODEL@SIZE+ADAPT`` (``ADAPT``: bn,
    head or none; without it, ``adapt`` or none), or a ``(model, size)`` pair, as a :class:`StageSource`."""
    if not isinstance(stage, str):
        return StageSource(stage[0], int(stage[1]), adapt=adapt or "none")
    spec, _, kind = stage.partition("+")
    factory, _, size = spec.rpartition("@")
    kind = kind or adapt or "none"
    if not factory or not size.isdigit() or kind not in ADAPTATIONS:
        raise ConversionError(f"stage {stage!r}: write MODEL@SIZE or MODEL@SIZE+ADAPT with ADAPT one of "
                              f"{', '.join(ADAPTATIONS)}, e.g. models.py:small@128+bn")
    return StageSource(factory, int(size), adapt=kind)


@dataclass(frozen=True)
class CascadeSearch:
    """What the cascade search tries: each of ``models`` (factory specs) at each of ``sizes`` (none:
    the size each declares), with ``adapt`` (bn, head) also an adapted candidate wherever the size is
    not the model's own; cascades of up to ``max_stages`` in the ``combines`` modes. Latency is the
    median over ``timing_images`` calibration images."""

    models: tuple[str, ...]
    sizes: tuple[int, ...] = ()
    adapt: str = "none"
    max_stages: int = 3
    combines: tuple[str, ...] = COMBINES
    timing_images: int = 50

    def __post_init__(self) -> None:
        if not self.models:
            raise ConversionError("the cascade search needs models: --search a.py:f,b.py:g (factory specs)")
        if self.adapt not in ADAPTATIONS:
            raise ConversionError(unknown_choice("adaptation", self.adapt, ADAPTATIONS))
        for combine in self.combines:
            if combine not in COMBINES:
                raise ConversionError(unknown_choice("combine mode", combine, COMBINES))
        if not 1 <= self.max_stages <= 4:
            raise ConversionError(f"--max-stages must be 1 to 4, got {self.max_stages}")
        if any(size < 1 for size in self.sizes) or self.timing_images < 1:
            raise ConversionError("search sizes and timing images must be positive")


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
    adaptation: Adaptation = Adaptation()
    search: CascadeSearch | None = None
    new_classes: bool = False
    cache: Path | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        """Check every named choice against the names there are, before any model or image is opened."""
        check_device_name(self.device)
        choices = [("conversion kind", self.kind, KINDS), ("exit score", self.score, SCORES),
                   ("combine mode", self.combine, COMBINES), ("resizer", self.input.get("resizer", "pillow"), RESIZERS),
                   *(("artifact format", f, EXPORTERS) for f in self.build.formats)]
        for what, value, names in choices:
            if value not in names:
                raise ConversionError(unknown_choice(what, value, names))


def job_from_toml(path: Path, overrides: dict[str, Any]) -> ConvertJob:
    """Read a TOML conversion config; ``overrides`` (non-None flag values) win over it."""
    try:
        cfg = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConversionError(f"cannot read config {path}: {exc}") from exc
    kind = cfg.get("kind", "search" if "search" in cfg else "cascade" if "stages" in cfg else "early_exit")
    search = None
    if kind == "search":
        table = dict(cfg.get("search", {}))
        if "combine" in table:
            table["combines"] = table.pop("combine")
        try:
            search = CascadeSearch(**{k: tuple(v) if isinstance(v, list) else v for k, v in table.items()})
        except TypeError as exc:
            raise ConversionError(f"{path}: [search] takes models, sizes, adapt, max_stages, combine and "
                                  f"timing_images ({exc})") from exc
        sources = [StageSource(m) for m in search.models]
    elif kind in ("cascade", "glance_focus"):
        sources = [StageSource(s["model"], s.get("size"), s.get("name"), s.get("adapt", "none"))
                   for s in cfg.get("stages", [])]
    else:
        sources = [StageSource(cfg["model"], cfg.get("size"))] if "model" in cfg else []
    if not sources:
        raise ConversionError(f"{path}: give `model = ...` (early exit), [[stages]] tables (cascade) or a [search] table")
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
        "int8_max_drop": build_cfg.get("int8_max_drop"), "int8_tolerance": build_cfg.get("int8_tolerance"),
        "int8_mixed": build_cfg.get("int8_mixed"), "int8_search_seconds": build_cfg.get("int8_search_seconds"),
        "int8_min_speedup": build_cfg.get("int8_min_speedup"),
        "agreement_images": build_cfg.get("agreement_images"),
        "focus": StageSource(focus_cfg["model"], focus_cfg.get("size")) if "model" in focus_cfg else None,
        "patches": focus_cfg.get("patches"), "iou": focus_cfg.get("iou"),
        "patch_fraction": focus_cfg.get("patch_fraction"),
        "search": search,
        "new_classes": cfg.get("new_classes"), "device": cfg.get("device"),
        "cache": base / cfg["cache"] if "cache" in cfg else None,
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
             int8_max_drop: float | None = None, int8_tolerance: float | None = None, int8_mixed: bool | None = None,
             int8_search_seconds: float | None = None, int8_min_speedup: float | None = None,
             agreement_images: int | None = None, head_kind: str | None = None, train_exits: str | None = None, head_width: int | None = None,
             epochs: int | None = None, lr: float | None = None, head_lr: float | None = None,
             freeze: str | None = None, exit_weights: Sequence[float] | None = None, augment: str | None = None,
             **fields: Any) -> ConvertJob:
    """A job from flag-style values (``target_drop`` and ``int8_max_drop`` in points, ``formats`` comma-separated)."""
    if out is None:
        raise ConversionError("say where to write the bundle with --out (a directory, or a file ending in .swb)")
    build = BuildOptions(formats=tuple(f.strip() for f in (formats or "onnx").split(",") if f.strip()),
                         int8=bool(int8), default_drop=(0.5 if target_drop is None else target_drop) / 100,
                         threads=threads or 1, overwrite=force, fp16=bool(fp16), npu=bool(npu), int8_io=bool(int8_io),
                         int8_max_drop=(100 * BuildOptions.int8_max_drop if int8_max_drop is None else int8_max_drop) / 100,
                         int8_tolerance=int8_tolerance,
                         int8_search_seconds=BuildOptions.int8_search_seconds if int8_search_seconds is None
                         else int8_search_seconds,
                         int8_mixed=True if int8_mixed is None else int8_mixed,
                         int8_min_speedup=int8_min_speedup or 0.0,
                         agreement_images=agreement_images or BuildOptions.agreement_images)
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
    preprocess = Preprocess(mean=tuple(spec["mean"]), std=tuple(spec["std"]), layout=layout,
                            resize=spec.get("resize", "shorter_crop"), crop_fraction=spec.get("crop_fraction", 0.875),
                            interpolation=spec.get("interpolation", "bilinear"), resizer=spec.get("resizer", "pillow"))
    preprocess.check_resizer()
    return preprocess


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


def run_job(job: ConvertJob) -> Path | None:
    """Convert, calibrate and write the bundle that ``job`` describes; returns its path.

    Launched by ``torchrun`` (:mod:`.distributed`), an early-exit conversion trains its exits on every
    rank together (or in a process group the caller initialised); rank 0 writes the bundle and the other
    ranks return None, having written nothing.

    Before any work: ``job.out`` must be writable, and if it exists, be a stagewise bundle that
    ``job.build.overwrite`` (--force) allows to replace; build folders that killed conversions left
    in the temporary directory are removed.
    """
    if launched_ranks() > 1 and job.kind != "early_exit":
        raise ConversionError(f"torchrun shares the exit training of an early-exit conversion between processes; a "
                              f"{job.kind} conversion trains no exits: run it as one process, without torchrun")
    if job.out.exists() and not job.build.overwrite:
        raise ConversionError(f"{job.out} already exists; pass --force to replace it")
    check_output(job.out, job.build.overwrite)
    remove_stale_build_dirs()
    if job.data is None:
        raise ConversionError("conversion needs labelled images: pass --data (class folders, archive or labels.tsv)")
    data = open_image_set(job.data)
    if job.calibration_data is not None:
        train, calib = data, open_image_set(job.calibration_data)
    elif job.kind in ("cascade", "search", "glance_focus"):  # no heads to train: every labelled image calibrates
        train, calib = data, data
    else:
        train, calib = data.split([1 - job.calibration_fraction, job.calibration_fraction], seed=job.build.seed)
    calib = _cap(calib, job.max_calibration_images, job.build.seed)
    if job.new_classes and job.kind != "early_exit":
        raise ConversionError("--new-classes builds an early-exit bundle from one model (MODEL, with or without "
                              "--exits); cascades, searches and glance-and-focus keep their models' classes")
    if job.kind == "early_exit":
        with process_group():
            plans, model, pre, train, calib = _early_exit(job, train, calib)
            rank, ranks = world()
        if rank > 0:
            note(f"rank {rank} of {ranks}: training done; rank 0 writes {job.out}")
            return None
    elif job.kind in ("cascade", "search"):
        models = [(s, build_model(s.model, s.size)) for s in job.sources]
        pre = _preprocess(job, models[0][1])
        if job.kind == "search":
            return _run_search(job, pre, train, calib, {s.model: m for s, m in models})
        named = [(s.name or f"stage{k}", m, _size(job, s, m, calib)) for k, (s, m) in enumerate(models)]
        train, calib = _own_classes(models[0][1], pre, named[0][2], train, calib)
        adaptations = [adapt_stage_model(m, s.model, size, s.adapt, pre, train, job.adaptation)
                       for (s, _), (_, m, size) in zip(models, named)]
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
        raise ConversionError(unknown_choice("conversion kind", job.kind, KINDS))
    labels = list(calib.classes) if job.new_classes else _labels(model if job.kind == "early_exit" else models[0][1], calib)
    name = job.name or job.out.stem
    with phase("export, verification and calibration"):
        path = build_bundle(job.out, name, plans, pre, labels, calib, job.build, kind=job.kind)
    if job.kind == "cascade" and any(a["kind"] != "none" for a in adaptations):
        update_manifest(path, lambda manifest, _: with_adaptations(manifest, adaptations))
    return path


def _own_classes(model: Any, pre: Preprocess, size: tuple[int, int], *sets: ImageSet) -> list[ImageSet]:
    """``sets`` labelled as ``model``'s own outputs (:func:`.new_classes.check_classes`: refused, naming
    --new-classes, when their classes are not the model's)."""
    source = source_of(model)
    outputs = model_outputs(source, source.prepare(model), pre, size)
    return [check_classes(model, outputs, images) for images in sets]


def _early_exit(job: ConvertJob, train: ImageSet,
                calib: ImageSet) -> tuple[list, Any, Preprocess, ImageSet, ImageSet]:
    """The early-exit plans of ``job`` (exits given or placed automatically; with ``new_classes`` a head
    for the data's classes on every stage), the model, its preprocessing, and the training and
    calibration images (labelled as the model's outputs unless ``new_classes``)."""
    if len(job.sources) != 1 or not (job.exits or job.new_classes):
        raise ConversionError("an early-exit conversion needs one model and --exits (cut points, comma-separated; "
                              "`stagewise cuts MODEL` lists them)")
    model = build_model(job.sources[0].model)
    pre = _preprocess(job, model)
    size = _size(job, job.sources[0], model, train)
    source = source_of(model)
    prepared = source.prepare(model)
    source.check_formats(prepared, job.build.formats)  # formats the source cannot write, refused before any work
    if job.new_classes:
        check_training(job.head)
        if tuple(train.classes) != tuple(calib.classes):
            raise ConversionError(f"the training and calibration images have different classes ({preview(train.classes)} "
                                  f"vs {preview(calib.classes)}); with --new-classes both name the bundle's classes")
    else:
        train, calib = _own_classes(model, pre, size, train, calib)
    head_images = _cap(train, job.max_head_images, job.build.seed)
    device = rank_device(resolve_device(job.device)) if source.framework == "torch" else "cpu"
    store = FeatureStore(source, prepared, pre, size, job.cache, device)
    training = replace(job.head, tuning=replace(job.head.tuning, device=device))
    feature = feature_cut(source, prepared, size) if job.new_classes else None
    cuts, placement = list(job.exits), None
    if (max_exits := auto_exit_count(job.exits)) is not None:
        resolved = training.resolved(model)
        carried = getattr(model, "stagewise_exits", None) if resolved.mode == "given" and not job.new_classes else None
        with phase("exit placement"):
            cuts, placement = choose_exits(source, prepared, pre, size, max_exits,
                                           _cap(head_images, PROBE_IMAGES, job.build.seed), calib, job.build, carried,
                                           store=store, feature=feature)
    ambiguous = cuts and [c.name for c in source.cut_points(prepared, size) if c.name in cuts and c.layout == AMBIGUOUS]
    if ambiguous:
        raise ConversionError(f"the carry after {', '.join(ambiguous)} is channels-last with its side equal to its "
                              "channel count, so an exit head cannot tell which axes to pool; convert at another input "
                              "size or choose other exits")
    with phase("heads"):
        if job.new_classes:
            plans = new_class_plans(model, cuts, pre, size, head_images, store, training, job.score, feature)
        else:
            plans = early_exit_plans(model, cuts, pre, size, head_images, training, job.score, held_out=calib,
                                     store=store)
    if placement is not None:
        plans[0].head = dict(plans[0].head, placement=placement)
    if store.cache is not None:
        note(f"feature cache {store.cache}: the backbone ran on {store.computed} images, the rest were cached")
    return plans, model, pre, train, calib


def _labels(model: Any, calib: ImageSet) -> list[str]:
    if len(np.unique(calib.targets)) < 2:
        raise ConversionError("calibration images must cover at least two classes")
    return list(getattr(model, "stagewise_labels", None) or calib.classes)


def _run_search(job: ConvertJob, pre: Preprocess, train: ImageSet, calib: ImageSet, unsized: dict[str, Any]) -> Path:
    """Measure every candidate, search the cascades on their logits, build the chosen one (see :class:`CascadeSearch`)."""
    search = job.search
    stages = []
    for spec in search.models:
        own = declared_size(unsized[spec])
        sizes = search.sizes or ((own[0],) if own else ())
        if not sizes:
            raise ConversionError(f"{spec} declares no input size; give the search sizes (--sizes 128,160,...)")
        for size in sizes:
            stages.append((spec, size, "none"))
            if search.adapt != "none" and (own is None or own != (size, size)):
                stages.append((spec, size, search.adapt))
    built = candidate_stages(stages, pre, train, job.adaptation, teachers=dict(unsized))
    labels = _labels(built[0].model, calib)
    candidates = measure_candidates(built, pre, labels, calib, job.build, search.timing_images)
    result = search_cascades(candidates, calib.targets, search.max_stages, search.combines, job.score)
    drop = job.build.default_drop
    chosen = choose(result.front, result.accuracy[result.best_single()] - drop)
    record = search_record(result, candidates, built, chosen, calib, drop, search.max_stages, search.combines,
                           search.timing_images)
    return build_cascade(job.out, job.name or job.out.stem, chosen, result, built, candidates, pre, labels, calib,
                         job.build, record, job.score)
