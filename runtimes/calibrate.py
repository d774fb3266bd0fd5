"""Calibrating a loaded cascade: per-stage logits and latencies on held-out images -> operating points."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from stagewise.calibration import ExitTable, calibrate

from .executor import Cascade
from .profiling import measure_stage_latency, record_profile

DEFAULT_DROPS = (0.0, 0.005, 0.01, 0.02)


def exit_table(cascade: Cascade, images: Sequence[np.ndarray], labels: np.ndarray, stage_costs: np.ndarray) -> ExitTable:
    """Scores and correctness of every stage of ``cascade`` on ``images``, with the given stage costs."""
    specs = [s["exit"] for s in cascade.bundle.manifest["stages"]]
    return ExitTable.from_logits(cascade.stage_logits(images), np.asarray(labels), stage_costs,
                                 [e["score"] for e in specs], [e["temperature"] for e in specs],
                                 [e.get("combine", "own") for e in specs])


def calibrate_manifest(cascade: Cascade, manifest: dict, images: Sequence[np.ndarray], labels: np.ndarray,
                       origin: str, default_drop: float | None = None, default_budget_ms: float | None = None,
                       target_drops: Sequence[float] = DEFAULT_DROPS, seed: int = 0, profile_images: int = 40) -> dict:
    """Profile the stages on this device, pick operating points on ``images`` and return the manifest.

    ``default_drop`` (a fraction) or ``default_budget_ms`` chooses the default operating point.
    """
    stats = measure_stage_latency(cascade, images[:profile_images])
    profile = record_profile(manifest, cascade, stats)
    table = exit_table(cascade, images, labels, np.array([s["p50"] for s in stats]))
    drops = sorted(set(target_drops) | ({default_drop} if default_drop is not None else set()))
    budgets = [default_budget_ms] if default_budget_ms is not None else []
    points, default = calibrate(table, drops, budgets, "ms", default_drop=default_drop)
    if default_budget_ms is not None:
        default = points[-1]["name"]
    oracle = table.oracle()
    manifest["operating_points"] = points
    manifest["default_operating_point"] = default
    manifest["calibration"] = {
        "method": "exact per-stage threshold search (coordinate descent)",
        "cost": f"latency_ms:{profile}", "n": int(table.n), "data": origin, "seed": seed,
        "reference_accuracy": table.full().accuracy,
        "stage_accuracy": [float(c.mean()) for c in table.correct],
        "oracle": {"accuracy": oracle.accuracy, "mean_cost": oracle.mean_cost, "exit_rates": list(oracle.exit_rates)},
    }
    return manifest


def recalibrate(bundle: str | Path, data: str | Path, backend: str = "auto", threads: int | None = 1,
                target_drop: float | None = None, budget_ms: float | None = None) -> dict:
    """``stagewise calibrate``: re-pick a bundle's operating points on labelled ``data``, atomically.

    ``target_drop`` is in points of top-1.
    """
    from stagewise.bundle import update_manifest
    from stagewise.datasets import open_image_set

    from .executor import load

    images = open_image_set(data)
    frames = [images.image(i) for i in range(len(images))]
    with load(bundle, backend=backend, threads=threads) as cascade:
        drop = None if target_drop is None else target_drop / 100
        return update_manifest(bundle, lambda m: calibrate_manifest(
            cascade, m, frames, images.labels, images.origin, default_drop=drop, default_budget_ms=budget_ms))
