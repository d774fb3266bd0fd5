"""ONNX Runtime against OpenVINO on the same bundles: accuracy, consistency, latency and load time.

Builds, in one run, bundles that carry ONNX and OpenVINO artifacts side by side (fp32, and INT8
where each backend's own quantizer made it: ONNX Runtime static QDQ and NNCF), then loads each
bundle on both runtimes (CPU, batch 1, ``--threads`` threads) and measures:

* accuracy (top-1) of each runtime at the bundle's default operating point and with every stage
  run ("full");
* consistency: the share of test images on which the two runtimes give the same top-1 and take
  the same exit, at every operating point, plus per-stage top-1 agreement of the raw logits;
* latency: mean, p50, p95 per image, every configuration on every image in turn (round robin,
  so machine noise hits all alike);
* load time: ``stagewise.load`` in a fresh process, OpenVINO cold (empty model cache) and warm
  (second load from the cache), ONNX Runtime (which has no compiled-model cache) likewise.

Parts (``--parts``):

``cifar10``   the CIFAR-10 ResNet (examples/cifar10/model.py, weights resnet_cifar.pt) cut after
              layer1 and layer2 with trained exit heads. Data: cifar10-train.tar.gz split stratified,
              seed 0, 0.8/0.1/0.1 (as examples/cifar10/train.py): heads on (a seeded subset of) the
              train part, thresholds and quantization on the calibration part, every number on the
              test part.
``imagenet``  EfficientNet-Lite0@224 -> Lite2@260 deciding on mean probabilities
              (``stagewise.converters.zoo``). Data: the 1,000-image ImageNet sample, split into
              halves with seed 0: thresholds and quantization on one, every number on the other.

    python -m benchmarks.openvino_backends          # writes benchmarks/results/openvino_backends.json
    python -m benchmarks.openvino_backends --render # prints its docs/benchmarks.md tables

Nothing is downloaded; a missing data archive skips with a message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import harness

NAME = "openvino_backends"
RUNTIMES = ("onnxruntime", "openvino")
PRECISIONS = ("fp32", "int8")

LOAD_CODE = """
import json, sys, time
t0 = time.perf_counter()
import stagewise
from stagewise.runtimes.base import RUNTIMES
RUNTIMES[sys.argv[2]].opener()          # import the backend before timing the load itself
t1 = time.perf_counter()
c = stagewise.load(sys.argv[1], runtime=sys.argv[2], threads=int(sys.argv[3]), warmup=False)
t2 = time.perf_counter()
c.run_all_stages(__import__("numpy").full((320, 320, 3), 128, dtype="uint8"))
t3 = time.perf_counter()
cached = [getattr(s.session, "loaded_from_cache", None) for s in c._stages]
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_inference_s": t3 - t2, "from_cache": cached}))
"""


def time_load(bundle: Path, runtime: str, threads: int, cache_dir: Path) -> dict:
    env = dict(os.environ, STAGEWISE_CACHE_DIR=str(cache_dir), OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", LOAD_CODE, str(bundle), runtime, str(threads)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_times(bundle: Path, runtime: str, threads: int, repeats: int) -> dict:
    """Median cold and warm ``stagewise.load`` seconds over ``repeats`` fresh caches (fresh processes)."""
    cold, warm, first = [], [], []
    flags = {}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="sw-bench-cache-") as cache:
            a = time_load(bundle, runtime, threads, Path(cache))
            b = time_load(bundle, runtime, threads, Path(cache))
        cold.append(a["load_s"])
        warm.append(b["load_s"])
        first.append(a["first_inference_s"])
        flags = {"cold_from_cache": a["from_cache"], "warm_from_cache": b["from_cache"]}
    return {"cold_s": float(np.median(cold)), "warm_s": float(np.median(warm)),
            "first_inference_s": float(np.median(first)), "n": repeats, **flags}


def decisions(cascade, images: list[np.ndarray], labels: np.ndarray) -> tuple[list[np.ndarray], dict]:
    """Every stage's logits on ``images`` (one pass) and, for every operating point, each image's
    (label, exit stage) derived from them with the calibration's own exit rules.

    The executor is checked against the derivation at the default point (``predict_batch``).
    """
    from stagewise.calibration import thresholds_of
    from stagewise.exits import stage_probabilities
    from stagewise.runtimes.calibrate import exit_table

    logits = cascade.stage_logits(images)
    specs = [s["exit"] for s in cascade.bundle.manifest.to_dict()["stages"]]
    probs = stage_probabilities(logits, [e["temperature"] for e in specs], [e.get("combine", "own") for e in specs])
    cascade.stage_logits = lambda _images: logits  # exit_table reuses this pass
    try:
        table = exit_table(cascade, images, labels, np.zeros(len(specs)))
    finally:
        del cascade.stage_logits
    idx = np.arange(len(images))
    out = {}
    for point in cascade.bundle.manifest.to_dict()["operating_points"]:
        stage = table.exit_stage(thresholds_of(point))
        label = np.stack([p.argmax(1) for p in probs])[stage, idx]
        out[point["name"]] = (label, stage)
    batch = cascade.predict_batch(images)
    label, stage = out[cascade.operating_point]
    cascade.executor_check = float(np.mean([(p.label, p.stage_index) == (a, b) for p, a, b in zip(batch, label, stage)]))
    return logits, out


def consistency(a: tuple, b: tuple, n: int) -> dict:
    """Agreement of two runtimes' (logits, decisions) on the same images, at every operating point."""
    (la, da), (lb, db) = a, b
    out = {"n": n, "points": {}}
    for point in da:
        out["points"][point] = {"same_top1": float(np.mean(da[point][0] == db[point][0])),
                                "same_exit": float(np.mean(da[point][1] == db[point][1]))}
    out["stage_top1_agreement"] = [float((x.argmax(1) == y.argmax(1)).mean()) for x, y in zip(la, lb)]
    out["stage_max_abs_logit_diff"] = [float(np.abs(x - y).max()) for x, y in zip(la, lb)]
    return out


