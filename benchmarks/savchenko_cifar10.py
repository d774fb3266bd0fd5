"""Savchenko's sequential analysis on a real pretrained network: EfficientNet-Lite0 on CIFAR-10.

Reproduces the method's behaviour (accuracy and speed-up per alpha, next to every single-exit
network) with :mod:`stagewise.converters.savchenko`:

* backbone: ImageNet-pretrained EfficientNet-Lite0 (frozen), CIFAR-10 images stretched 32 -> 224;
* stages: exits after ``--cuts`` (default ``_blocks.7,_blocks.10,_blocks.14``) plus the final
  1280-channel features; every stage is GAP + L2 normalisation + a linear SVM (squared hinge);
* the user's N = 2,000 images (200 per class of the train part) train the heads on a stratified
  ``delta`` share (K images); thresholds are the floor(alpha*m*(N-K)/M)-th largest maximal
  wrong-class decision values of the other N - K; heads are then refitted on all N;
* everything reported is measured on 2,500 test images (250 per class of the test part) that
  neither the heads nor the thresholds saw;
* latency: the bundle is really built (ONNX, ``build_bundle``) and profiled on ONNX Runtime
  (1 thread, batch 1); expected mean latency per configuration = exit rates (on the test
  features) x cumulative stage p50 from that profile. A second, end-to-end measurement runs the
  real executor on ``--measure-images`` test images, round robin, batch 1.

    python -m benchmarks.savchenko_cifar10     # features cached by benchmarks.lite0_cifar10_features (~15 min once)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from benchmarks import harness

NAME = "savchenko_cifar10"

ALPHAS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)


def evaluate(heads, feats, labels, costs, thresholds: dict) -> dict:
    from stagewise.calibration import ExitTable

    decisions = [h.decision(f) for h, f in zip(heads, feats)]
    scores = np.stack([d.max(1) for d in decisions])
    correct = np.stack([d.argmax(1) == labels for d in decisions])
    table = ExitTable(scores, correct, costs)
    full = table.full()
    singles = [{"stage": k, "top1": float(correct[k].mean()), "mean_ms": float(table.cum_cost[k])}
               for k in range(len(heads))]
    rows = []
    for alpha, thr in sorted(thresholds.items()):
        o = table.evaluate(thr)
        exits = table.exit_stage(thr)
        early_wrong = float(((exits < len(heads) - 1) & ~correct[exits, np.arange(len(labels))]).mean())
        rows.append({"alpha": alpha, "thresholds": [None if not np.isfinite(t) else float(t) for t in thr],
                     "top1": o.accuracy, "mean_ms": o.mean_cost, "speedup_vs_full": full.mean_cost / o.mean_cost,
                     "exit_rates": list(o.exit_rates), "early_wrong_exits": early_wrong})
    oracle = table.oracle()
    return {"full": {"top1": full.accuracy, "mean_ms": full.mean_cost}, "singles": singles, "alphas": rows,
            "oracle": {"top1": oracle.accuracy, "mean_ms": oracle.mean_cost,
                       "speedup_vs_full": full.mean_cost / oracle.mean_cost, "exit_rates": list(oracle.exit_rates)}}


def markdown(r: dict) -> str:
    """The reproduction table (and the delta sensitivity) as Markdown."""
    ev, meas = r["results"], r["measured_end_to_end"]
    lines = ["| configuration | top-1 (test) | expected mean latency (ms) | speed-up vs full | measured speed-up "
             "(executor) | exits per stage | early wrong exits |", "|---|---|---|---|---|---|---|"]
    stages = ["exit after " + c for c in r["cuts"][:-1]] + ["final features"]
    for s in ev["singles"]:
        m = meas.get(f"stage {s['stage']} alone") if s["stage"] < len(stages) - 1 else meas.get("full")
        lines.append(f"| single exit: {stages[s['stage']]} | {100 * s['top1']:.2f}% | {s['mean_ms']:.2f} | "
                     f"{ev['full']['mean_ms'] / s['mean_ms']:.2f}x | {m['speedup_vs_full']:.2f}x |  |  |"
                     if m else f"| single exit: {stages[s['stage']]} | {100 * s['top1']:.2f}% | {s['mean_ms']:.2f} | "
                     f"{ev['full']['mean_ms'] / s['mean_ms']:.2f}x | - |  |  |")
    for a in ev["alphas"]:
        m = meas.get(f"alpha-{a['alpha']:g}")
        lines.append(f"| Savchenko alpha = {a['alpha']:g} | {100 * a['top1']:.2f}% | {a['mean_ms']:.2f} | "
                     f"{a['speedup_vs_full']:.2f}x | {m['speedup_vs_full']:.2f}x |" if m else
                     f"| Savchenko alpha = {a['alpha']:g} | {100 * a['top1']:.2f}% | {a['mean_ms']:.2f} | "
                     f"{a['speedup_vs_full']:.2f}x | - |")
        lines[-1] += f" {' / '.join(f'{100 * x:.0f}%' for x in a['exit_rates'])} | {100 * a['early_wrong_exits']:.1f}% |"
    o = ev["oracle"]
    lines.append(f"| *oracle exit rule (bound)* | {100 * o['top1']:.2f}% | {o['mean_ms']:.2f} | {o['speedup_vs_full']:.2f}x | - | "
                 f"{' / '.join(f'{100 * x:.0f}%' for x in o['exit_rates'])} | 0% |")
    lines += ["", "| delta (share training the heads first) | " + " | ".join(
        f"alpha={a['alpha']:g}: top-1 / speed-up" for a in next(iter(r["delta_sensitivity"].values()))) + " |",
        "|---|" + "---|" * len(next(iter(r["delta_sensitivity"].values())))]
    for d, rows in r["delta_sensitivity"].items():
        lines.append(f"| {d} | " + " | ".join(f"{100 * a['top1']:.2f}% / {a['speedup_vs_full']:.2f}x" for a in rows) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = harness.parser(__doc__, f"{NAME}.json", render=True, cuts="_blocks.7,_blocks.10,_blocks.14")
    ap.add_argument("--bundle", type=Path, default=harness.RUNS / "calibration" / "savchenko_lite0_cifar10.swb")
    ap.add_argument("--delta", type=float, default=0.5)
    ap.add_argument("--classifier", choices=["svm", "logistic"], default="svm")
    ap.add_argument("--C", type=float, default=1.0)
    ap.add_argument("--measure-images", type=int, default=300, help="test images for the end-to-end timing (0: skip)")
    args = ap.parse_args()
    if harness.render_only(args, NAME, markdown):
        return
    harness.require_data(args.data, harness.CIFAR10)

    from benchmarks import lite0_cifar10_features as cache
    from stagewise.converters.build import build_bundle
    from stagewise.converters.options import BuildOptions
    from stagewise.converters.savchenko import SavchenkoSettings, add_alpha_points, plans_from_heads, savchenko_heads
    from stagewise.converters.zoo import efficientnet_lite0
    from stagewise.runtimes import load
    from stagewise.bundle import update_manifest
    from stagewise.runtimes.bench import summarize
    from stagewise.runtimes.profiling import measure_stage_latency, record_profile

    harness.set_threads(torch=args.threads)
    t_start = time.time()
    feats = cache.load(args.data, args.threads)
    cuts = args.cuts.split(",") + ["_avg_pooling"]
    user = [feats["user"][c] for c in cuts]
    test = [feats["test"][c] for c in cuts]
    y_user, y_test = feats["user"]["labels"], feats["test"]["labels"]

    settings = SavchenkoSettings(classifier=args.classifier, C=args.C, delta=args.delta, alphas=ALPHAS)
    t0 = time.time()
    result = savchenko_heads(user, y_user, 10, settings)
    fit_seconds = time.time() - t0

    # the real bundle: export, verify, profile on ONNX Runtime (1 thread, batch 1)
    parts = cache.parts(args.data)
    pre = cache.preprocess()
    model = efficientnet_lite0(image_size=cache.SIZE)
    plans = plans_from_heads(model, cuts, pre, (cache.SIZE, cache.SIZE), result.heads,
                             result.record)
    calib = parts["calibration"].take_per_class(20, seed=1)  # only for the bundle's own profile and default points
    args.bundle.parent.mkdir(parents=True, exist_ok=True)
    out = build_bundle(args.bundle, "cifar10-lite0-savchenko", plans, pre, parts["user"].classes, calib,
                       BuildOptions(threads=args.threads, profile_images=20, overwrite=True))
    # a longer latency profile (every stage on each image in turn, so machine load hits all stages alike)
    profile_frames = [parts["calibration"].image(i) for i in range(0, len(parts["calibration"]), 10)]
    with load(out, runtime="onnxruntime", threads=args.threads) as cascade:
        stats = measure_stage_latency(cascade, profile_frames)
        load_during_profile = os.getloadavg()

        manifest = update_manifest(out, lambda m, root: add_alpha_points(record_profile(m, cascade, stats), result,
                                                                         default_alpha=0.05))
    profile = f"onnxruntime-cpu-{args.threads}t"
    stage_ms = np.array([s.cost.latency(profile).p50 for s in manifest.stages])

    main_eval = evaluate(result.heads, test, y_test, stage_ms, result.thresholds)

    # delta sensitivity (same features, same costs)
    deltas = {}
    for d in (0.3, 0.5, 0.7):
        r = savchenko_heads(user, y_user, 10, SavchenkoSettings(classifier=args.classifier, C=args.C, delta=d,
                                                                alphas=(0.02, 0.05, 0.1)))
        deltas[str(d)] = evaluate(r.heads, test, y_test, stage_ms, r.thresholds)["alphas"]

    # the bundle computes what the features say it computes
    test_images = parts["test"]
    check_idx = np.arange(0, len(test_images), max(1, len(test_images) // 64))[:64]
    frames = [test_images.image(int(i)) for i in check_idx]
    measured = {}
    with load(out, runtime="onnxruntime", threads=args.threads) as cascade:
        logits = cascade.stage_logits(frames)
        numpy_dec = [h.decision(f[check_idx]) for h, f in zip(result.heads, test)]
        check = {"images": len(frames),
                 "max_abs_diff": float(max(np.abs(a - b).max() for a, b in zip(logits, numpy_dec))),
                 "top1_agreement": float(min((a.argmax(1) == b.argmax(1)).mean() for a, b in zip(logits, numpy_dec)))}
        if args.measure_images:
            idx = np.arange(len(test_images))[:: max(1, len(test_images) // args.measure_images)][: args.measure_images]
            images = [test_images.image(int(i)) for i in idx]
            configs = {f"alpha-{a:g}": (lambda im, p=f"alpha-{a:g}": cascade.predict(im, operating_point=p)) for a in ALPHAS}
            configs["full"] = lambda im: cascade.predict(im, operating_point="full")
            for k in range(len(cuts) - 1):
                configs[f"stage {k} alone"] = lambda im, k=k: cascade.predict_stage(im, k)
            runs = harness.round_robin(configs, images).outputs
            for name, preds in runs.items():
                measured[name] = summarize(name, "measured", preds, test_images.targets[idx], len(cuts))
            for name in measured:
                measured[name]["speedup_vs_full"] = measured["full"]["mean_ms"] / measured[name]["mean_ms"]

    result_json = {
        **harness.metadata(NAME), "threads": args.threads, "runtime": "onnxruntime",
        "batch": 1, "backbone": "EfficientNet-Lite0 (ImageNet weights, frozen), CIFAR-10 stretched to 224x224",
        "cuts": cuts, "stage_p50_ms": stage_ms.tolist(), "latency_source": f"bundle profile {profile} (p50 per stage over {len(profile_frames)} images, every "
                          "stage on each image in turn)", "load_average_during_profile": load_during_profile,
        "data": {"user_images_N": int(len(y_user)), "test_images": int(len(y_test)),
                 "split": "open_image_set(cifar10-train).split([0.8,0.1,0.1], seed=0): user = 200/class of train, "
                          "test = 250/class of test"},
        "method": result.record, "head_fit_seconds": fit_seconds, "results": main_eval,
        "delta_sensitivity": deltas, "bundle_check": check, "measured_end_to_end": measured,
        "bundle": str(out), "wall_seconds": time.time() - t_start, "load_average_at_end": os.getloadavg(),
    }
    harness.save(result_json, args.out, markdown)
    print(f"full: top-1 {100 * main_eval['full']['top1']:.2f}%  {main_eval['full']['mean_ms']:.2f} ms")
    for s in main_eval["singles"]:
        print(f"stage {s['stage']} alone: top-1 {100 * s['top1']:.2f}%  {s['mean_ms']:.2f} ms")
    for r in main_eval["alphas"]:
        m = measured.get(f"alpha-{r['alpha']:g}")
        print(f"alpha {r['alpha']:<6g} top-1 {100 * r['top1']:.2f}%  {r['mean_ms']:.2f} ms  x{r['speedup_vs_full']:.2f}"
              f"  exits {[round(x, 3) for x in r['exit_rates']]}"
              + (f"  measured x{m['speedup_vs_full']:.2f} top-1 {100 * m['top1']:.1f}%" if m else ""))
    o = main_eval["oracle"]
    print(f"oracle: top-1 {100 * o['top1']:.2f}% {o['mean_ms']:.2f} ms x{o['speedup_vs_full']:.2f}")
    print("bundle check:", check)


if __name__ == "__main__":
    main()
