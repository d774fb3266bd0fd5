"""Candidate stages for the cascade search: built, adapted, measured on the real runtime, and the chosen cascade built.

The pipeline around :mod:`~stagewise.converters.search` (which is numpy only):

1. :func:`candidate_stages`: every ``(factory, size, adaptation)`` built at its size and adapted
   (:mod:`~stagewise.converters.adapt`) on the adaptation images;
2. :func:`measure_candidates`: each candidate exported as a one-stage bundle through the normal
   pipeline (:func:`~stagewise.converters.build.build_bundle`: pixel input, verification, INT8 when
   asked), loaded on the runtime of the first requested format, its logits recorded on the
   calibration images and its step latency timed on this device, every candidate image by image
   in turn (round robin), so machine noise hits them alike;
3. :func:`build_cascade`: the chosen cascade built as a bundle, with the searched points of its
   stages as operating points ``search-1``, ``search-2``, ... (the chosen one the default), each
   stage's adaptation record and the search record (``producer.search``).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stagewise.bundle import update_manifest
from stagewise.calibration import threshold_point
from stagewise.datasets import ImageSet
from stagewise.deprecation import renamed_keywords
from stagewise.errors import ConversionError
from stagewise.exits import stage_probabilities
from stagewise.images import Preprocess
from stagewise.manifest import Manifest, freeze, thaw
from stagewise.progress import progress_bar
from stagewise.runtimes import load

from .adapt import Adaptation, adapt
from .build import primary_runtime, build_bundle
from .factory import build_model
from .options import BuildOptions
from .plans import cascade_plans
from .search import Candidate, CascadePoint, SearchResult, sequence_table


@dataclass
class StageCandidate:
    """A model built for one input ``size`` (``adaptation``: its record, ``{"kind": "none"}`` when plain).

    ``group`` names the model at that size, shared by its plain and adapted versions.
    """

    name: str
    model: Any
    size: tuple[int, int]
    group: str
    adaptation: dict


def declared_size(model: Any) -> tuple[int, int] | None:
    """The input size a model declares in ``stagewise_input["size"]`` (None when it declares none)."""
    size = getattr(model, "stagewise_input", {}).get("size")
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _short(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", spec.rpartition(":")[2])


def adapt_stage_model(model: Any, spec: Any, size: tuple[int, int], kind: str, preprocess: Preprocess,
                      images: ImageSet, adaptation: Adaptation = Adaptation(),
                      teachers: dict[str, Any] | None = None) -> dict:
    """Adapt ``model`` (built from ``spec`` for ``size``) with ``kind`` on ``images``; returns its record.

    ``head`` distils from ``spec``'s own build without a size (so ``spec`` must be a factory), at
    the size that build declares or ``adaptation.teacher_size``; ``teachers`` caches those builds.
    """
    if kind == "none":
        return {"kind": "none"}
    teacher, own = None, None
    if kind == "head" and isinstance(spec, str):
        teachers = {} if teachers is None else teachers
        if spec not in teachers:
            teachers[spec] = build_model(spec)
        teacher = teachers[spec]
        own = (adaptation.teacher_size,) * 2 if adaptation.teacher_size else declared_size(teacher)
    return adapt(model, replace(adaptation, kind=kind), preprocess, size, images, teacher, own)


def candidate_stages(stages: Sequence[tuple[str, int, str]], preprocess: Preprocess, images: ImageSet,
                     adaptation: Adaptation = Adaptation(), teachers: dict[str, Any] | None = None
                     ) -> list[StageCandidate]:
    """Every ``(factory spec, size, adaptation kind)`` built and adapted on ``images`` (see
    :func:`adapt_stage_model`; ``teachers``: factory builds without a size, by spec, reused).

    Names are ``<factory>_<size>``, plus ``_<kind>`` when adapted.
    """
    teachers = {} if teachers is None else teachers
    out = []
    for spec, size, kind in stages:
        if not isinstance(spec, str):
            raise ConversionError("the cascade search builds each model at several sizes, so give models as factories "
                                  "(file.py:factory or module:factory), not model objects")
        group = f"{_short(spec)}_{size}"
        model = build_model(spec, size)
        record = adapt_stage_model(model, spec, (size, size), kind, preprocess, images, adaptation, teachers)
        out.append(StageCandidate(group if kind == "none" else f"{group}_{kind}", model, (size, size), group, record))
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ConversionError(f"two candidates have the same name ({names}); name each factory differently")
    return out


@renamed_keywords(labels="classes")
def measure_candidates(stages: Sequence[StageCandidate], preprocess: Preprocess, classes: Sequence[str],
                       calibration: ImageSet, options: BuildOptions, timing_images: int = 50,
                       images: Sequence[np.ndarray] | None = None, work: Path | None = None) -> list[Candidate]:
    """Each candidate's logits on ``calibration`` and step latency (median ms) on this device's runtime.

    ``images``: the calibration images already decoded (else they are decoded here); ``work``: where
    the one-stage bundles are written (default: a temporary folder removed afterwards).
    """
    if work is None:
        with tempfile.TemporaryDirectory(prefix="stagewise-candidates-") as tmp:
            return measure_candidates(stages, preprocess, classes, calibration, options, timing_images, images, Path(tmp))
    quantizer = options.quantization_images + options.agreement_images if options.int8 else 64
    small = calibration if len(calibration) <= quantizer else calibration.split([quantizer / len(calibration)],
                                                                               seed=options.seed)[0]
    one = replace(options, overwrite=True, profile_images=2)
    paths = []
    for stage in stages:
        path = work / stage.name
        build_bundle(path, stage.name, cascade_plans([(stage.name, stage.model, stage.size)]), preprocess, classes,
                     small, one, kind="cascade")
        paths.append(path)
    if images is None:
        images = [calibration.image(i) for i in progress_bar(range(len(calibration)), "decoding calibration images")]
    cascades = [load(p, runtime=primary_runtime(options.formats), threads=options.threads) for p in paths]
    try:
        logits = [c.stage_logits(images)[0] for c in progress_bar(cascades, "candidate logits")]
        timed = images[:max(1, min(timing_images, len(images)))]
        ms: list[list[float]] = [[] for _ in cascades]
        for image in progress_bar(timed, f"timing {len(cascades)} candidates (round robin)"):
            for k, c in enumerate(cascades):
                ms[k].append(c.run_all_stages(image).trace[0].latency_ms)
    finally:
        for c in cascades:
            c.close()
    return [Candidate(s.name, lg, float(np.median(t)), s.group) for s, lg, t in zip(stages, logits, ms)]


def search_record(result: SearchResult, candidates: Sequence[Candidate], stages: Sequence[StageCandidate],
                  chosen: CascadePoint, calibration: ImageSet, target_drop: float, max_stages: int,
                  combines: Sequence[str], timing_images: int) -> dict:
    """What ``producer.search`` keeps: the candidates as measured, the front, the chosen point and the settings."""
    kinds = {s.name: s.adaptation["kind"] for s in stages}
    sizes = {s.name: list(s.size) for s in stages}
    reference = result.best_single()
    return {"candidates": [{"name": c.name, "size": sizes[c.name], "adaptation": kinds[c.name], "cost_ms": c.cost,
                            "accuracy": result.accuracy[c.name], "temperature": result.temperatures[c.name]}
                           for c in candidates],
            "cascades_searched": result.cascades, "front": [p.to_dict() for p in result.front],
            "chosen": result.front.index(chosen), "max_stages": max_stages, "combines": list(combines),
            "target_drop": target_drop, "reference": {"candidate": reference, "accuracy": result.accuracy[reference]},
            "n": len(calibration), "data": calibration.origin, "timing_images": min(timing_images, len(calibration)),
            "cost": "median step latency (ms) on the first format's runtime, candidates timed round robin"}


@renamed_keywords(labels="classes")
def build_cascade(out: Path, name: str, point: CascadePoint, result: SearchResult, stages: Sequence[StageCandidate],
                  candidates: Sequence[Candidate], preprocess: Preprocess, classes: Sequence[str], calibration: ImageSet,
                  options: BuildOptions, record: dict, score: str = "max_softmax") -> Path:
    """Build the cascade of ``point`` and give it the searched points of its stages (``search-1``...; ``point``
    the default), each stage's adaptation record and ``producer.search = record``.

    ``candidates`` hold the logits the search used, on the same ``calibration`` images the build
    calibrates on; each point's expected figures are recomputed with the bundle's own
    temperatures and measured stage latencies.
    """
    by_name = {s.name: s for s in stages}
    logits = {c.name: c.logits for c in candidates}
    chosen = [by_name[n] for n in point.stages]
    plans = cascade_plans([(s.name, s.model, s.size) for s in chosen], combine=point.combine, score=score)
    path = build_bundle(out, name, plans, preprocess, classes, calibration, options, kind="cascade")
    mine = same_cascade(result, point)

    def change(manifest: Manifest, root: Path) -> Manifest:
        profile = manifest.calibration["cost"].split(":", 1)[1]
        costs = [s.cost.latency(profile).p50 for s in manifest.stages]
        temps = [s.exit.temperature for s in manifest.stages]
        targets = np.asarray(calibration.targets)
        stage_logits = [logits[n] for n in point.stages]
        labelled = sequence_table(stage_logits, targets, costs, temps, point.combine, score)
        full = stage_probabilities(stage_logits, temps, ["own"] + [point.combine] * (len(temps) - 1))[-1]
        agree = sequence_table(stage_logits, full.argmax(axis=1), costs, temps, point.combine, score)
        searched = [threshold_point(point_name(result, p), np.array(p.thresholds),
                                    {"kind": "search", "rank": i, "reference": "labels", "searched_accuracy": p.accuracy,
                                     "searched_mean_cost": p.mean_cost}, agree, labelled, "ms")
                    for i, p in enumerate(mine, start=1)]
        manifest = manifest.with_points([*manifest.operating_points, *searched], point_name(result, point))
        manifest = replace(manifest, producer=freeze({**thaw(manifest.producer), "search": record}))
        return with_adaptations(manifest, [s.adaptation for s in chosen])

    update_manifest(path, change)
    return path


def same_cascade(result: SearchResult, point: CascadePoint) -> list[CascadePoint]:
    """The points of the front that run the same stages in the same combine mode as ``point``, cheapest first."""
    return [p for p in result.front if p.stages == point.stages and p.combine == point.combine]


def point_name(result: SearchResult, point: CascadePoint) -> str:
    """The operating point :func:`build_cascade` names ``point`` in its cascade's bundle (``search-<rank>``)."""
    return f"search-{same_cascade(result, point).index(point) + 1}"


def with_adaptations(manifest: Manifest, records: Sequence[dict]) -> Manifest:
    """``manifest`` with each adapted stage's record (in stage order) as its ``adaptation``."""
    return manifest.with_stages(lambda k, stage: stage if k >= len(records) or records[k]["kind"] == "none"
                                else replace(stage, adaptation=freeze(records[k])))
