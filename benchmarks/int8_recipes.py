"""INT8 recipes on this CPU: agreement with fp32 and speed of ONNX Runtime element types and NNCF settings, per stage.

Why the converter searches the recipes it does. On an x86 CPU without VNNI, uint8 x int8
kernels add pairs of products in int16 with saturation. ONNX Runtime's documentation names two
ways out, 7-bit weights (``reduce_range``) or uint8 x uint8 weights; int8 x int8 is a third.
NNCF has its overflow fix (7-bit weights; on the first layer by default, here on every layer),
full bias correction, channel alignment (cross-layer equalisation) and the mixed preset. For
every stage of the CIFAR-10 early-exit bundle (the ResNet cut after layer1 and layer2, as in
``benchmarks.int8_precision``) and of the EfficientNet-Lite0@224 -> Lite2@260 cascade, each
recipe is quantized with the converter's own exporter (``quantize`` of
``stagewise.converters.onnx_export`` / ``openvino_export``, calibrated on 256 calibration images)
and measured: top-1 agreement with the fp32 stage on held-back calibration images (2,000 for
CIFAR-10, all 244 left for ImageNet; no test image is used) and the median single-image latency
against fp32 on the same runtime (1 thread, the two timed in turn by ``Exporter.host_speed``).

One command: ``python -m benchmarks.int8_recipes`` (``--formats onnx`` for one runtime). Takes
about 15 minutes on 2 cores.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks import harness
from benchmarks.int8_precision import _cifar10, _imagenet

NAME = "int8_recipes"


def recipes(fmt: str) -> dict[str, object]:
    """The recipes measured for one format, by the name the table shows."""
    if fmt == "onnx":
        from stagewise.converters.onnx_export import Recipe

        candidates = [Recipe(), Recipe(reduce_range=True), Recipe(weights="QUInt8"), Recipe(activations="QInt8")]
    else:
        from stagewise.converters.openvino_export import Recipe

        candidates = [Recipe(), Recipe(overflow_fix_everywhere=True), Recipe(fast_bias_correction=False),
                      Recipe(channel_alignment=True), Recipe("mixed"), Recipe("mixed", False)]
    return {recipe.name: recipe for recipe in candidates}


def markdown(result: dict) -> str:
    """The docs/benchmarks.md table of a result (a recipe the quantizer failed on gets a row saying so)."""
    lines = [f"Calibration on {result['quantization_images']} images (ONNX Runtime: MinMax); latency: "
             f"{result['threads']} thread, median of {result['runs']} single-image runs each, fp32 and INT8 in turn; "
             f"{result['machine']['cpu']}, {result['machine']['date'][:10]}.", "",
             "| runtime | stage | recipe | agreement with fp32 (held-back) | fp32 ms | INT8 ms | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            reason = r["error"].split(": ", 1)[-1]
            lines.append(f"| {r['runtime']} | {r['stage']} | {r['recipe']} | failed in the quantizer "
                         f"(`{reason}`) | | | |")
            continue
        low, high = r["interval"]
        lines.append(f"| {r['runtime']} | {r['stage']} | {r['recipe']} | {100 * r['agreement']:.1f} % "
                     f"[{100 * low:.1f}, {100 * high:.1f}] of {r['images']} | {r['fp32_ms']:.3f} | {r['int8_ms']:.3f} | "
                     f"{r['fp32_ms'] / r['int8_ms']:.2f}x |")
    return "\n".join(lines) + "\n"


def _stages(args, maker, held_back: int) -> list[dict]:
    from stagewise.converters.build import sample_stage_inputs
    from stagewise.converters.export import StageInputs, exporter
    from stagewise.converters.options import BuildOptions
    from stagewise.converters.plans import pixel_plan
    from stagewise.converters.int8_gate import Gate
    from stagewise.errors import ConversionError

    _, plans, pre, _, calibration, _ = maker(args)
    plans = [pixel_plan(plan, pre) for plan in plans]
    wanted = min(len(calibration), args.quantization_images + held_back)
    rows = []
    with tempfile.TemporaryDirectory(prefix="int8-recipes-") as tmp:
        for plan, x in zip(plans, sample_stage_inputs(plans, pre, calibration, wanted)):
            n = args.quantization_images
            inputs, options = StageInputs(x[:16], x[:n], x[n:]), BuildOptions(int8=True, threads=args.threads)
            for fmt in args.formats.split(","):
                tool = exporter(fmt)
                work = Path(tmp) / fmt / plan.name
                work.mkdir(parents=True)
                fp32 = tool.export(plan, work, inputs, options)
                judge = tool.judge(plan, fp32, inputs, Gate(tolerance=0.0), args.threads)  # measures agreement only
                for k, (name, recipe) in enumerate(recipes(fmt).items()):
                    try:
                        quantized = tool.quantize(plan, fp32, work, inputs, options, recipe=recipe, tag=f"r{k}")
                    except ConversionError as exc:  # a quantizer's own failure is a result too
                        rows.append({"runtime": tool.runtime, "stage": plan.name, "recipe": name, "error": str(exc)})
                        print(f"{tool.runtime} {plan.name} {name}: failed: {exc}", flush=True)
                        continue
                    agreement = judge(quantized).record
                    speed = tool.host_speed(plan, fp32, quantized, inputs.agree, args.threads, runs=args.runs)
                    rows.append({"runtime": tool.runtime, "stage": plan.name, "recipe": name,
                                 "agreement": agreement["agreement_with_fp32"],
                                 "interval": agreement["agreement_interval"], "images": agreement["agreement_images"],
                                 "fp32_ms": speed.float_ms, "int8_ms": speed.int8_ms})
                    print(f"{tool.runtime} {plan.name} {name}: {100 * agreement['agreement_with_fp32']:.1f}%, "
                          f"{speed.speedup:.2f}x", flush=True)
    return rows


def main() -> None:
    ap = harness.parser(__doc__, f"{NAME}.json", render=True)
    ap.add_argument("--formats", default="onnx,openvino", help="artifact formats whose recipes are measured")
    ap.add_argument("--quantization-images", type=int, default=256)
    ap.add_argument("--runs", type=int, default=100, help="single-image runs per model")
    args = ap.parse_args()
    if harness.render_only(args, NAME, markdown):
        return
    harness.set_threads(torch=2)
    args.head_images, args.test_images = 20000, None  # what the int8_precision bundle makers read
    rows = _stages(args, _cifar10, 2000) + _stages(args, _imagenet, 10_000)
    result = {**harness.metadata(NAME), "threads": args.threads, "quantization_images": args.quantization_images,
              "runs": args.runs, "rows": rows}
    harness.save(result, args.out)
    harness.publish(args, NAME, markdown(result))


if __name__ == "__main__":
    main()
