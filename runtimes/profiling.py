"""Per-stage latency of a loaded cascade on this device, and its record in the manifest."""

from __future__ import annotations

import datetime as _dt
import platform
from typing import Sequence

import numpy as np

from stagewise.machine import cpu_summary

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


def record_profile(manifest: dict, cascade: Cascade, stats: list[dict], name: str | None = None,
                   extra: dict | None = None) -> str:
    """Store ``stats`` in ``manifest`` as a device profile (default name: this runtime/device/threads).

    Each stage gets ``cost.latency_ms[<name>]`` (its step-time distribution); the profile entry
    records the runtime, device, threads, the stages' precisions, the machine and the date,
    plus ``extra`` (for instance ``return_ms`` or the load the device was under).
    """
    name = name or profile_name(cascade.runtime, cascade.threads, cascade.device)
    runtime = RUNTIMES.get(cascade.runtime)
    fmt = runtime.artifact_format if runtime else None
    manifest.setdefault("profiles", {})[name] = {
        "runtime": cascade.runtime, "device": cascade.device, "threads": cascade.threads or 0,
        "precision": [s.get("artifacts", {}).get(fmt, {}).get("precision") for s in manifest["stages"]] if fmt else None,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpu": cpu_summary(),
        "date": _dt.date.today().isoformat(), **(extra or {})}
    if manifest["profiles"][name]["precision"] is None:
        del manifest["profiles"][name]["precision"]
    for spec, s in zip(manifest["stages"], stats):
        spec["cost"].setdefault("latency_ms", {})[name] = dict(s)
    return name
