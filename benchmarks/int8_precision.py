"""INT8 with accuracy control, per stage and per runtime: precision, layers kept in float, agreement, speed.

For the CIFAR-10 early-exit bundle (the example ResNet cut after layer1 and layer2, heads on
20,000 training images) and the EfficientNet-Lite0@224 -> Lite2@260 cascade, builds three bundles
carrying every requested format: fp32; INT8 with accuracy control (kept per stage where the lower
end of the 95 % Wilson interval of its top-1 agreement with fp32 on held-back calibration images
reaches the tolerance, with mixed precision first, and where it runs at least ``--min-speedup``
times as fast as fp32 on this machine, which is the device here); and plain INT8 (every stage
fully quantized, nothing checked: what the runtime's INT8 kernels give). Then on each runtime, on
test images neither the quantizer nor the thresholds saw:

* per stage: precision, layers kept in float, the converter's agreement record, the top-1
  agreement of the shipped stage and of the plain INT8 stage with fp32 on the test images, and
  the stage's median latency in all three bundles (batch 1, every stage run on each image, the
  three bundles timed round robin);
* per bundle: top-1 and mean latency at the default operating point.

The converter measures agreement on every calibration image it does not quantize on (4,744 of
the 5,000 CIFAR-10 calibration images; the 500-image ImageNet share it halves, 250 to quantize
and 250 to measure) unless ``--agreement-images`` caps it.

One command: ``python -m benchmarks.int8_precision`` (``--parts cifar10`` or ``imagenet`` for one
of them, ``--formats onnx,openvino`` to leave LiteRT out). Takes about 40 minutes on 2 cores (24 for CIFAR-10).
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks import harness

NAME = "int8_precision"
RUNTIMES = {"onnx": "onnxruntime", "openvino": "openvino", "tflite": "litert"}


def recipe(runtime: str, artifact: dict) -> str:
    """The quantization recipe a stage's INT8 model used (or its full INT8 try, for a stage kept in float)."""
    record = artifact.get("quantization") or {}
    if runtime in ("onnxruntime", "openvino"):
        text = record["recipe"] + (", accuracy control" if record.get("accuracy_control") else "")
    else:
        text = "int16 activations" if str(record.get("activations", "")).startswith("int16") else "int8 activations"
    return text if artifact["precision"] == "int8" else f"({text})"


TAGS = ("fp32", "int8", "plain")
"""The three bundles: fp32, INT8 with accuracy control, plain INT8."""


