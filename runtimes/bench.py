"""Side-by-side measurement of a bundle's operating points and single stages on labelled images.

Every configuration runs on every image in turn (round robin, batch 1), so a noisy machine
slows all of them alike and the ratios stay meaningful.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from stagewise.progress import progress_bar

from .calibrate import exit_table
from .executor import Cascade, Prediction
from .routing import Carries


def latency_stats(preds: Sequence[Prediction]) -> dict:
    """Mean and percentiles (ms) of the end-to-end latency of ``preds``."""
    ms = np.array([p.elapsed_ms for p in preds])
    return {"timed_n": len(ms), "mean_ms": float(ms.mean()), "p50_ms": float(np.median(ms)),
            "p95_ms": float(np.quantile(ms, 0.95)), "p99_ms": float(np.quantile(ms, 0.99))}


def summarize(name: str, kind: str, preds: list[Prediction], labels: np.ndarray, stages: int,
              timed: Sequence[Prediction] | None = None) -> dict:
    """Accuracy, latency percentiles and exit histogram of one configuration's predictions.

    Latency comes from ``timed`` (batch-1 runs on a subset) when given, else from ``preds``.
    """
    labels = np.asarray(labels)
    return {
        "name": name, "kind": kind, "n": len(preds),
        "top1": float(np.mean([p.label == labels[i] for i, p in enumerate(preds)])),
        "top5": float(np.mean([labels[i] in [c for c, _ in p.top_k(5)] for i, p in enumerate(preds)])),
        **latency_stats(preds if timed is None else timed),
        "exit_histogram": np.bincount([p.stage_index for p in preds], minlength=stages).tolist(),
    }


def round_robin(configs: dict[str, Callable[[np.ndarray], Prediction]], images: Sequence[np.ndarray]
                ) -> dict[str, list[Prediction]]:
    """Run every configuration on every image, image by image, so machine noise hits all alike; the order
    rotates by one configuration per image, so none always runs first (cold caches) or right after another."""
    out: dict[str, list[Prediction]] = {name: [] for name in configs}
    names = list(configs)
    for i, image in enumerate(progress_bar(images, f"benchmarking {len(configs)} configurations")):
        for k in range(len(names)):
            name = names[(i + k) % len(names)]
            out[name].append(configs[name](image))
    return out


def compare(rows: list[dict]) -> None:
    """Add to each operating-point row its speed-up over ``full`` and over the fastest single stage or
    reference model that is at least as accurate (or mark it more accurate than every one of them)."""
    full = next((r for r in rows if r["name"] == "full" and r["kind"] == "operating_point"), None)
    singles = [r for r in rows if r["kind"] in ("stage_alone", "reference")]
    for r in rows:
        if r["kind"] != "operating_point":
            continue
        if full is not None:
            r["speedup_vs_full"] = full["mean_ms"] / r["mean_ms"]
        reaching = [s for s in singles if s["top1"] >= r["top1"]]
        if reaching:
            best = min(reaching, key=lambda s: s["mean_ms"])
            r["equal_accuracy_reference"] = best["name"]
            r["speedup_vs_equal_accuracy_single"] = best["mean_ms"] / r["mean_ms"]
        elif singles:
            r["equal_accuracy_reference"] = None
            r["more_accurate_than_every_single"] = True


def benchmark(cascade: Cascade, images: Sequence[np.ndarray], labels: np.ndarray,
              operating_points: Sequence[str] | None = None, single_stages: bool = True,
              references: dict[str, Cascade] | None = None) -> dict:
    """Accuracy, latency and exits of each operating point (and each single stage) on ``images``.

    ``references`` are other bundles (e.g. the plain network the early exits were cut from) run
    in the same round robin at their ``full`` point, as rows of kind ``reference`` that the
    equal-accuracy speed-ups also compare with. Returns ``{"rows": [...], "oracle": {...}, ...}``;
    see :func:`compare` for the speed-ups.
    """
    points = list(operating_points or cascade.operating_points)
    if "full" not in points:
        points.insert(0, "full")
    names = cascade.stage_names
    configs = {("operating_point", p): (lambda im, p=p: cascade.predict(im, operating_point=p)) for p in points}
    if single_stages:
        configs.update({("stage_alone", n): (lambda im, k=k: cascade.predict_stage(im, k)) for k, n in enumerate(names)})
    configs.update({("reference", n): (lambda im, c=c: c.predict(im, operating_point="full"))
                    for n, c in (references or {}).items()})
    runs = round_robin(configs, images)
    rows = [summarize(name, kind, preds, labels, len(names) if kind != "reference" else len(references[name].stage_names))
            for (kind, name), preds in runs.items()]
    compare(rows)
    stage_ms = np.array([np.median([p.trace[k].latency_ms for p in runs[("operating_point", "full")]])
                         for k in range(len(names))])
    oracle = exit_table(cascade, list(images), labels, stage_ms).oracle()
    return {"runtime": cascade.runtime, "threads": cascade.threads, "n": len(images), "rows": rows,
            "stage_p50_ms": stage_ms.tolist(),
            "oracle": {"top1": oracle.accuracy, "mean_ms": oracle.mean_cost, "exit_rates": list(oracle.exit_rates)}}


def ready_inputs(cascade: Cascade, image: np.ndarray) -> list[np.ndarray]:
    """Every stage's input tensor for the decoded ``image`` (carries from running the stages), ready for a backend call."""
    router, carries, tensors = cascade.router, Carries(1), []
    for k, st in enumerate(cascade._stages):
        x = np.ascontiguousarray(router.input(k, [image], carries))
        router.keep(k, st.session.run(x), carries)
        tensors.append(x)
    return tensors


