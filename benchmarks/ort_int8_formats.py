"""ONNX Runtime INT8 element types on this CPU: agreement with fp32 and speed of uint8 x int8, uint8 x uint8, int8 x int8.

Why the converter's ONNX Runtime recipes are all uint8 activations x int8 weights: on an x86 CPU
without VNNI, ONNX Runtime's uint8 x int8 kernels add pairs of products in int16 with
saturation, and its documentation names two ways out, 7-bit weights (``reduce_range``) or
uint8 x uint8; int8 x int8 (its QDQ default) is a third. For every stage of the CIFAR-10
early-exit bundle (the ResNet cut after layer1 and layer2, as in ``benchmarks.int8_precision``)
and of the EfficientNet-Lite0@224 -> Lite2@260 cascade, each type pair is quantized with the
converter's own :meth:`OnnxExporter.quantize` (MinMax calibration on 256 calibration images) and
measured: top-1 agreement with the fp32 stage on the held-back calibration images (2,000 for
CIFAR-10, 244 for ImageNet) and median single-image latency against fp32 (1 thread, the two
timed in turn through :meth:`Exporter.host_speed`).

One command: ``python -m benchmarks.ort_int8_formats``. Takes about 5 minutes on 2 cores.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from benchmarks import harness
from benchmarks.int8_precision import _cifar10, _imagenet

NAME = "ort_int8_formats"


def recipes() -> dict[str, object]:
    from stagewise.converters.onnx_export import Recipe

    return {"uint8 x int8": Recipe(), "uint8 x int8, 7-bit weights": Recipe(reduce_range=True),
            "uint8 x uint8": Recipe(weights="QUInt8"), "int8 x int8": Recipe(activations="QInt8")}


def markdown(result: dict) -> str:
    lines = [f"ONNX Runtime {result['onnxruntime']}, MinMax calibration on {result['quantization_images']} images, "
             f"{result['threads']} thread, median of {result['runs']} single-image runs each, fp32 and INT8 in turn; "
             f"{result['machine']['cpu']}, {result['machine']['date'][:10]}.", "",
             "| stage | types | agreement with fp32 (held-back) | fp32 ms | INT8 ms | speed-up |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        low, high = r["interval"]
        lines.append(f"| {r['stage']} | {r['types']} | {100 * r['agreement']:.1f} % [{100 * low:.1f}, {100 * high:.1f}] "
                     f"of {r['images']} | {r['fp32_ms']:.3f} | {r['int8_ms']:.3f} | {r['fp32_ms'] / r['int8_ms']:.2f}x |")
    return "\n".join(lines) + "\n"


def _stages(args, maker, held_back: int) -> list[dict]:
    from stagewise.converters.build import stage_inputs
    from stagewise.converters.export import StageInputs, exporter
    from stagewise.converters.options import BuildOptions
    from stagewise.converters.plans import pixel_plan

    _, plans, pre, _, calibration, _ = maker(args)
    plans = [pixel_plan(plan, pre) for plan in plans]
    wanted = min(len(calibration), args.quantization_images + held_back)
    sample = np.random.default_rng(0).choice(len(calibration), size=wanted, replace=False)
    images = [calibration.image(int(i)) for i in sample]
    onnx, rows = exporter("onnx"), []
    with tempfile.TemporaryDirectory(prefix="ort-int8-formats-") as tmp:
        for plan, x in zip(plans, stage_inputs(plans, pre, images)):
            n = args.quantization_images
            inputs, options = StageInputs(x[:16], x[:n], x[n:]), BuildOptions(int8=True, threads=args.threads)
            work = Path(tmp) / plan.name
            work.mkdir()
            fp32 = onnx.export(plan, work, inputs, options)
            judge = onnx.judge(plan, fp32, inputs.agree, args.threads)
            for k, (types, recipe) in enumerate(recipes().items()):
                quantized = onnx.quantize(plan, fp32, work, inputs, options, tag=f"q{k}", recipe=recipe)
                agreement = judge(quantized)
                speed = onnx.host_speed(plan, fp32, quantized, inputs.agree, args.threads, runs=args.runs)
                rows.append({"stage": plan.name, "types": types, "agreement": agreement.rate,
                             "interval": list(agreement.interval), "images": agreement.n,
                             "fp32_ms": speed.float_ms, "int8_ms": speed.int8_ms})
                print(f"{plan.name} {types}: {100 * agreement.rate:.1f}%, {speed.speedup:.2f}x", flush=True)
    return rows


def main() -> None:
    ap = harness.parser(__doc__, f"{NAME}.json", render=True)
    ap.add_argument("--quantization-images", type=int, default=256)
    ap.add_argument("--runs", type=int, default=200, help="single-image runs per model")
    args = ap.parse_args()
    if harness.render_only(args, NAME, markdown):
        return
    harness.set_threads(torch=2)
    import onnxruntime

    args.head_images, args.test_images = 20000, None  # what the int8_precision bundle makers read
    rows = _stages(args, _cifar10, 2000) + _stages(args, _imagenet, 10_000)
    result = {**harness.metadata(NAME), "onnxruntime": onnxruntime.__version__, "threads": args.threads,
              "quantization_images": args.quantization_images, "runs": args.runs, "rows": rows}
    harness.save(result, args.out)
    harness.publish(args, NAME, markdown(result))


if __name__ == "__main__":
    main()