def measure_part(part: str, bundles: dict[str, Path], test_images: list[np.ndarray], labels: np.ndarray,
                 threads: int, load_repeats: int, latency_limit: int | None = None) -> dict:
    from stagewise.runtimes import load
    from stagewise.runtimes.bench import summarize

    cascades = {(prec, rt): load(bundles[prec], runtime=rt, threads=threads) for prec in bundles for rt in RUNTIMES}
    default = {prec: cascades[(prec, "onnxruntime")].operating_point for prec in bundles}
    configs, meta = {}, {}
    for (prec, rt), c in cascades.items():
        for point in (default[prec], "full"):
            name = f"{rt} {prec} @ {point}"
            configs[name] = lambda im, c=c, p=point: c.predict(im, operating_point=p)
            meta[name] = len(c.stage_names)
    order = np.arange(len(test_images))
    if latency_limit and latency_limit < len(test_images):
        order = np.sort(np.random.default_rng(1).permutation(len(test_images))[:latency_limit])
    timed = [test_images[i] for i in order]
    runs = harness.round_robin(configs, timed).outputs
    rows = [summarize(name, "operating_point", preds, np.asarray(labels)[order], meta[name])
            for name, preds in runs.items()]
    by_name = {r["name"]: r for r in rows}
    for prec in bundles:
        for point in (default[prec], "full"):
            ort, ovn = by_name[f"onnxruntime {prec} @ {point}"], by_name[f"openvino {prec} @ {point}"]
            ovn["mean_ms_ratio_vs_onnxruntime"] = ovn["mean_ms"] / ort["mean_ms"]
            ovn["p50_ms_ratio_vs_onnxruntime"] = ovn["p50_ms"] / ort["p50_ms"]
    derived = {key: decisions(c, test_images, labels) for key, c in cascades.items()}
    accuracy = {f"{rt} {prec}": {point: float(np.mean(d[0] == labels)) for point, d in derived[(prec, rt)][1].items()}
                for prec, rt in cascades}
    executor_check = {f"{rt} {prec}": c.executor_check for (prec, rt), c in cascades.items()}
    agreement = {}
    for prec in bundles:
        agreement[f"onnxruntime vs openvino, {prec}"] = consistency(
            derived[(prec, "onnxruntime")], derived[(prec, "openvino")], len(test_images))
    if "int8" in bundles and "fp32" in bundles:
        for rt in RUNTIMES:
            agreement[f"{rt} int8 vs {rt} fp32"] = consistency(
                (derived[("int8", rt)][0], {"full": derived[("int8", rt)][1]["full"]}),
                (derived[("fp32", rt)][0], {"full": derived[("fp32", rt)][1]["full"]}), len(test_images))
    artifacts = {}
    for prec, path in bundles.items():
        m = cascades[(prec, "onnxruntime")].bundle.manifest
        artifacts[prec] = [{
            "stage": s["name"],
            **{fmt: {"precision": a["precision"], "bytes": sum(f.get("bytes", 0) for f in a["files"]),
                     "verification": a.get("verification"), "quantization": a.get("quantization")}
               for fmt, a in s["artifacts"].items()}} for s in m["stages"]]
    for c in cascades.values():
        c.close()
    loads = {f"{rt} {prec}": load_times(bundles[prec], rt, threads, load_repeats) for prec in bundles for rt in RUNTIMES}
    return {"part": part, "rows": rows, "latency_images": len(timed), "accuracy_all_test_images": accuracy,
            "executor_matches_derived_decisions": executor_check, "default_operating_point": default,
            "consistency": agreement,
            "load": loads, "artifacts": artifacts, "bundles": {k: str(v) for k, v in bundles.items()}}


