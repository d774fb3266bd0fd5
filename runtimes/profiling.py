"""Per-stage latency of a loaded cascade on this device, and its record in the manifest."""

from __future__ import annotations

import datetime as _dt
import platform
from typing import Sequence

import numpy as np

from .executor import Cascade, profile_name


def measure_stage_latency(cascade: Cascade, images: Sequence[np.ndarray], repeats: int = 1) -> list[dict]:
    """Run every stage on each image at batch 1; return per-stage ``{p50, p95, mean, n}`` in ms.

    A stage's time includes its own input preparation (resize and normalisation of the image,
    or handing over the carry), which is what the executor pays per stage.
    """
    times: list[list[float]] = [[] for _ in cascade.stage_names]
    for _ in range(repeats):
        for image in images:
            for k, record in enumerate(cascade.run_all_stages(image).trace):
                times[k].append(record.latency_ms)
    return [{"p50": float(np.median(t)), "p95": float(np.quantile(t, 0.95)), "mean": float(np.mean(t)), "n": len(t)}
            for t in times]


def record_profile(manifest: dict, cascade: Cascade, stats: list[dict]) -> str:
    """Store ``stats`` in ``manifest`` as this device's profile; returns the profile's name."""
    name = profile_name(cascade.runtime, cascade.threads, cascade.device)
    manifest.setdefault("profiles", {})[name] = {
        "runtime": cascade.runtime, "device": cascade.device, "threads": cascade.threads or 0,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": _dt.date.today().isoformat()}
    for spec, s in zip(manifest["stages"], stats):
        spec["cost"].setdefault("latency_ms", {})[name] = {"p50": s["p50"], "p95": s["p95"], "n": s["n"]}
    return name
