"""Does the promised guarantee hold on real data? Many random calibration / held-out splits.

For each real sequence (see ``calibration_data.py``) the images are split at random many times
into a calibration draw and a held-out rest. On each draw ``stagewise.calibration`` picks the
risk-controlled operating point (learn-then-test: temperatures, learned parts and the candidate
order on a tune half, fixed-sequence exact binomial tests on the other half) promising
``risk <= epsilon`` with probability ``>= 1 - delta``; the risk is then measured on the held-out
rest. The fraction of draws where it exceeds epsilon should be at most delta. Beside it, the
naive choice (cheapest thresholds whose risk on the whole calibration draw is <= epsilon) and
the speed-up each buys.

* CIFAR-10 early exit (Lite0, 4 stages): pool of 4,000 images (the calibration and test parts),
  draws of 2,000, held-out 2,000.
* ImageNet cascade Lite0@192 -> Lite0@224 -> Lite2@260: pool of 1,000, draws of 500, held-out 500.

The held-out risk is itself an estimate (binomial noise of the held-out rest), so the measured
violation rate slightly overstates true violations when the chosen point sits close to epsilon.

    python -m benchmarks.risk_guarantee      # writes benchmarks/results/risk_guarantee.json (and .md)
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np

from benchmarks import harness

NAME = "risk_guarantee"

CONFIGS = {
    "cifar10": [("disagreement", 0.02), ("disagreement", 0.05), ("error_increase", 0.01), ("error_increase", 0.02)],
    "imagenet": [("disagreement", 0.05), ("disagreement", 0.1), ("error_increase", 0.02), ("error_increase", 0.05)],
}


def one_draw(logits, labels, costs, cal_idx, held_idx, risk: str, eps: float, delta: float, seed: int) -> dict:
    from stagewise.calibration import ExitTable, Goal, Settings, calibrate_stages
    from stagewise.exits import all_stage_scores, stage_probabilities
    from stagewise.calibration.risk import loss_matrix

    k = len(costs)
    exits = [{"score": "max_softmax", "temperature": 1.0, "combine": "own"} for _ in range(k)]
    cal_logits = [lg[cal_idx] for lg in logits]
    use_labels = labels[cal_idx] if risk == "error_increase" else None
    settings = Settings(target_drops=(), front_points=0, seed=seed)
    cal = calibrate_stages(cal_logits, exits, costs, use_labels, Goal("risk", eps, delta, risk), settings)
    point = next(p for p in cal.points if p["name"] == cal.default)
    thr = np.array([np.inf if t is None else t for t in point["thresholds"]])

    def held_out(thresholds, temps, models):
        held = [lg[held_idx] for lg in logits]
        scores = all_stage_scores([e["score"] for e in cal.exits], held, temps, ["own"] * k, models)
        answers = np.stack([p.argmax(1) for p in stage_probabilities(held, temps, ["own"] * k)])
        loss = loss_matrix(answers, answers[-1], labels[held_idx], risk)
        table = ExitTable(scores, ~loss, costs)
        o = table.evaluate(thresholds)
        return 1 - o.accuracy, table.full().mean_cost / o.mean_cost, o.mean_cost

    risk_lt, speed_lt, ms_lt = held_out(thr, [e["temperature"] for e in cal.exits], cal.models)
    # naive: fit temperatures on the whole draw, cheapest thresholds with empirical risk <= eps on it
    naive = calibrate_stages(cal_logits, exits, costs, labels[cal_idx], Goal("full", None),
                             Settings(target_drops=(), front_points=0, seed=seed))
    temps = [e["temperature"] for e in naive.exits]
    cal_scores = all_stage_scores(["max_softmax"] * k, cal_logits, temps, ["own"] * k)
    cal_answers = np.stack([p.argmax(1) for p in stage_probabilities(cal_logits, temps, ["own"] * k)])
    cal_loss = loss_matrix(cal_answers, cal_answers[-1], labels[cal_idx], risk)
    naive_thr = np.array(ExitTable(cal_scores, ~cal_loss, costs).min_cost(1 - eps).thresholds)
    risk_nv, speed_nv, ms_nv = held_out(naive_thr, temps, [None] * k)
    return {"risk": risk_lt, "speedup": speed_lt, "mean_ms": ms_lt, "naive_mean_ms": ms_nv, "certified": bool(point["guarantee"]["candidates_passed"] > 1),
            "upper_bound": point["guarantee"]["upper_bound"], "naive_risk": risk_nv, "naive_speedup": speed_nv}


def run_pool(name, logits, labels, costs, draw: int, draws: int, delta: float, last_alone_ms: float) -> list[dict]:
    n = len(labels)
    rows = []
    for risk, eps in CONFIGS[name]:
        t0 = time.time()
        results = []
        for d in range(draws):
            perm = np.random.default_rng(1000 + d).permutation(n)
            results.append(one_draw(logits, labels, costs, np.sort(perm[:draw]), np.sort(perm[draw:]), risk, eps, delta, d))
        r = np.array([x["risk"] for x in results])
        nv = np.array([x["naive_risk"] for x in results])
        viol = float((r > eps).mean())
        rows.append({
            "risk": risk, "epsilon": eps, "delta": delta, "draws": draws, "calibration_images": draw,
            "held_out_images": n - draw,
            "violation_rate": viol, "violation_rate_sd": math.sqrt(max(viol * (1 - viol), 1e-12) / draws),
            "held_out_risk_mean": float(r.mean()), "held_out_risk_p90": float(np.quantile(r, 0.9)),
            "held_out_risk_max": float(r.max()),
            "speedup_mean": float(np.mean([x["speedup"] for x in results])),
            "speedup_vs_last_alone_mean": float(np.mean([last_alone_ms / x["mean_ms"] for x in results])),
            "naive_speedup_vs_last_alone_mean": float(np.mean([last_alone_ms / x["naive_mean_ms"] for x in results])),
            "certified_rate": float(np.mean([x["certified"] for x in results])),
            "naive_violation_rate": float((nv > eps).mean()), "naive_risk_mean": float(nv.mean()),
            "naive_speedup_mean": float(np.mean([x["naive_speedup"] for x in results])),
            "seconds": time.time() - t0,
        })
        print(f"{name} {risk} eps={eps}: violations {viol:.3f} (delta {delta}), held-out risk mean {r.mean():.4f}, "
              f"speed-up x{rows[-1]['speedup_mean']:.2f}; naive violations {rows[-1]['naive_violation_rate']:.3f} "
              f"({time.time() - t0:.0f} s)", file=sys.stderr)
    return rows


def markdown(out: dict) -> str:
    lines = ["| data | risk | epsilon | delta | draws (calibration / held-out images) | violation rate (held-out risk > epsilon) "
             "| held-out risk: mean / 90th pct | draws certifying early exits | speed-up vs last network alone "
             "| naive: violation rate / speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key in ("cifar10", "imagenet"):
        for r in out[key]["rows"]:
            lines.append(
                f"| {key} | {r['risk'].replace('_', ' ')} | {100 * r['epsilon']:g}% | {r['delta']:g} | {r['draws']} "
                f"({r['calibration_images']} / {r['held_out_images']}) | **{100 * r['violation_rate']:.1f}%** "
                f"(± {100 * r['violation_rate_sd']:.1f}) | {100 * r['held_out_risk_mean']:.2f}% / "
                f"{100 * r['held_out_risk_p90']:.2f}% | {100 * r['certified_rate']:.0f}% | "
                f"{r['speedup_vs_last_alone_mean']:.2f}x | {100 * r['naive_violation_rate']:.0f}% / "
                f"{r['naive_speedup_vs_last_alone_mean']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = harness.parser(__doc__, f"{NAME}.json", render=True)
    ap.add_argument("--draws", type=int, default=100)
    ap.add_argument("--delta", type=float, default=0.1)
    args = ap.parse_args()
    if harness.render_only(args, NAME, markdown):
        return
    harness.require_data(args.data, harness.CIFAR10)
    harness.require_data(args.data, harness.IMAGENET)
    from benchmarks import calibration_data

    t0 = time.time()
    c = calibration_data.cifar10(args.data, args.threads)
    logits = [np.concatenate([a, b]) for a, b in zip(c["calibration"][0], c["test"][0])]
    labels = np.concatenate([c["calibration"][1], c["test"][1]])
    out = {**harness.metadata(NAME),
           "method": "learn-then-test, fixed-sequence exact binomial tests; tune/test halves of each calibration draw",
           "cifar10": {"sequence": "EfficientNet-Lite0 early exits (4 stages), max softmax + temperature",
                       "stage_ms": c["costs"].tolist(), "pool": int(len(labels)),
                       "rows": run_pool("cifar10", logits, labels, c["costs"], 2000, args.draws, args.delta,
                                        float(np.sum(c["costs"])))}}
    inet = calibration_data.imagenet(args.data, args.threads)
    out["imagenet"] = {"sequence": "cascade " + " -> ".join(inet["stages"]) + ", max softmax + temperature",
                       "stage_ms": inet["costs"].tolist(), "pool": int(len(inet["labels"])),
                       "rows": run_pool("imagenet", inet["logits"], inet["labels"], inet["costs"], 500, args.draws,
                                        args.delta, float(inet["costs"][-1]))}
    out["wall_seconds"] = time.time() - t0
    harness.save(out, args.out, markdown)


if __name__ == "__main__":
    main()