def _built(args, name: str) -> Path | None:
    """With ``--reuse``, an already built bundle of that name (same data split and options)."""
    path = args.bundles / name
    return path if args.reuse and (path / "manifest.json").is_file() else None


def cifar10_part(args, build_options) -> dict:
    parts = harness.cifar10_parts(args.data)
    example = harness.example_module("cifar10")
    MEAN, STD, resnet_cifar = example.MEAN, example.STD, example.resnet_cifar

    from stagewise.converters.build import build_bundle
    from stagewise.converters.heads import HeadTraining
    from stagewise.converters.plans import early_exit_plans
    from stagewise.images import Preprocess

    data, train, calib = parts.images, parts.train, parts.calibration
    test = harness.subset(parts.test, args.test_limit, seed=1)
    heads_on = harness.subset(train, args.head_images, seed=0)
    pre = Preprocess(mean=MEAN, std=STD, resize="stretch", crop_fraction=1.0)
    model = resnet_cifar(weights=args.cifar_weights) if args.cifar_weights else resnet_cifar()
    t0 = time.time()
    plans = None if all(_built(args, f"cifar10_ee_{p}") for p in PRECISIONS) else early_exit_plans(
        model, ["layer1", "layer2"], pre, (32, 32), heads_on, HeadTraining())
    bundles = {}
    for prec in PRECISIONS:
        bundles[prec] = _built(args, f"cifar10_ee_{prec}") or build_bundle(
            args.bundles / f"cifar10_ee_{prec}", f"cifar10-ee-{prec}", plans, pre, data.classes, calib,
            build_options(prec))
    build_s = time.time() - t0
    result = measure_part("cifar10", bundles, harness.decode_all(test, "decoding CIFAR-10 test images"), test.targets,
                          args.threads, args.load_repeats, args.latency_limit)
    result["data"] = {"archive": str(parts.archive), "split": parts.split, "head_images": len(heads_on),
                      "calibration": len(calib), "test": len(test)}
    result["build_seconds"] = build_s
    return result


def imagenet_part(args, build_options) -> dict:
    from stagewise.converters.build import build_bundle
    from stagewise.converters.plans import cascade_plans
    from stagewise.converters.factory import build_model
    from stagewise.converters.zoo import EFFICIENTNET_LITE_PREPROCESS
    from stagewise.images import Preprocess

    parts = harness.imagenet_parts(args.data)
    data, calib = parts.images, parts.calibration
    test = harness.subset(parts.test, args.test_limit, seed=1)
    pre = Preprocess.from_manifest(dict(EFFICIENTNET_LITE_PREPROCESS))
    stages = [(0, 224), (2, 260)]
    t0 = time.time()
    plans = cascade_plans([(f"lite{v}_{s}", build_model(f"stagewise.converters.zoo:efficientnet_lite{v}", image_size=s),
                            (s, s)) for v, s in stages], combine="mean_probs")
    bundles = {}
    for prec in PRECISIONS:
        bundles[prec] = _built(args, f"imagenet_lite0_lite2_{prec}") or build_bundle(
            args.bundles / f"imagenet_lite0_lite2_{prec}", f"imagenet-lite0-lite2-{prec}", plans, pre, data.classes,
            calib, build_options(prec), kind="cascade")
    build_s = time.time() - t0
    result = measure_part("imagenet", bundles, harness.decode_all(test, "decoding ImageNet test images"), test.targets,
                          args.threads, args.load_repeats, args.latency_limit)
    result["data"] = {"archive": str(parts.archive), "split": parts.split,
                      "calibration": len(calib), "test": len(test)}
    result["cascade"] = "efficientnet_lite0@224 -> efficientnet_lite2@260, mean_probs"
    result["build_seconds"] = build_s
    return result


