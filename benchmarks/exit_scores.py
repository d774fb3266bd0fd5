"""Exit scores and calibration methods, compared on held-out real data next to the oracle bound.

Two real sequences (see ``calibration_data.py``), each over repeated random calibration / test
splits (mean and standard deviation): CIFAR-10 early exits on a frozen EfficientNet-Lite0 (4
stages; a pool of 4,000 images that trained nothing, 10 stratified splits of 1,500 calibration /
2,500 test) and the ImageNet cascade Lite0@192 -> Lite0@224 -> Lite2@260 (1,000-image sample,
20 random 500 / 500 splits).

1. **Exit scores** (max softmax, margin, entropy, the top logit, the learned score; with and
   without per-stage temperature scaling): thresholds for a top-1 drop of 0.5 / 1 / 2 points
   chosen on the calibration images by the exact per-stage search, then applied to the test
   images: test top-1, its drop from running every stage, mean latency and speed-up; plus each
   score's AUROC for "this stage is already right" on the test images (threshold-free).
2. **Calibration methods** (max softmax + temperature unless said): exact search for a 1-point
   drop with and without temperature and without labels (agreement with the full model),
   Savchenko's alpha (Benjamini-Hochberg) thresholds, the learn-then-test guarantees and the
   learned score.

The oracle (each image leaves at the first stage that is right) is computed on the same test images.

    python -m benchmarks.exit_scores          # writes benchmarks/results/exit_scores.json (and .md)
"""

from __future__ import annotations

import sys
import time

import numpy as np

from benchmarks import harness

NAME = "exit_scores"

DROPS = (0.005, 0.01, 0.02)


def _exits(k: int, combine: str) -> list[dict]:
    return [{"score": "max_softmax", "temperature": 1.0, "combine": combine} for _ in range(k)]


def _thr(point: dict) -> np.ndarray:
    return np.array([np.inf if t is None else t for t in point["thresholds"]])


def _test_table(cal, logits, labels, costs):
    """Scores on the test images with the calibration's fitted temperatures and models."""
    from stagewise.calibration import ExitTable
    from stagewise.exits import all_stage_scores, stage_probabilities

    temps = [e["temperature"] for e in cal.exits]
    combine = [e.get("combine", "own") for e in cal.exits]
    scores = all_stage_scores([e["score"] for e in cal.exits], logits, temps, combine, cal.models)
    probs = stage_probabilities(logits, temps, combine)
    correct = np.stack([p.argmax(1) == labels for p in probs])
    return ExitTable(scores, correct, costs), probs


def _auroc(scores: np.ndarray, right: np.ndarray) -> float:
    pos, neg = scores[right], scores[~right]
    if not len(pos) or not len(neg):
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    allv = np.concatenate([pos, neg])
    # average ranks of ties
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = sums[inv] / counts[inv]
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _apply(point: dict, table, full_cost: float, full_acc: float) -> dict:
    o = table.evaluate(_thr(point))
    return {"top1": o.accuracy, "drop_pts": 100 * (full_acc - o.accuracy), "mean_ms": o.mean_cost,
            "speedup": full_cost / o.mean_cost, "speedup_vs_last_alone": LAST_ALONE[0] / o.mean_cost,
            "exit_rates": list(o.exit_rates)}


LAST_ALONE = [1.0]
"""Latency of the last network alone: the full network (early exit) or the last model (cascade)."""


def compare_scores(cal_logits, cal_labels, test_logits, test_labels, costs, combine: str, seed: int = 0) -> dict:
    from stagewise.calibration import Goal, Settings, calibrate_stages
    from stagewise.exits import SCORES

    k = len(costs)
    rows = {}
    for score in SCORES:
        for temperature in (True, False):
            if score in ("max_logit", "learned") and not temperature:
                continue  # the top logit ignores temperature; the learned score always sees the fitted one
            name = score + ("" if temperature else " (T=1)")
            cal = calibrate_stages(cal_logits, _exits(k, combine), costs, cal_labels, Goal("drop", 0.01),
                                   Settings(score=score, fit_temperature=temperature, target_drops=DROPS,
                                            front_points=0, seed=seed))
            table, probs = _test_table(cal, test_logits, test_labels, costs)
            full = table.full()
            points = {p["name"]: p for p in cal.points}
            rows[name] = {f"drop-{100 * d:g}pt": _apply(points[f"drop-{100 * d:g}pt"], table, full.mean_cost, full.accuracy)
                          for d in DROPS}
            rows[name]["auroc"] = [_auroc(table.scores[j], table.correct[j]) for j in range(k - 1)]
            rows[name]["temperatures"] = cal.record["temperatures"]
    return rows


