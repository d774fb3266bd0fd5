"""Calibrating a loaded cascade: per-stage logits and latencies on held-out images -> operating points.

Used by the converters (right after export, on the real runtime) and by ``stagewise calibrate``
on an existing bundle, without reconverting. The statistics live in
:func:`stagewise.calibration.calibrate_stages`; this module runs the stages, measures their
latency on this device, writes learned exit-score models into the bundle and rewrites the
manifest atomically (:func:`stagewise.bundle.update_manifest`).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from stagewise.calibration import DEFAULT_DROPS, Calibration, ExitTable, Goal, Settings, calibrate_stages
from stagewise.bundle import update_manifest
from stagewise.datasets import open_image_set
from stagewise.deprecation import renamed_keywords
from stagewise.errors import CalibrationError
from stagewise.exits import load_exit_model
from stagewise.manifest import ArtifactFile, ExitRule, Manifest, StageSpec, freeze, thaw

from .executor import Cascade, profile_name
from .monitor_reference import monitor_reference
from .profiling import measure_stage_latency, record_profile

EXIT_MODEL_DIR = "exits"


def exit_table(cascade: Cascade, images: Sequence[np.ndarray], targets: np.ndarray, stage_costs: np.ndarray) -> ExitTable:
    """Scores and correctness (against ``targets``) of every stage of ``cascade`` on ``images``, with the given stage costs."""
    rules = [s.exit for s in cascade.bundle.manifest.stages]
    models = [load_exit_model(cascade.bundle.root, rule) for rule in rules]
    return ExitTable.from_logits(cascade.stage_logits(images), np.asarray(targets), stage_costs,
                                 [r.score for r in rules], [r.temperature for r in rules],
                                 [r.combine for r in rules], models)


def _store_models(result: Calibration, manifest: Manifest, root: Path, files: dict[str, Path] | None
                  ) -> list[ArtifactFile | None]:
    """Write learned exit-score models as ``exits/<stage>-learned-<sha>.npz`` under ``root``; returns each stage's file."""
    out: list[ArtifactFile | None] = []
    for stage, model in zip(manifest.stages, result.models):
        if model is None:
            out.append(None)
            continue
        buffer = io.BytesIO()
        model.save(buffer)
        data = buffer.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        rel = f"{EXIT_MODEL_DIR}/{stage.name}-learned-{digest[:12]}.npz"
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            part = target.with_name(f".{target.name}.part")
            part.write_bytes(data)
            part.replace(target)
        out.append(ArtifactFile(rel, digest, len(data)))
        if files is not None:
            files[rel] = target
    return out


def apply_calibration(manifest: Manifest, result: Calibration, root: Path, files: dict[str, Path] | None = None,
                      **record: object) -> Manifest:
    """``manifest`` with a :class:`Calibration` in it (exit rules, model files, operating points, and its record
    plus ``record`` as the ``calibration`` record)."""
    models = _store_models(result, manifest, root, files)

    def calibrated(k: int, stage: StageSpec) -> StageSpec:
        rule = ExitRule.from_dict({key: v for key, v in result.exits[k].items() if key != "model"})
        return replace(stage, exit=replace(rule, model=models[k]))

    done = manifest.with_stages(calibrated).with_points(result.points, result.default)
    return replace(done, calibration=freeze({**thaw(manifest.calibration or {}), **result.record, **record}))


def calibrate_manifest(cascade: Cascade, manifest: Manifest, images: Sequence[np.ndarray], targets: np.ndarray | None,
                       origin: str, default_drop: float | None = None, default_budget_ms: float | None = None,
                       target_drops: Sequence[float] = DEFAULT_DROPS, seed: int = 0, profile_images: int = 40,
                       goal: Goal | None = None, settings: Settings | None = None,
                       files: dict[str, Path] | None = None, model_root: Path | None = None,
                       float_logits: list[np.ndarray] | None = None) -> Manifest:
    """Profile the stages on this device, pick operating points on ``images`` and return the new manifest.

    The default operating point follows ``goal`` (see :class:`~stagewise.calibration.Goal`), or
    for compatibility ``default_drop`` (a fraction) / ``default_budget_ms``; without any, ``full``.
    ``targets`` are the images' integer labels; ``None`` calibrates against the full model's own
    answers. Learned exit-score models
    are written under ``model_root`` (default: the loaded bundle's folder) and, when ``files``
    is given, added to it (``{bundle path: local file}``, as :func:`~stagewise.bundle.write_bundle` takes).
    ``float_logits``: every stage's logits on ``images`` in float, for a quantized bundle: drops are then
    measured from the float full model (see :func:`~stagewise.calibration.calibrate_stages`).
    """
    if goal is None:
        if default_budget_ms is not None:
            goal = Goal("budget", default_budget_ms)
        elif default_drop is not None:
            goal = Goal("drop", default_drop)
        else:
            goal = Goal("full", None)
    settings = settings or Settings(target_drops=tuple(target_drops), seed=seed)
    stats = measure_stage_latency(cascade, images[:profile_images])
    profile = profile_name(cascade.runtime, cascade.threads, cascade.device)
    manifest = record_profile(manifest, cascade, stats, name=profile)
    current = [s.exit.to_dict() for s in manifest.stages]
    logits = cascade.stage_logits(images)
    result = calibrate_stages(logits, current, np.array([s["p50"] for s in stats]),
                              None if targets is None else np.asarray(targets), goal, settings, cost_unit="ms",
                              float_logits=float_logits)
    return apply_calibration(manifest, result, Path(model_root or cascade.bundle.root), files,
                             cost=f"latency_ms:{profile}", data=origin,
                             monitor=monitor_reference(result.table, result.points))


@renamed_keywords(backend="runtime", labels="labelled")
def recalibrate(bundle: str | Path, data: str | Path, runtime: str = "auto", threads: int | None = 1,
                target_drop: float | None = None, budget_ms: float | None = None, alpha: float | None = None,
                risk: float | None = None, delta: float | None = None, risk_kind: str = "disagreement",
                labelled: bool = True, settings: Settings | None = None, limit: int | None = None) -> Manifest:
    """``stagewise calibrate``: re-pick a bundle's operating points on ``data``, atomically.

    Exactly one goal: ``target_drop`` (points of top-1), ``budget_ms``, ``alpha`` (Savchenko's
    false-acceptance rate) or ``risk`` with ``delta`` (a guarantee on ``risk_kind``). With
    ``labelled=False`` the images need no labels (a flat folder is fine): the targets are the full
    model's own answers. ``runtime`` is as :func:`stagewise.load` takes it. Returns the new manifest.
    (``backend=`` and ``labels=`` are the deprecated names of ``runtime=`` and ``labelled=``.)
    """
    from .executor import load

    goal = Goal.from_options(target_drop, budget_ms, alpha, risk, delta, risk_kind)
    if goal.kind == "risk" and risk_kind == "error_increase" and not labelled:
        raise CalibrationError("bounding the error increase needs labels; without labels use the disagreement risk")
    images = open_image_set(data, labelled=labelled)
    if limit and limit < len(images):
        images = images.subset(np.sort(np.random.default_rng(0).choice(len(images), limit, replace=False)))
    frames = [images.image(i) for i in range(len(images))]
    bundle = Path(bundle)
    with load(bundle, runtime=runtime, threads=threads) as cascade:
        def change(manifest: Manifest, root: Path) -> Manifest:
            return calibrate_manifest(cascade, manifest, frames, images.targets if labelled else None, images.origin,
                                      goal=goal, settings=settings or Settings(), model_root=root)
        return update_manifest(bundle, change)