def main() -> None:
    ap = harness.parser(__doc__, f"{NAME}.json", bundles="openvino_backends", render=True, parts="cifar10,imagenet",
                        head_images=10000, test_limit=None, cifar_weights=None)
    ap.add_argument("--load-repeats", type=int, default=3)
    ap.add_argument("--latency-limit", type=int, default=300,
                    help="time this many test images (seeded subset; accuracy and consistency use all); 0: all")
    args = ap.parse_args()
    if harness.render_only(args, NAME, markdown):
        return

    import torch

    from stagewise.converters.options import BuildOptions

    harness.set_threads(torch=args.threads)
    args.bundles.mkdir(parents=True, exist_ok=True)

    def build_options(prec: str) -> BuildOptions:
        return BuildOptions(formats=("onnx", "openvino"), int8=prec == "int8", threads=args.threads, overwrite=True)

    import openvino
    import onnxruntime

    result = {**harness.metadata(NAME), "threads": args.threads, "batch": 1,
              "device": "CPU", "versions": {"openvino": openvino.get_version(), "onnxruntime": onnxruntime.__version__,
                                            "torch": torch.__version__}, "parts": {}}
    if args.out.exists():  # keep parts measured by an earlier run with --parts
        previous = harness.load_result(args.out)
        result["parts"].update(previous.get("parts", {}))
    for part in args.parts.split(","):
        runner = {"cifar10": cifar10_part, "imagenet": imagenet_part}[part]
        result["parts"][part] = runner(args, build_options)
        result["parts"][part]["measured"] = harness.machine()["date"]
        harness.save(result, args.out)
        report(result["parts"][part])


def markdown(result: dict) -> str:
    """The results as markdown tables (``--markdown``), as pasted into docs/benchmarks.md."""
    lines = []
    for part in result["parts"].values():
        n = part["rows"][0]["n"]
        total = next(iter(part["consistency"].values()))["n"]
        lines += [f"**{part['part']}**: latency on {n} test images (seeded subset), accuracy and consistency on all "
                  f"{total}; default operating point "
                  f"{', '.join(f'{k}: `{v}`' for k, v in part['default_operating_point'].items())}", "",
                  "| top-1 on all test images | " + " | ".join(part["accuracy_all_test_images"]) + " |",
                  "|---|" + "---|" * len(part["accuracy_all_test_images"])]
        points = list(dict.fromkeys(p for acc in part["accuracy_all_test_images"].values() for p in acc))
        for point in points:
            lines.append(f"| {point} | " + " | ".join(f"{100 * acc[point]:.2f}%" if point in acc else "-"
                                                     for acc in part["accuracy_all_test_images"].values()) + " |")
        lines += ["", "Latency (batch 1, round robin):", "",
                  "| runtime | precision | operating point | top-1 | mean ms | p50 ms | p95 ms | OV/ORT mean | exits |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in part["rows"]:
            rt, prec, _, point = r["name"].split(" ", 3)
            ratio = r.get("mean_ms_ratio_vs_onnxruntime")
            lines.append(f"| {rt} | {prec} | {point} | {100 * r['top1']:.2f}% | {r['mean_ms']:.2f} | {r['p50_ms']:.2f} | "
                         f"{r['p95_ms']:.2f} | {'' if ratio is None else f'{ratio:.2f}'} | {r['exit_histogram']} |")
        lines += ["", "| comparison | operating point | same top-1 | same exit |", "|---|---|---|---|"]
        for name, c in part["consistency"].items():
            for point, v in c["points"].items():
                lines.append(f"| {name} | {point} | {100 * v['same_top1']:.2f}% | {100 * v['same_exit']:.2f}% |")
            stages = ", ".join(f"{100 * a:.2f}%" for a in c["stage_top1_agreement"])
            diffs = ", ".join(f"{d:.2g}" for d in c["stage_max_abs_logit_diff"])
            lines.append(f"| {name} | per-stage top-1 (max abs logit diff) | {stages} ({diffs}) | |")
        lines += ["", "| load (fresh process, median) | cold s | warm s | from cache cold -> warm |", "|---|---|---|---|"]
        for name, v in part["load"].items():
            cache = "" if v["cold_from_cache"][0] is None else f"{v['cold_from_cache']} -> {v['warm_from_cache']}"
            lines.append(f"| {name} | {v['cold_s']:.3f} | {v['warm_s']:.3f} | {cache} |")
        lines.append("")
    return "\n".join(lines)


def report(part: dict) -> None:
    print(f"== {part['part']}")
    for r in part["rows"]:
        ratio = r.get("mean_ms_ratio_vs_onnxruntime")
        print(f"{r['name']:36s} top1 {100 * r['top1']:6.2f}  mean {r['mean_ms']:7.2f} ms  p95 {r['p95_ms']:7.2f} ms"
              f"  exits {r['exit_histogram']}" + (f"  OV/ORT mean {ratio:.2f}" if ratio else ""))
    for name, c in part["consistency"].items():
        pts = ", ".join(f"{p}: top1 {100 * v['same_top1']:.2f}% exit {100 * v['same_exit']:.2f}%"
                        for p, v in c["points"].items())
        print(f"{name} (n={c['n']}): {pts}; per stage {[round(100 * a, 2) for a in c['stage_top1_agreement']]}")
    for name, v in part["load"].items():
        print(f"load {name}: cold {v['cold_s']:.3f}s warm {v['warm_s']:.3f}s (cache {v['cold_from_cache']}->"
              f"{v['warm_from_cache']})")


if __name__ == "__main__":
    main()
