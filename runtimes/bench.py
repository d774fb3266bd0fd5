"""Side-by-side measurement of a bundle's operating points and single stages on labelled images.

Every configuration runs on every image in turn (round robin, batch 1), so a noisy machine
slows all of them alike and the ratios stay meaningful.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from stagewise.calibration import ExitTable
from stagewise.progress import progress_bar

from .executor import Cascade, Prediction


def _row(name: str, kind: str, preds: list[Prediction], labels: np.ndarray, stages: int) -> dict:
    ms = np.array([p.elapsed_ms for p in preds])
    top5 = [labels[i] in [c for c, _ in p.top_k(5)] for i, p in enumerate(preds)]
    return {
        "name": name, "kind": kind, "n": len(preds),
        "top1": float(np.mean([p.label == labels[i] for i, p in enumerate(preds)])),
        "top5": float(np.mean(top5)),
        "mean_ms": float(ms.mean()), "p50_ms": float(np.median(ms)), "p95_ms": float(np.quantile(ms, 0.95)),
        "p99_ms": float(np.quantile(ms, 0.99)),
        "exit_histogram": np.bincount([p.stage for p in preds], minlength=stages).tolist(),
    }


def benchmark(cascade: Cascade, images: Sequence[np.ndarray], labels: np.ndarray,
              operating_points: Sequence[str] | None = None, single_stages: bool = True) -> dict:
    """Accuracy, latency and exits of each operating point (and each single stage) on ``images``.

    Returns ``{"rows": [...], "oracle": {...}, ...}``; each operating-point row carries its
    speed-up over ``full`` and over the fastest single stage at least as accurate.
    """
    points = list(operating_points or cascade.operating_points)
    if "full" not in points:
        points.insert(0, "full")
    stages = len(cascade.stage_names)
    runs: dict[tuple[str, str], list[Prediction]] = {("operating_point", p): [] for p in points}
    if single_stages:
        runs.update({("stage_alone", n): [] for n in cascade.stage_names})
    for image in progress_bar(images, f"benchmarking {len(runs)} configurations"):
        for kind, name in runs:
            if kind == "operating_point":
                runs[(kind, name)].append(cascade.predict(image, operating_point=name))
            else:
                runs[(kind, name)].append(cascade.predict_stage(image, cascade.stage_names.index(name)))
    labels = np.asarray(labels)
    rows = [_row(name, kind, preds, labels, stages) for (kind, name), preds in runs.items()]
    full_stage_ms = np.array([np.median([p.trace[k].latency_ms for p in runs[("operating_point", "full")]])
                              for k in range(stages)])
    logits_table = ExitTable.from_logits(cascade.stage_logits(list(images)), labels, full_stage_ms,
                                         *_exit_rules(cascade))
    oracle = logits_table.oracle()
    full = next(r for r in rows if r["name"] == "full" and r["kind"] == "operating_point")
    singles = [r for r in rows if r["kind"] == "stage_alone"]
    for r in rows:
        if r["kind"] != "operating_point":
            continue
        r["speedup_vs_full"] = full["mean_ms"] / r["mean_ms"]
        reaching = [s for s in singles if s["top1"] >= r["top1"]]
        if reaching:
            best = min(reaching, key=lambda s: s["mean_ms"])
            r["equal_accuracy_reference"] = best["name"]
            r["speedup_vs_equal_accuracy_single"] = best["mean_ms"] / r["mean_ms"]
        elif singles:
            r["equal_accuracy_reference"] = None
            r["more_accurate_than_every_single"] = True
    return {"runtime": cascade.runtime, "threads": cascade.threads, "n": len(images), "rows": rows,
            "stage_p50_ms": full_stage_ms.tolist(),
            "oracle": {"top1": oracle.accuracy, "mean_ms": oracle.mean_cost, "exit_rates": list(oracle.exit_rates)}}


def _exit_rules(cascade: Cascade) -> tuple[list[str], list[float], list[str]]:
    specs = [s["exit"] for s in cascade.bundle.manifest["stages"]]
    return [e["score"] for e in specs], [e["temperature"] for e in specs], [e.get("combine", "own") for e in specs]
