"""Running a conversion: a :class:`~stagewise.converters.request.ConversionRequest` (what ``stagewise convert``,
its TOML config and :func:`stagewise.converters.convert` ask for) becomes a calibrated bundle (:func:`run_job`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from stagewise.bundle import check_output, remove_stale_build_dirs, update_manifest
from stagewise.datasets import ImageSet, open_image_set
from stagewise.errors import ConversionError
from stagewise.images import Preprocess
from stagewise.progress import note, phase

from .build import build_bundle
from .candidates import (adapt_stage_model, build_cascade, candidate_stages, declared_size, measure_candidates,
                         search_record, with_adaptations)
from .devices import resolve_device
from .distributed import launched_ranks, process_group, rank_device, world
from .exit_placement import auto_exit_count, choose_exits
from .factory import build_model
from .features import FeatureStore
from .new_classes import preview, check_classes, check_training, feature_cut, model_outputs, new_class_plans
from .plans import cascade_plans, early_exit_plans, glance_focus_plans
from .request import ConversionRequest, StageSource
from .search import choose, search_cascades
from .source import AMBIGUOUS, source_of

#: Images the linear probes of automatic exit placement are fitted on (at most).
PROBE_IMAGES = 5000


def _preprocess(job: ConversionRequest, model: Any) -> Preprocess:
    return job.input.preprocess(getattr(model, "stagewise_input", {}), source_of(model).layout)


def _size(job: ConversionRequest, source: StageSource, model: Any, images: ImageSet) -> tuple[int, int]:
    size = source.size or job.input.size or getattr(model, "stagewise_input", {}).get("size")
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


def run_job(job: ConversionRequest) -> Path | None:
    """Convert, calibrate and write the bundle that ``job`` describes; returns its path.

    Launched by ``torchrun`` (:mod:`.distributed`), an early-exit conversion trains its exits on every
    rank together (or in a process group the caller initialised); rank 0 writes the bundle and the other
    ranks return None, having written nothing.

    ``job`` was checked when it was made (names, and which sources its kind needs). Before any work:
    ``job.out`` must be writable, and if it exists, be a stagewise bundle that
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
    data = open_image_set(job.data)
    if job.calibration_data is not None:
        train, calib = data, open_image_set(job.calibration_data)
    elif job.kind in ("cascade", "search", "glance_focus"):  # no heads to train: every labelled image calibrates
        train, calib = data, data
    else:
        train, calib = data.split([1 - job.calibration_fraction, job.calibration_fraction], seed=job.build.seed)
    calib = _cap(calib, job.max_calibration_images, job.build.seed)
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
    else:  # glance and focus
        glance, focus = job.stages[0], job.focus
        models = [(glance, build_model(glance.model, glance.size)), (focus, build_model(focus.model, focus.size))]
        pre = _preprocess(job, models[0][1])
        plans = glance_focus_plans((glance.name or "glance", models[0][1], _size(job, glance, models[0][1], calib)),
                                   (models[1][1], _size(job, focus, models[1][1], calib)), job.steps.patches,
                                   job.steps.iou, job.steps.patch_fraction, job.score)
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


def _early_exit(job: ConversionRequest, train: ImageSet,
                calib: ImageSet) -> tuple[list, Any, Preprocess, ImageSet, ImageSet]:
    """The early-exit plans of ``job`` (exits given or placed automatically; with ``new_classes`` a head
    for the data's classes on every stage), the model, its preprocessing, and the training and
    calibration images (labelled as the model's outputs unless ``new_classes``)."""
    model = build_model(job.model.model)
    pre = _preprocess(job, model)
    size = _size(job, job.model, model, train)
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


def _run_search(job: ConversionRequest, pre: Preprocess, train: ImageSet, calib: ImageSet, unsized: dict[str, Any]) -> Path:
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
