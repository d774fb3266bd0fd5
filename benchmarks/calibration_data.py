"""Per-stage logits and stage latencies of the two real sequences the calibration benchmarks compare on.

* **CIFAR-10 early exit** (frozen ImageNet EfficientNet-Lite0, images stretched to 224): exits
  after ``_blocks.7``, ``_blocks.10``, ``_blocks.14`` and the final features, each GAP + L2 +
  multinomial logistic regression (C=10) fitted on the 2,000 "user" images (see
  ``lite0_cifar10_features.py``); logits of the 1,500 calibration and 2,500 test images.
  Stage latency: the p50 profile (ONNX Runtime, 1 thread, batch 1) of the bundle that
  ``savchenko_cifar10.py`` builds on the same cuts (the heads have the same shapes), else
  measured here on the exported stages.
* **ImageNet resolution cascade** (1,000-image sample): EfficientNet-Lite0@192 -> Lite0@224 ->
  Lite2@260, ImageNet logits of every image; per-model latency measured on ONNX Runtime (1
  thread, batch 1, preprocessing of the 320 px image included) after ``torch.onnx.export``.

Everything is cached under ``runs/calibration/``.

    python -m benchmarks.calibration_data      # fills the cache and prints the stage costs
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import harness, lite0_cifar10_features as feats_cache

CACHE = harness.RUNS / "calibration"
CIFAR_CUTS = ("_blocks.7", "_blocks.10", "_blocks.14", "_avg_pooling")
IMAGENET_STAGES = (("lite0", 0, 192), ("lite0", 0, 224), ("lite2", 2, 260))


def cifar10(data: Path = harness.DEFAULT_DATA, threads: int = 1) -> dict:
    """``{"calibration": (logits list, labels), "test": (...), "costs": per-stage ms, "cost_source": str}``."""
    path = CACHE / "cifar10_lite0_lr_logits.npz"
    if not path.exists():
        from stagewise.converters.savchenko import SavchenkoSettings, fit_linear_head

        feats = feats_cache.load(data, threads)
        settings = SavchenkoSettings(classifier="logistic", C=10.0)
        print("fitting logistic-regression heads on the user images", file=sys.stderr)
        heads = [fit_linear_head(feats["user"][c], feats["user"]["labels"], 10, settings) for c in CIFAR_CUTS]
        out = {}
        for part in ("calibration", "test"):
            out[f"{part}_labels"] = feats[part]["labels"]
            for k, (c, h) in enumerate(zip(CIFAR_CUTS, heads)):
                out[f"{part}_{k}"] = h.decision(feats[part][c]).astype(np.float32)
        np.savez(path, **out)
    with np.load(path, allow_pickle=False) as z:
        parts = {p: ([z[f"{p}_{k}"].astype(np.float64) for k in range(len(CIFAR_CUTS))], z[f"{p}_labels"])
                 for p in ("calibration", "test")}
    costs, source = cifar10_costs(data, threads)
    return dict(parts, costs=costs, cost_source=source, stages=[f"exit after {c}" for c in CIFAR_CUTS[:-1]] + ["final"])


def cifar10_costs(data: Path, threads: int) -> tuple[np.ndarray, str]:
    bundle = CACHE / "savchenko_lite0_cifar10.swb"
    profile = f"onnxruntime-cpu-{threads}t"
    if bundle.exists():
        from stagewise.bundle import read_bundle

        b = read_bundle(bundle, verify=False)
        try:
            cuts = [s.get("head", {}).get("after") for s in b.manifest.to_dict()["stages"]]
            if tuple(cuts) == CIFAR_CUTS and all(profile in s["cost"].get("latency_ms", {}) for s in b.manifest.to_dict()["stages"]):
                return (np.array([s["cost"]["latency_ms"][profile]["p50"] for s in b.manifest.to_dict()["stages"]]),
                        f"profile {profile} of {bundle.name} (p50 per stage)")
        finally:
            b.close()
    path = CACHE / f"lite0_stage_latency_{threads}t.json"
    if not path.exists():
        _measure_lite0_stages(path, threads)
    return np.array(json.loads(path.read_text())["p50"]), f"exported stages timed on ONNX Runtime ({threads} thread)"


def _measure_lite0_stages(path: Path, threads: int) -> None:
    import torch

    from stagewise.converters.heads import LinearHead
    from stagewise.converters.savchenko import plans_from_heads
    from stagewise.converters.torch_source import export_onnx
    from stagewise.converters.zoo import efficientnet_lite0

    harness.set_threads(torch=threads)
    dims = (80, 112, 192, 1280)
    heads = [LinearHead(np.zeros((10, d)), np.zeros(10), normalise=True) for d in dims]
    grey = np.full((32, 32, 3), 128, np.uint8)
    pre = feats_cache.preprocess()
    plans = plans_from_heads(efficientnet_lite0(image_size=224), CIFAR_CUTS, pre, (224, 224), heads, {})
    x = torch.from_numpy(pre.tensor([grey], (224, 224)))
    p50 = []
    for k, plan in enumerate(plans):
        f = CACHE / "onnx" / f"lite0_stage{k}.onnx"
        f.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(plan.module, x.numpy(), f, plan.input_name, plan.output_names)
        session = harness.ort_session(f, threads)
        feed = {plan.input_name: x.numpy()}
        times = []
        for r in range(60):
            t0 = time.perf_counter()
            session.run(None, feed)
            times.append((time.perf_counter() - t0) * 1e3)
        p50.append(float(np.median(times[10:])))
        with torch.no_grad():
            x = plan.module(x)[0] if plan.has_carry else x
    path.write_text(json.dumps({"p50": p50, "threads": threads}))


def imagenet(data: Path = harness.DEFAULT_DATA, threads: int = 1) -> dict:
    """``{"logits": list per stage (1000 x 1000), "labels", "costs", "stages"}``."""
    path = CACHE / "imagenet_cascade_logits.npz"
    lat_path = CACHE / f"imagenet_cascade_latency_{threads}t.json"
    if not path.exists() or not lat_path.exists():
        _imagenet_extract(data, threads, path, lat_path)
    with np.load(path, allow_pickle=False) as z:
        logits = [z[f"stage{k}"].astype(np.float64) for k in range(len(IMAGENET_STAGES))]
        labels = z["labels"]
    lat = json.loads(lat_path.read_text())
    return {"logits": logits, "labels": labels, "costs": np.array(lat["p50"]),
            "cost_source": f"each model exported to ONNX and timed on ONNX Runtime ({threads} thread, batch 1, "
                           "preprocessing included), p50",
            "stages": [f"{name}@{size}" for name, _, size in IMAGENET_STAGES]}


def _imagenet_extract(data: Path, threads: int, path: Path, lat_path: Path) -> None:
    import torch

    from stagewise.converters.torch_source import export_onnx
    from stagewise.converters.zoo import EFFICIENTNET_LITE_PREPROCESS, efficientnet_lite0, efficientnet_lite2
    from stagewise.images import Preprocess

    harness.set_threads(torch=threads)
    images = harness.imagenet_parts(data).images
    frames = [images.image(i) for i in range(len(images))]
    pre = Preprocess.from_manifest(dict(EFFICIENTNET_LITE_PREPROCESS))
    out = {"labels": images.targets}
    for k, (name, variant, size) in enumerate(IMAGENET_STAGES):
        model = (efficientnet_lite0 if variant == 0 else efficientnet_lite2)(image_size=size)
        print(f"ImageNet logits of {name}@{size}", file=sys.stderr)
        t0 = time.time()
        chunks = []
        with torch.no_grad():
            for i in range(0, len(frames), 25):
                chunks.append(model(torch.from_numpy(pre.tensor(frames[i:i + 25], (size, size)))).numpy())
        out[f"stage{k}"] = np.concatenate(chunks).astype(np.float32)
        print(f"  {time.time() - t0:.0f} s, top-1 {(out[f'stage{k}'].argmax(1) == images.targets).mean():.3f}",
              file=sys.stderr)
        f = CACHE / "onnx" / f"{name}_{size}.onnx"
        f.parent.mkdir(parents=True, exist_ok=True)
        if not f.exists():
            export_onnx(model, pre.tensor(frames[:1], (size, size)), f, "image", ["logits"])
    np.savez(path, **out)
    _time_imagenet_models(frames, threads, lat_path)


def _time_imagenet_models(frames, threads: int, lat_path: Path, rounds: int = 150) -> None:
    """Per-model latency, interleaved round robin (image by image, every model in turn) so that a
    busy machine slows every model alike; p50 over ``rounds`` images after 10 warm-up rounds."""
    from stagewise.converters.zoo import EFFICIENTNET_LITE_PREPROCESS
    from stagewise.images import Preprocess

    pre = Preprocess.from_manifest(dict(EFFICIENTNET_LITE_PREPROCESS))
    runners = {k: (lambda frame, s=harness.ort_session(CACHE / "onnx" / f"{name}_{size}.onnx", threads), size=size:
                   s.run(None, {"image": pre.tensor([frame], (size, size))}))
               for k, (name, _, size) in enumerate(IMAGENET_STAGES)}
    timing = harness.round_robin(runners, [frames[i % len(frames)] for i in range(rounds + 10)], warmup=10)
    lat_path.write_text(json.dumps({"p50": list(timing.medians().values()), "threads": threads,
                                    "rounds": rounds, "timing": "interleaved round robin, batch 1, preprocessing included",
                                    "stages": [list(s) for s in IMAGENET_STAGES]}))


def main() -> None:
    args = harness.parser(__doc__).parse_args()
    harness.require_data(args.data, harness.CIFAR10)
    harness.require_data(args.data, harness.IMAGENET)
    c = cifar10(args.data, args.threads)
    print("cifar10 costs", c["costs"], c["cost_source"])
    i = imagenet(args.data, args.threads)
    print("imagenet costs", i["costs"], [float((lg.argmax(1) == i["labels"]).mean()) for lg in i["logits"]])


if __name__ == "__main__":
    main()
