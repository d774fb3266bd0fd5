"""CIFAR-10 early exit on ONNX Runtime: the bundle (fp32 and INT8) against the full model alone.

Data: the CIFAR-10 training archive in ../shared/data, split stratified with seed 0 into
40,000 train (backbone and exit heads) / 5,000 calibration (thresholds) / 5,000 test (every
number reported). The backbone is examples/cifar10/model.py:resnet_cifar with its committed
weights (trained by examples/cifar10/train.py on the train part only).

Everything is measured in one run: the full model alone (a one-stage bundle, fp32 and INT8),
the early-exit bundle (fp32 and INT8) at each operating point, and each truncated network
(stage k with its head, alone). Top-1 and exit rates count all 5,000 test images (the
runtime's batch routing, which makes the same decisions as batch-1 prediction); latency is
timed at batch 1, fixed threads, round robin image by image over a seeded subset of the test
images (--timing-images), so machine noise hits every configuration alike.

    python -m benchmarks.cifar10_early_exit            # writes benchmarks/results/cifar10_early_exit.json
    python -m benchmarks.cifar10_early_exit --render   # prints its docs/benchmarks.md tables
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks import harness

NAME = "cifar10_early_exit"


def markdown(result: dict) -> str:
    """The docs/benchmarks.md table of a result."""
    d = result["data"]
    lines = [f"n = {d['test']} test images for top-1 and exits; latency: batch 1, {result['threads']} thread(s), "
             f"{d['timed_test_images']} test images timed round robin; {result['machine']['cpu']}, "
             f"{result['machine']['date'][:10]}.", "",
             "| configuration | top-1 % | Δ top-1 vs full model (same precision) | mean ms | p95 ms | speed-up vs full model (same precision) | speed-up vs fp32 full model | exits per stage |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        delta = r.get("top1_minus_full_model_same_precision")
        lines.append(f"| {r['name']} | {harness.percent(r['top1'])} | {'' if delta is None else f'{100 * delta:+.2f}'} | "
                     f"{r['mean_ms']:.3f} | {r['p95_ms']:.3f} | {r.get('speedup_vs_full_model_same_precision', 0):.2f}x | "
                     f"{r['speedup_vs_full_model_fp32']:.2f}x | {harness.exit_shares(r['exit_histogram']) if r['kind'] == 'operating_point' else '-'} |")
    lines.append("")
    for name, o in result["oracle_on_test"].items():
        lines.append(f"Oracle bound, {name}: top-1 {harness.percent(o['top1'])} % at {o['mean_cost_ms']:.3f} ms mean "
                     f"(from the stages' profiled p50), exits {' / '.join(f'{100 * r:.0f}%' for r in o['exit_rates'])}.")
    return "\n".join(lines)


def main() -> None:
    args = harness.parser(__doc__, f"{NAME}.json", bundles="cifar10", render=True, cuts="layer1,layer2",
                          head_images=20000, timing_images=1000).parse_args()
    if harness.render_only(args, NAME, markdown):
        return
    parts = harness.cifar10_parts(args.data)
    example = harness.example_module("cifar10")
    MEAN, STD, resnet_cifar = example.MEAN, example.STD, example.resnet_cifar

    from stagewise.converters.build import build_bundle
    from stagewise.converters.options import BuildOptions
    from stagewise.converters.heads import HeadTraining
    from stagewise.converters.plans import cascade_plans
    from stagewise.converters.plans import early_exit_plans
    from stagewise.images import Preprocess
    from stagewise.runtimes import load
    from stagewise.runtimes.bench import summarize
    from stagewise.runtimes.calibrate import exit_table

    harness.set_threads(torch=2)
    data, train, calib, test = parts.images, parts.train, parts.calibration, parts.test
    heads_on = harness.subset(train, args.head_images, seed=0)
    pre = Preprocess(mean=MEAN, std=STD, resize="stretch", crop_fraction=1.0)
    model = resnet_cifar()
    cuts = args.cuts.split(",")
    args.bundles.mkdir(parents=True, exist_ok=True)
    paths = {f"{kind} {tag}": args.bundles / f"{kind.replace(' ', '_').replace('-', '_')}_{tag}.swb"
             for kind in ("early-exit", "full model") for tag in ("fp32", "int8")}
    head_seconds = None
    if not (args.reuse and all(p.exists() for p in paths.values())):
        t0 = time.time()
        plans = early_exit_plans(model, cuts, pre, (32, 32), heads_on, HeadTraining())
        head_seconds = time.time() - t0
        single = cascade_plans([("resnet", model, (32, 32))])
        for tag in ("fp32", "int8"):
            opts = BuildOptions(int8=tag == "int8", threads=args.threads, overwrite=True)
            build_bundle(paths[f"early-exit {tag}"], f"cifar10-resnet-ee-{tag}", plans, pre, data.classes, calib, opts)
            build_bundle(paths[f"full model {tag}"], f"cifar10-resnet-{tag}", single, pre, data.classes, calib, opts)
    built = paths
    cascades = {name: load(path, backend="onnxruntime", threads=args.threads) for name, path in built.items()}
    images = harness.decode_all(test, "decoding test images")
    configs, meta, decisions = {}, {}, {}
    for name, cascade in cascades.items():
        if name.startswith("full model"):
            configs[name] = lambda im, c=cascade: c.predict(im, operating_point="full")
            meta[name] = ("full_model", 1)
            decisions[name] = cascade.predict_batch(images, operating_point="full")
            continue
        for point in cascade.operating_points:
            configs[f"{name} @ {point}"] = lambda im, c=cascade, p=point: c.predict(im, operating_point=p)
            meta[f"{name} @ {point}"] = ("operating_point", len(cascade.stage_names))
            decisions[f"{name} @ {point}"] = cascade.predict_batch(images, operating_point=point)
        for k, stage in enumerate(cascade.stage_names[:-1]):
            key = f"{name} truncated at {stage} ({cuts[k]})"
            configs[key] = lambda im, c=cascade, k=k: c.predict_stage(im, k)
            meta[key] = ("truncated", len(cascade.stage_names))
            decisions[key] = [cascade.predict_stage(im, k) for im in images]
    timed = np.random.default_rng(1).choice(len(images), size=min(args.timing_images, len(images)), replace=False)
    runs = harness.round_robin(configs, [images[i] for i in timed]).outputs
    rows = [summarize(name, meta[name][0], decisions[name], test.targets, meta[name][1], timed=runs[name])
            for name in configs]
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        for tag in ("fp32", "int8"):
            if r["name"].startswith(f"early-exit {tag}") or r["name"].startswith(f"full model {tag}"):
                ref = by_name[f"full model {tag}"]
                r["speedup_vs_full_model_same_precision"] = ref["mean_ms"] / r["mean_ms"]
                r["top1_minus_full_model_same_precision"] = r["top1"] - ref["top1"]
        r["speedup_vs_full_model_fp32"] = by_name["full model fp32"]["mean_ms"] / r["mean_ms"]
    oracles = {}
    for name, cascade in cascades.items():
        if name.startswith("early-exit"):
            stage_ms = cascade.bundle.manifest.to_dict()["stages"]
            costs = np.array([s["cost"]["latency_ms"][f"onnxruntime-cpu-{args.threads}t"]["p50"] for s in stage_ms])
            o = exit_table(cascade, images, test.targets, costs).oracle()
            oracles[name] = {"top1": o.accuracy, "mean_cost_ms": o.mean_cost, "exit_rates": list(o.exit_rates)}
    result = {
        **harness.metadata(NAME), "threads": args.threads, "runtime": "onnxruntime",
        "batch": 1, "data": {"archive": str(parts.archive), "split": parts.split, "train": len(train),
                             "head_images": len(heads_on), "calibration": len(calib), "test": len(test),
                             "timed_test_images": len(timed)},
        "cuts": cuts, "head_training_seconds": head_seconds, "rows": rows, "oracle_on_test": oracles,
        "operating_points": {name: cascades[name].bundle.manifest.to_dict()["operating_points"] for name in cascades
                             if name.startswith("early-exit")},
    }
    harness.save(result, args.out)
    for r in rows:
        print(f"{r['name']:58s} top1 {100 * r['top1']:6.2f}  mean {r['mean_ms']:6.3f} ms  p95 {r['p95_ms']:6.3f} ms  "
              f"speed-up same precision {r.get('speedup_vs_full_model_same_precision', float('nan')):5.2f}x  "
              f"exits {r['exit_histogram']}")


if __name__ == "__main__":
    main()