def compare_methods(cal_logits, cal_labels, test_logits, test_labels, costs, combine: str, seed: int = 0) -> dict:
    from stagewise.calibration import Goal, Settings, calibrate_stages

    k = len(costs)
    methods = {
        "exact search, drop 1pt, T=1": (Goal("drop", 0.01), Settings(fit_temperature=False), True),
        "exact search, drop 1pt, temperature": (Goal("drop", 0.01), Settings(), True),
        "exact search, no labels (agreement >= 99%)": (Goal("drop", 0.01), Settings(), False),
        "Savchenko alpha=0.05": (Goal("alpha", 0.05), Settings(), True),
        "Savchenko alpha=0.1": (Goal("alpha", 0.1), Settings(), True),
        "Savchenko alpha=0.1, no labels": (Goal("alpha", 0.1), Settings(), False),
        "guarantee: error increase <= 1pt, delta=0.1": (Goal("risk", 0.01, 0.1, "error_increase"), Settings(), True),
        "guarantee: error increase <= 2pt, delta=0.1": (Goal("risk", 0.02, 0.1, "error_increase"), Settings(), True),
        "guarantee: disagreement <= 2pt, delta=0.1, no labels": (Goal("risk", 0.02, 0.1), Settings(), False),
        "learned score, drop 1pt": (Goal("drop", 0.01), Settings(score="learned"), True),
    }
    rows = {}
    oracle = None
    for name, (goal, settings, use_labels) in methods.items():
        settings = Settings(**{**settings.__dict__, "target_drops": (), "front_points": 0, "seed": seed})
        cal = calibrate_stages(cal_logits, _exits(k, combine), costs, cal_labels if use_labels else None, goal, settings)
        table, probs = _test_table(cal, test_logits, test_labels, costs)
        full = table.full()
        point = next(p for p in cal.points if p["name"] == cal.default)
        rows[name] = _apply(point, table, full.mean_cost, full.accuracy)
        rows[name]["expected_on_calibration"] = point["expected"]
        if "guarantee" in point:
            g = point["guarantee"]
            rows[name]["guarantee"] = {key: g[key] for key in ("epsilon", "delta", "n", "n_tune", "upper_bound", "risk")}
            exits = table.exit_stage(_thr(point))
            cols = np.arange(len(test_labels))
            if goal.risk == "disagreement":
                answers = np.stack([p.argmax(1) for p in probs])
                rows[name]["test_risk"] = float((answers[exits, cols] != answers[-1]).mean())
            else:
                rows[name]["test_risk"] = float((~table.correct[exits, cols] & table.correct[-1]).mean())
        if oracle is None:
            o = table.oracle()
            oracle = {"top1": o.accuracy, "drop_pts": 100 * (full.accuracy - o.accuracy), "mean_ms": o.mean_cost,
                      "speedup": full.mean_cost / o.mean_cost, "speedup_vs_last_alone": LAST_ALONE[0] / o.mean_cost,
                      "exit_rates": list(o.exit_rates),
                      "full_top1": full.accuracy, "full_ms": full.mean_cost}
    return {"methods": rows, "oracle": oracle}


def _mean_sd(runs: list[dict]) -> dict:
    """Mean and standard deviation of every numeric leaf across repeated splits."""
    def walk(items):
        first = items[0]
        if isinstance(first, dict):
            return {key: walk([it[key] for it in items]) for key in first}
        if isinstance(first, (int, float)):
            return {"mean": float(np.mean(items)), "sd": float(np.std(items))}
        if isinstance(first, list) and first and isinstance(first[0], (int, float)):
            return {"mean": np.mean(items, axis=0).tolist(), "sd": np.std(items, axis=0).tolist()}
        return first
    return walk(runs)


def _v(x, scale=1.0, fmt="{:.2f}") -> str:
    """A value or a {mean, sd} pair, formatted."""
    if isinstance(x, dict) and "mean" in x:
        if abs(x["sd"]) < 1e-9:
            return fmt.format(scale * x["mean"])
        return (fmt + " ± " + fmt).format(scale * x["mean"], scale * x["sd"])
    return fmt.format(scale * x)


def _auroc_mean(a) -> str:
    if isinstance(a, dict):
        return f"{np.nanmean(a['mean']):.3f}"
    return f"{np.nanmean(a):.3f}"


