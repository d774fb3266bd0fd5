"""Per-stage latency of a loaded cascade on this device, and its record in the manifest."""

from __future__ import annotations

import datetime as _dt
import platform
from dataclasses import replace
from types import MappingProxyType
from typing import Sequence

import numpy as np

from stagewise.machine import cpu_summary
from stagewise.manifest import LatencyStats, Manifest, StageSpec, freeze, thaw

from .base import RUNTIMES
from .executor import Cascade, profile_name


def _distribution(t: Sequence[float]) -> dict:
    t = np.asarray(t, dtype=float)
    return {"p50": float(np.median(t)), "p90": float(np.quantile(t, 0.90)), "p95": float(np.quantile(t, 0.95)),
            "p99": float(np.quantile(t, 0.99)), "mean": float(np.mean(t)), "max": float(np.max(t)), "n": len(t)}


def measure_stage_latency(cascade: Cascade, images: Sequence[np.ndarray], repeats: int = 1) -> list[dict]:
    """Run every stage on each image at batch 1; return per-stage ``{p50, p90, p95, p99, mean, max, n}`` in ms.

    A stage's time is its step time as the budget scheduler sees it: its own input preparation
    (resize and normalisation of the image, or handing over the carry), the backend call and
    the exit rule. :func:`measure_return_overhead` measures what follows the last stage.
    """
    times: list[list[float]] = [[] for _ in cascade.stage_names]
    for _ in range(repeats):
        for image in images:
            for k, record in enumerate(cascade.run_all_stages(image).trace):
                times[k].append(record.latency_ms)
    return [_distribution(t) for t in times]


def measure_return_overhead(cascade: Cascade, image: np.ndarray, runs: int = 50) -> dict:
    """Distribution of the time from the end of the last stage run to the answer's return (ms)."""
    samples = []
    for _ in range(runs):
        p = cascade.run_all_stages(image)
        samples.append(max(0.0, p.elapsed_ms - sum(r.latency_ms for r in p.trace)))
    return _distribution(samples)


def record_profile(manifest: Manifest, cascade: Cascade, stats: list[dict], name: str | None = None,
                   extra: dict | None = None) -> Manifest:
    """``manifest`` with ``stats`` stored as a device profile ``name`` (default: this runtime/device/threads,
    :func:`~stagewise.runtimes.executor.profile_name`).

    Each stage gets ``cost.latency_ms[<name>]`` (its step-time distribution); the profile entry
    records the runtime, device, threads, the stages' precisions, the machine and the date,
    plus ``extra`` (for instance ``return_ms`` or the load the device was under).
    """
    name = name or profile_name(cascade.runtime, cascade.threads, cascade.device)
    runtime = RUNTIMES.get(cascade.runtime)
    fmt = runtime.artifact_format if runtime else None
    entry = {"runtime": cascade.runtime, "device": cascade.device, "threads": cascade.threads or 0}
    if fmt:
        entry["precision"] = [s.artifacts[fmt].precision if fmt in s.artifacts else None for s in manifest.stages]
    entry.update(machine=f"{platform.machine()} {platform.processor() or ''}".strip(), cpu=cpu_summary(),
                 date=_dt.date.today().isoformat(), **(extra or {}))

    def timed(k: int, stage: StageSpec) -> StageSpec:
        latency = dict(stage.cost.latency_ms or {}, **{name: LatencyStats.from_dict(stats[k])})
        return replace(stage, cost=replace(stage.cost, latency_ms=MappingProxyType(latency)))

    profiled = manifest.with_stages(timed)
    return replace(profiled, profiles=freeze(dict(thaw(manifest.profiles or {}), **{name: entry})))
