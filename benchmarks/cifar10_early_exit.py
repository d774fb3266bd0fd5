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

    python benchmarks/cifar10_early_exit.py            # writes benchmarks/results/cifar10_early_exit.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import DEFAULT_DATA, REPO_ROOT, RESULTS, decode_all, machine, require_data, save

sys.path.insert(0, str(REPO_ROOT / "examples" / "cifar10"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=RESULTS / "cifar10_early_exit.json")
    ap.add_argument("--bundles", type=Path, default=REPO_ROOT / "runs" / "cifar10")
    ap.add_argument("--cuts", default="layer1,layer2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--head-images", type=int, default=20000, help="train images used to fit the exit heads")
    ap.add_argument("--reuse", action="store_true", help="load bundles already under --bundles instead of rebuilding")
    ap.add_argument("--timing-images", type=int, default=1000,
                    help="test images timed at batch 1 (accuracy always uses every test image)")
    args = ap.parse_args()

    from model import MEAN, STD, resnet_cifar

    from stagewise.converters.build import BuildOptions, build_bundle
    from stagewise.converters.heads import HeadTraining
    from stagewise.converters.torch_cascade import cascade_plans
    from stagewise.converters.torch_early_exit import early_exit_plans
    from stagewise.datasets import open_image_set
    from stagewise.images import Preprocess
    from stagewise.runtimes import load
    from stagewise.runtimes.bench import round_robin, summarize
    from stagewise.runtimes.calibrate import exit_table

    archive = require_data(args.data, "cifar10-train.tar.gz")
    torch.set_num_threads(2)
    data = open_image_set(archive)
    train, calib, test = data.split([0.8, 0.1, 0.1], seed=0)
    heads_on = train if args.head_images >= len(train) else train.split([args.head_images / len(train)], seed=0)[0]
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
    images = decode_all(test, "decoding test images")
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
    runs = round_robin(configs, [images[i] for i in timed])
    rows = [summarize(name, meta[name][0], decisions[name], test.labels, meta[name][1], timed=runs[name])
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
            stage_ms = cascade.bundle.manifest["stages"]
            costs = np.array([s["cost"]["latency_ms"][f"onnxruntime-cpu-{args.threads}t"]["p50"] for s in stage_ms])
            o = exit_table(cascade, images, test.labels, costs).oracle()
            oracles[name] = {"top1": o.accuracy, "mean_cost_ms": o.mean_cost, "exit_rates": list(o.exit_rates)}
    result = {
        "benchmark": "cifar10_early_exit", "machine": machine(), "threads": args.threads, "runtime": "onnxruntime",
        "batch": 1, "data": {"archive": str(archive), "split": "stratified 0.8/0.1/0.1 seed 0", "train": len(train),
                             "head_images": len(heads_on), "calibration": len(calib), "test": len(test),
                             "timed_test_images": len(timed)},
        "cuts": cuts, "head_training_seconds": head_seconds, "rows": rows, "oracle_on_test": oracles,
        "operating_points": {name: cascades[name].bundle.manifest["operating_points"] for name in cascades
                             if name.startswith("early-exit")},
        "command": "python benchmarks/cifar10_early_exit.py " + " ".join(sys.argv[1:]),
    }
    save(result, args.out)
    for r in rows:
        print(f"{r['name']:58s} top1 {100 * r['top1']:6.2f}  mean {r['mean_ms']:6.3f} ms  p95 {r['p95_ms']:6.3f} ms  "
              f"speed-up same precision {r.get('speedup_vs_full_model_same_precision', float('nan')):5.2f}x  "
              f"exits {r['exit_histogram']}")


if __name__ == "__main__":
    main()
