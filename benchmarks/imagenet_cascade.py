"""ImageNet resolution cascades of pretrained EfficientNet-Lite models on ONNX Runtime.

Data: the 1,000-image ImageNet sample in ../shared/data (one image per class), split with
seed 0 into 500 calibration images (thresholds) and 500 test images (every number reported).

Measured in one run: each single model at its resolution (fp32 and INT8, each a one-stage
bundle) and each cascade at each operating point (fp32, and INT8 for the first cascade).
Top-1/top-5 and exit rates count every test image (the runtime's batch routing, which makes
the same decisions as batch-1 prediction); latency is timed at batch 1, fixed threads, round
robin image by image over a seeded subset of the test images (--timing-images), so machine
noise hits every configuration alike. The oracle bound (each image leaves at the first stage
that is right) is reported for every cascade. Before timing, every single
model's fp32 bundle is checked against PyTorch on all 1,000 images (top-1 agreement).

    python -m benchmarks.imagenet_cascade      # writes benchmarks/results/imagenet_cascade.json and .png
    python -m benchmarks.imagenet_cascade --render   # prints its docs/benchmarks.md tables
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks import harness

NAME = "imagenet_cascade"

ZOO = "stagewise.converters.zoo:efficientnet_lite{}"
SINGLES = {"lite0@224": (0, 224), "lite1@240": (1, 240), "lite2@260": (2, 260), "lite2@240": (2, 240)}
CASCADES = {
    "lite0@224>lite2@260 mean": ([(0, 224), (2, 260)], "mean_probs"),
    "lite0@224>lite2@260 own": ([(0, 224), (2, 260)], "own"),
    "lite0@224>lite2@240 mean": ([(0, 224), (2, 240)], "mean_probs"),
}


def _model(variant: int, size: int):
    from stagewise.converters.factory import build_model

    return build_model(ZOO.format(variant), image_size=size)


def torch_top1(model, pre, images: list[np.ndarray], size: int) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), 50):
            out.append(model(torch.from_numpy(pre.tensor(images[i:i + 50], (size, size)))).argmax(1).numpy())
    return np.concatenate(out)


def markdown(result: dict) -> str:
    """The docs/benchmarks.md table of a result."""
    d = result["data"]
    lines = [f"n = {d['test']} test images for top-1 and exits ({d['calibration']} other images calibrated the "
             f"thresholds); latency: batch 1, {result['threads']} thread(s), {d['timed_test_images']} test images timed "
             f"round robin; {result['machine']['cpu']}, {result['machine']['date'][:10]}.", "",
             "| configuration | top-1 % | top-5 % | mean ms | p95 ms | exits per stage | against single models |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        note = ""
        if "speedup_vs_equal_accuracy_single" in r:
            note = f"{r['speedup_vs_equal_accuracy_single']:.2f}x faster than {r['equal_accuracy_single']} (≥ its top-1)"
        elif r.get("more_accurate_than_every_single"):
            note = (f"more accurate than every single; {r['speedup_vs_most_accurate_single']:.2f}x the speed of "
                    f"{r['most_accurate_single']}")
        lines.append(f"| {r['name']} | {harness.percent(r['top1'])} | {harness.percent(r['top5'])} | {r['mean_ms']:.2f} | {r['p95_ms']:.2f} | "
                     f"{harness.exit_shares(r['exit_histogram']) if r['kind'] == 'cascade' else '-'} | {note} |")
    lines.append("")
    for name, o in result["oracle_on_test"].items():
        lines.append(f"Oracle bound, {name}: top-1 {harness.percent(o['top1'])} % at {o['mean_ms_from_stage_p50']:.2f} ms mean "
                     f"(stage p50s), exits {' / '.join(f'{100 * r:.0f}%' for r in o['exit_rates'])}.")
    lines.append("")
    for name, a in result["torch_agreement"].items():
        lines.append(f"- {name} fp32 bundle vs PyTorch: top-1 agreement {100 * a['top1_agreement_with_torch']:.1f} % on "
                     f"{a['n']} images (PyTorch top-1 {100 * a['torch_top1']:.1f} %).")
    return "\n".join(lines)


def main() -> None:
    ap = harness.parser(__doc__, f"{NAME}.json", bundles="imagenet", render=True, timing_images=200)
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--cascades", default="lite0@224>lite2@260 mean,lite0@224>lite2@260 own", help="comma-separated names from: " + ", ".join(CASCADES))
    ap.add_argument("--singles", default="lite0@224,lite1@240,lite2@260", help="from: " + ", ".join(SINGLES))
    ap.add_argument("--int8-cascades", default=next(iter(CASCADES)), help="cascades also built in INT8")
    ap.add_argument("--int8-singles", default="lite0@224,lite2@260", help="single models also built in INT8")
    args = ap.parse_args()
    if harness.render_only(args, NAME, markdown):
        return
    parts = harness.imagenet_parts(args.data)

    from stagewise.converters.build import build_bundle
    from stagewise.converters.options import BuildOptions
    from stagewise.converters.plans import cascade_plans
    from stagewise.converters.zoo import EFFICIENTNET_LITE_PREPROCESS, imagenet_labels
    from stagewise.images import Preprocess
    from stagewise.reports import pareto_plot
    from stagewise.runtimes import load
    from stagewise.runtimes.bench import summarize
    from stagewise.runtimes.calibrate import exit_table

    harness.set_threads(torch=2)
    data, calib, test = parts.images, parts.calibration, parts.test
    pre = Preprocess.from_manifest(dict(EFFICIENTNET_LITE_PREPROCESS))
    labels = imagenet_labels()
    precisions = ["fp32"] if args.no_int8 else ["fp32", "int8"]
    args.bundles.mkdir(parents=True, exist_ok=True)

    bundles: dict[str, Path] = {}
    kinds: dict[str, str] = {}
    for tag in precisions:
        opts = BuildOptions(int8=tag == "int8", threads=args.threads, overwrite=True)
        for name in args.singles.split(","):
            if tag == "int8" and name not in args.int8_singles.split(","):
                continue
            variant, size = SINGLES[name]
            path = args.bundles / f"{name}_{tag}.swb"
            if not (args.reuse and path.exists()):
                plans = cascade_plans([(name.replace("@", "_"), _model(variant, size), (size, size))])
                build_bundle(path, f"{name}-{tag}", plans, pre, labels, calib, opts, kind="cascade")
            bundles[f"{name} {tag}"] = path
            kinds[f"{name} {tag}"] = "single"
        for name in args.cascades.split(","):
            if tag == "int8" and name not in args.int8_cascades.split(","):
                continue
            stages, combine = CASCADES[name]
            path = args.bundles / f"{name.replace('>', '_').replace(' ', '_').replace('@', '')}_{tag}.swb"
            if not (args.reuse and path.exists()):
                plans = cascade_plans([(f"lite{v}_{s}", _model(v, s), (s, s)) for v, s in stages], combine=combine)
                build_bundle(path, f"{name}-{tag}", plans, pre, labels, calib, opts, kind="cascade")
            bundles[f"{name} {tag}"] = path
            kinds[f"{name} {tag}"] = "cascade"

    cascades = {name: load(path, backend="onnxruntime", threads=args.threads) for name, path in bundles.items()}
    all_images = harness.decode_all(data, "decoding all sample images")
    agreement = {}
    for name in args.singles.split(","):
        variant, size = SINGLES[name]
        reference = torch_top1(_model(variant, size), pre, all_images, size)
        got = np.concatenate([cascades[f"{name} fp32"].stage_logits(all_images[i:i + 100])[0].argmax(1)
                              for i in range(0, len(all_images), 100)])
        agreement[name] = {"top1_agreement_with_torch": float((reference == got).mean()), "n": len(all_images),
                           "torch_top1": float((reference == data.targets).mean())}
        print(f"{name}: bundle vs torch top-1 agreement {100 * agreement[name]['top1_agreement_with_torch']:.2f}% "
              f"(n={len(all_images)}), torch top-1 {100 * agreement[name]['torch_top1']:.1f}%")

    images = harness.decode_all(test, "decoding test images")
    configs, meta, decisions = {}, {}, {}
    for name, cascade in cascades.items():
        points = ["full"] if kinds[name] == "single" else [p for p in cascade.operating_points if p != "full"]
        for point in points:
            key = name if kinds[name] == "single" else f"{name} @ {point}"
            configs[key] = lambda im, c=cascade, p=point: c.predict(im, operating_point=p)
            meta[key] = (kinds[name], len(cascade.stage_names))
            decisions[key] = cascade.predict_batch(images, operating_point=point)
    timed = np.random.default_rng(1).choice(len(images), size=min(args.timing_images, len(images)), replace=False)
    runs = harness.round_robin(configs, [images[i] for i in timed]).outputs
    rows = [summarize(name, meta[name][0], decisions[name], test.targets, meta[name][1], timed=runs[name])
            for name in configs]
    for tag in precisions:
        singles = [r for r in rows if r["kind"] == "single" and r["name"].endswith(tag)]
        for r in rows:
            if r["kind"] != "cascade" or f" {tag} @ " not in r["name"]:
                continue
            reaching = [s for s in singles if s["top1"] >= r["top1"]]
            if reaching:
                best = min(reaching, key=lambda s: s["mean_ms"])
                r["equal_accuracy_single"] = best["name"]
                r["speedup_vs_equal_accuracy_single"] = best["mean_ms"] / r["mean_ms"]
            else:
                best = max(singles, key=lambda s: s["top1"])
                r["more_accurate_than_every_single"] = True
                r["most_accurate_single"] = best["name"]
                r["speedup_vs_most_accurate_single"] = best["mean_ms"] / r["mean_ms"]
    oracles = {}
    for name, cascade in cascades.items():
        if kinds[name] == "cascade":
            profile = f"onnxruntime-cpu-{args.threads}t"
            costs = np.array([s["cost"]["latency_ms"][profile]["p50"] for s in cascade.bundle.manifest.to_dict()["stages"]])
            o = exit_table(cascade, images, test.targets, costs).oracle()
            oracles[name] = {"top1": o.accuracy, "mean_ms_from_stage_p50": o.mean_cost, "exit_rates": list(o.exit_rates)}
    result = {
        **harness.metadata(NAME), "runtime": "onnxruntime", "threads": args.threads,
        "batch": 1, "data": {"archive": str(parts.archive), "calibration": len(calib), "test": len(test),
                             "timed_test_images": len(timed), "split": parts.split},
        "torch_agreement": agreement, "rows": rows, "oracle_on_test": oracles,
        "int8": {name: [s["artifacts"]["onnx"].get("quantization") for s in c.bundle.manifest.to_dict()["stages"]]
                 for name, c in cascades.items() if name.endswith("int8")},
    }
    harness.save(result, args.out)
    plot_rows = [dict(r, series=r["name"].split(" @ ")[0] if r["kind"] == "cascade" else "single models fp32",
                      short=r["name"].split(" @ ")[-1] if r["kind"] == "cascade" else r["name"])
                 for r in rows if r["name"].split(" @ ")[0].endswith("fp32")]
    pareto_plot({"rows": plot_rows, "runtime": "onnxruntime", "n": len(test), "bundle": "ImageNet sample, fp32"},
                args.out.with_suffix(".png"))
    for r in rows:
        extra = ""
        if "speedup_vs_equal_accuracy_single" in r:
            extra = f"{r['speedup_vs_equal_accuracy_single']:.2f}x vs {r['equal_accuracy_single']}"
        elif r.get("more_accurate_than_every_single"):
            extra = f"beats every single; {r['speedup_vs_most_accurate_single']:.2f}x vs {r['most_accurate_single']}"
        print(f"{r['name']:52s} top1 {100 * r['top1']:5.1f}  mean {r['mean_ms']:7.2f} ms  p95 {r['p95_ms']:7.2f} ms  "
              f"exits {r['exit_histogram']}  {extra}")


if __name__ == "__main__":
    main()