def executor_overhead(cascade: Cascade, images: Sequence[np.ndarray], repeats: int = 3) -> dict:
    """What :meth:`Cascade.predict` costs per stage over calling the stage sessions one after another on ready
    tensors (``session.run``), every stage run (an operating point that never exits): per decoded image, predict,
    the session chain and the image stages' input preparation run in turn (who goes first rotates), ``repeats``
    times after one warm-up round; the overhead is the median of the paired differences (predict - chain -
    preparation) over the stages."""
    stages = cascade._stages
    router = cascade.router
    point = "full" if "full" in cascade.operating_points else None
    ready = [ready_inputs(cascade, im) for im in images]
    sessions = [st.session for st in stages]

    def chain(tensors: list[np.ndarray]) -> None:
        for session, x in zip(sessions, tensors):
            session.run(x)

    def prep(image: np.ndarray) -> None:
        for k in range(len(stages)):
            if router.reads_image(k):
                router.input(k, [image], Carries(1))

    def answer(image: np.ndarray) -> None:
        if point is None:
            cascade.run_all_stages(image)
        else:
            cascade.predict(image, operating_point=point)

    times: dict[str, list[float]] = {"predict": [], "chain": [], "prep": []}
    calls = [("predict", answer), ("chain", chain), ("prep", prep)]
    for r in range(repeats + 1):
        for i, (image, tensors) in enumerate(zip(images, ready)):
            shift = (r + i) % len(calls)
            for name, call in calls[shift:] + calls[:shift]:
                arg = tensors if name == "chain" else image
                t0 = time.perf_counter()
                call(arg)
                if r:  # the first round warms up
                    times[name].append((time.perf_counter() - t0) * 1e6)
    t = {name: np.asarray(v) for name, v in times.items()}
    per_stage = (t["predict"] - t["chain"] - t["prep"]) / len(stages)
    return {"overhead_us_per_stage": float(np.median(per_stage)), "chain_us": float(np.median(t["chain"])),
            "predict_us": float(np.median(t["predict"])), "prep_us": float(np.median(t["prep"])),
            "runs": len(per_stage), "stages": len(stages),
            "graph_decisions": sum(st.decision is not None for st in stages)}