def markdown(out: dict) -> str:
    """The comparison tables as Markdown."""
    lines = []
    for key in ("cifar10", "imagenet_own", "imagenet_mean_probs"):
        if key not in out:
            continue
        d = out[key]
        lines += [f"**{d['sequence']}** — stage latency (ms): "
                  + ", ".join(f"{n} {m:.2f}" for n, m in zip(d["stages"], d["stage_ms"]))
                  + f" ({d['cost_source']}); {d['calibration_images']} calibration / {d['test_images']} test images"
                  + (f", {d['splits']} random splits (mean ± sd)" if "splits" in d else "") + ".", ""]
        lines += [f"Speed-ups against {d['stages'][-1]} alone ({d['last_alone_ms']:.2f} ms)"
                  + (" (the whole network)" if key == "cifar10" else "") + ".", "",
                  "| exit score | " + " | ".join(f"target drop {100 * x:g}pt: test drop (pt) / speed-up" for x in DROPS)
                  + " | AUROC (stage right?) |", "|---|" + "---|" * (len(DROPS) + 1)]
        for name, row in d["scores"].items():
            cells = [f"{_v(row[f'drop-{100 * x:g}pt']['drop_pts'])} / "
                     f"{_v(row[f'drop-{100 * x:g}pt']['speedup_vs_last_alone'])}x" for x in DROPS]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {_auroc_mean(row['auroc'])} |")
        o = d["oracle"]
        lines.append("| *oracle (bound)* | " + " | ".join(f"{_v(o['drop_pts'])} / {_v(o['speedup_vs_last_alone'])}x"
                                                           for _ in DROPS) + " | 1 |")
        lines += ["", "| calibration method | test top-1 | drop vs full (pt) | mean latency (ms) | speed-up vs all stages | "
                  f"speed-up vs {d['stages'][-1]} alone | risk on test (promise) |", "|---|---|---|---|---|---|---|"]
        for name, row in d["methods"].items():
            promise = "-"
            if "guarantee" in row:
                g = row["guarantee"]
                promise = f"{_v(row['test_risk'], 100)}% (<= {_v(g['epsilon'], 100, '{:g}')}%)"
            lines.append(f"| {name} | {_v(row['top1'], 100)}% | {_v(row['drop_pts'])} | {_v(row['mean_ms'])} | "
                         f"{_v(row['speedup'])}x | {_v(row['speedup_vs_last_alone'])}x | {promise} |")
        lines.append(f"| *oracle (bound)* | {_v(o['top1'], 100)}% | {_v(o['drop_pts'])} | {_v(o['mean_ms'])} | "
                     f"{_v(o['speedup'])}x | {_v(o['speedup_vs_last_alone'])}x | - |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = harness.parser(__doc__, f"{NAME}.json", render=True)
    ap.add_argument("--imagenet-splits", type=int, default=20)
    ap.add_argument("--cifar-splits", type=int, default=10)
    args = ap.parse_args()
    if harness.render_only(args, NAME, markdown):
        return
    harness.require_data(args.data, harness.CIFAR10)
    harness.require_data(args.data, harness.IMAGENET)
    from benchmarks import calibration_data

    t0 = time.time()
    out = {**harness.metadata(NAME), "threads": args.threads}

    from stagewise.datasets import stratified_indices

    c = calibration_data.cifar10(args.data, args.threads)
    pool = [np.concatenate([a, b]) for a, b in zip(c["calibration"][0], c["test"][0])]
    pool_labels = np.concatenate([c["calibration"][1], c["test"][1]])
    n_cal = len(c["calibration"][1])
    inet = calibration_data.imagenet(args.data, args.threads)
    datasets = {
        "cifar10": (pool, pool_labels, c, ["own"], args.cifar_splits, n_cal,
                    "EfficientNet-Lite0 (frozen, ImageNet weights) early exits, GAP+L2+logistic-regression heads"),
        "imagenet": (inet["logits"], inet["labels"], inet, ["own", "mean_probs"], args.imagenet_splits,
                     len(inet["labels"]) // 2, "resolution cascade " + " -> ".join(inet["stages"])),
    }
    for name, (logits, labels, src, combines, splits, n_cal, sequence) in datasets.items():
        n = len(labels)
        LAST_ALONE[0] = float(np.sum(src["costs"])) if name == "cifar10" else float(src["costs"][-1])
        for combine in combines:
            score_runs, method_runs = [], []
            for split in range(splits):
                if name == "cifar10":
                    a = stratified_indices(labels, [n_cal / n], seed=split)[0]
                    b = np.setdiff1d(np.arange(n), a)
                else:
                    perm = np.random.default_rng(split).permutation(n)
                    a, b = np.sort(perm[:n_cal]), np.sort(perm[n_cal:])
                cal, tst = [lg[a] for lg in logits], [lg[b] for lg in logits]
                score_runs.append(compare_scores(cal, labels[a], tst, labels[b], src["costs"], combine, split))
                method_runs.append(compare_methods(cal, labels[a], tst, labels[b], src["costs"], combine, split))
            key = name if len(combines) == 1 else f"{name}_{combine}"
            out[key] = {
                "last_alone_ms": LAST_ALONE[0],
                "sequence": sequence + ("" if len(combines) == 1 else f" (stages decide on {combine})"),
                "stages": src["stages"], "stage_ms": src["costs"].tolist(), "cost_source": src["cost_source"],
                "splits": splits, "calibration_images": int(n_cal), "test_images": int(n - n_cal),
                "scores": _mean_sd(score_runs), **_mean_sd(method_runs),
            }
            print(f"{key} done ({time.time() - t0:.0f} s)", file=sys.stderr)
    out["wall_seconds"] = time.time() - t0
    harness.save(out, args.out, markdown)


if __name__ == "__main__":
    main()