def markdown(result: dict) -> str:
    """The docs/benchmarks.md tables of a result."""
    lines = [f"Tolerance: lower end of the 95 % Wilson interval of top-1 agreement with fp32 >= "
             f"{100 * result['tolerance']:g} % (converter, on held-back calibration images) and at least "
             f"{result.get('min_speedup', 0):g}x the fp32 speed on this machine; latency: batch 1, "
             f"{result['threads']} thread(s), medians over {result['timed_images']} test images timed round robin; "
             f"{result['machine']['cpu']}, {result['machine']['date'][:10]}.", ""]
    for bundle in result["bundles"]:
        held_out = min(r["converter"].get("agreement_images") or 0 for r in bundle["stages"])
        lines += [f"**{bundle['name']}** ({bundle['test_images']} test images)", ""]
        if held_out < 1000:
            text = (f"The converter measured agreement on {held_out} held-back calibration images, fewer than 1,000 "
                    "(the calibration share holds no more).")
            if all(r["converter"].get("search_skipped") for r in bundle["stages"]):
                text += (f" Even {held_out} of {held_out} agreeing leaves the Wilson lower end below "
                         f"{100 * result['tolerance']:g} %, so no stage can be shown to meet the tolerance: no "
                         "mixed-precision search ran and INT8 is rejected on every stage.")
            lines += [text, ""]
        lines += ["Shipped: the bundle with accuracy control. Plain INT8: the same stage fully quantized with nothing "
                  "checked, what the runtime's INT8 kernels give; \"converter\" is the speed-up the converter timed "
                  "on this machine while building.", "",
                  "| runtime | stage | shipped | recipe | float layers | agreement (converter, interval) | "
                  "agreement on test | fp32 ms | shipped ms | speed-up | plain INT8: agreement on test | plain ms | "
                  "speed-up (converter) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in bundle["stages"]:
            conv = r["converter"]
            interval = conv.get("agreement_interval") or [float("nan")] * 2
            lines.append(f"| {r['runtime']} | {r['stage']} | {r['precision']} | {r['recipe']} | {r['float_layers']} | "
                         f"{100 * conv.get('agreement_with_fp32', float('nan')):.1f} % [{100 * interval[0]:.1f}, "
                         f"{100 * interval[1]:.1f}] of {conv.get('agreement_images', '-')} | "
                         f"{100 * r['test_agreement']:.2f} % | {r['fp32_ms']:.3f} | {r['int8_ms']:.3f} | "
                         f"{r['fp32_ms'] / r['int8_ms']:.2f}x | {100 * r['plain_test_agreement']:.2f} % | "
                         f"{r['plain_ms']:.3f} | {r['fp32_ms'] / r['plain_ms']:.2f}x "
                         f"({r['plain_host_speedup']:.2f}x) |")
        names = {"fp32": "fp32", "int8": "shipped (accuracy control)", "plain": "plain INT8"}
        lines += ["", "| runtime | bundle | top-1 % at the default point | mean ms |", "|---|---|---|---|"]
        for r in bundle["points"]:
            lines.append(f"| {r['runtime']} | {names[r['precision']]} | {harness.percent(r['top1'])} | "
                         f"{r['mean_ms']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def _cifar10(args) -> tuple[str, list, object, list[str], object, object]:
    parts = harness.cifar10_parts(args.data)
    example = harness.example_module("cifar10")
    from stagewise.converters.plans import early_exit_plans
    from stagewise.images import Preprocess

    pre = Preprocess(mean=example.MEAN, std=example.STD, resize="stretch", crop_fraction=1.0)
    heads_on = harness.subset(parts.train, args.head_images, seed=0)
    plans = early_exit_plans(example.resnet_cifar(), ["layer1", "layer2"], pre, (32, 32), heads_on)
    return "CIFAR-10 early exit (ResNet, layer1, layer2)", plans, pre, list(parts.images.classes), parts.calibration, \
        harness.subset(parts.test, args.test_images, seed=0)


def _imagenet(args) -> tuple[str, list, object, list[str], object, object]:
    parts = harness.imagenet_parts(args.data)
    from stagewise.converters.factory import build_model
    from stagewise.converters.plans import cascade_plans
    from stagewise.converters.zoo import EFFICIENTNET_LITE_PREPROCESS, imagenet_labels
    from stagewise.images import Preprocess

    pre = Preprocess.from_manifest(dict(EFFICIENTNET_LITE_PREPROCESS))
    stages = [("lite0_224", "stagewise.converters.zoo:efficientnet_lite0", 224),
              ("lite2_260", "stagewise.converters.zoo:efficientnet_lite2", 260)]
    plans = cascade_plans([(n, build_model(m, s), (s, s)) for n, m, s in stages], combine="mean_probs")
    return "EfficientNet-Lite0@224 -> Lite2@260 cascade", plans, pre, imagenet_labels(), parts.calibration, parts.test


def _measure(name: str, plans, pre, classes, calibration, test, args) -> dict:
    from stagewise.converters.build import build_bundle
    from stagewise.converters.options import BuildOptions
    from stagewise.runtimes import load

    formats = tuple(args.formats.split(","))
    paths = {tag: args.bundles / f"{NAME}_{name.split()[0].lower()}_{tag}.swb" for tag in TAGS}
    checks = {"fp32": {}, "int8": dict(int8_tolerance=args.tolerance, int8_min_speedup=args.min_speedup),
              "plain": dict(int8_tolerance=0.0, int8_mixed=False)}
    agreement = args.agreement_images or max(len(calibration) - args.quantization_images, 1)
    seconds = {}
    for tag, path in paths.items():
        if args.reuse and path.exists():
            continue
        t0 = time.time()
        build_bundle(path, f"{name} {tag}", plans, pre, classes, calibration,
                     BuildOptions(formats=formats, int8=tag != "fp32", threads=args.threads, overwrite=True,
                                  quantization_images=args.quantization_images, agreement_images=agreement,
                                  **checks[tag]),
                     kind="early_exit" if plans[0].has_carry else "cascade")
        seconds[tag] = time.time() - t0
    images = harness.decode_all(test, "decoding test images")
    timed = [images[i] for i in np.random.default_rng(1).choice(len(images), min(args.timing_images, len(images)),
                                                              replace=False)]
    stages, points = [], []
    for fmt in formats:
        runtime = RUNTIMES[fmt]
        loaded = {tag: load(path, runtime=runtime, threads=args.threads) for tag, path in paths.items()}
        logits = {tag: c.stage_logits(images) for tag, c in loaded.items()}
        runs = harness.round_robin({tag: c.run_all_stages for tag, c in loaded.items()}, timed, warmup=5,
                                   rotate=True).outputs
        answers = harness.round_robin({tag: c.predict for tag, c in loaded.items()}, timed, warmup=5, rotate=True)
        document = loaded["int8"].bundle.manifest.to_dict()
        plain = loaded["plain"].bundle.manifest.to_dict()
        for k, spec in enumerate(document["stages"]):
            artifact = spec["artifacts"][fmt]
            record = artifact.get("quantization") or {}
            plain_record = plain["stages"][k]["artifacts"][fmt]["quantization"]
            stages.append({
                "runtime": runtime, "stage": spec["name"], "precision": artifact["precision"],
                "recipe": recipe(runtime, artifact),
                "float_layers": len(record.get("float_layers") or []) if artifact["precision"] == "int8" else "all",
                "converter": {key: record.get(key) for key in ("agreement_with_fp32", "agreement_interval",
                                                               "agreement_images", "search", "accuracy_control",
                                                               "ranking", "search_skipped", "rejected",
                                                               "host_latency_ms", "host_speedup")},
                "test_agreement": float(np.mean(logits["fp32"][k].argmax(1) == logits["int8"][k].argmax(1))),
                "plain_test_agreement": float(np.mean(logits["fp32"][k].argmax(1) == logits["plain"][k].argmax(1))),
                "plain_host_speedup": plain_record["host_speedup"],
                "plain_converter_agreement": plain_record["agreement_with_fp32"],
                **{f"{tag}_ms": float(np.median([p.trace[k].latency_ms for p in runs[tag]])) for tag in paths}})
        for tag, cascade in loaded.items():
            decided = cascade.predict_batch(images)
            points.append({"runtime": runtime, "precision": tag, "operating_point": cascade.operating_point,
                           "top1": float(np.mean([p.label == t for p, t in zip(decided, test.targets)])),
                           "mean_ms": float(np.mean(answers.ms[tag]))})
            cascade.close()
    return {"name": name, "test_images": len(images), "build_seconds": seconds, "stages": stages, "points": points}


def main() -> None:
    ap = harness.parser(__doc__, f"{NAME}.json", bundles="int8", render=True, head_images=20000, timing_images=300)
    ap.add_argument("--parts", default="cifar10,imagenet", help="which bundles: cifar10, imagenet")
    ap.add_argument("--formats", default="onnx,openvino,tflite", help="artifact formats (each runtime is measured)")
    ap.add_argument("--tolerance", type=float, default=0.99)
    ap.add_argument("--quantization-images", type=int, default=256)
    ap.add_argument("--agreement-images", type=int, default=None,
                    help="held-back calibration images the converter measures agreement on (default: all)")
    ap.add_argument("--min-speedup", type=float, default=1.0,
                    help="the accuracy-controlled bundle keeps INT8 only at this speed-up over fp32 on this machine")
    ap.add_argument("--test-images", type=int, default=2000)
    args = ap.parse_args()
    if harness.render_only(args, NAME, markdown):
        return
    harness.set_threads(torch=2)
    args.bundles.mkdir(parents=True, exist_ok=True)
    makers = {"cifar10": _cifar10, "imagenet": _imagenet}
    bundles = [_measure(*makers[part](args), args) for part in args.parts.split(",")]
    result = {**harness.metadata(NAME), "threads": args.threads, "tolerance": args.tolerance,
              "min_speedup": args.min_speedup,
              "timed_images": args.timing_images, "bundles": bundles}
    harness.save(result, args.out)
    harness.publish(args, NAME, markdown(result))


if __name__ == "__main__":
    main()
