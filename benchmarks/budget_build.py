"""Build (once) the ImageNet cascade the budget benchmark runs: EfficientNet-Lite0@224 -> Lite2@260, mean probs.

Thresholds are calibrated on the first half of the 1,000-image sample (seed 0); the budget
benchmark reports on the other half. The bundle is cached under ``runs/budget/`` and rebuilt
only when absent (or with ``--force``).

    python benchmarks/budget_build.py            # prints the bundle path
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import DEFAULT_DATA, REPO_ROOT, require_data

BUNDLE = REPO_ROOT / "runs" / "budget" / "lite0_224_lite2_260_mean.swb"


def imagenet_class_names(data):
    try:
        from stagewise.converters.zoo import imagenet_labels
    except ImportError:  # older zoo: the sample's own class names are in ILSVRC-2012 order
        return list(data.classes)
    return list(imagenet_labels())


def build(archive: Path, out: Path = BUNDLE, threads: int = 1, force: bool = False) -> Path:
    """The cascade bundle at ``out``, built from the pretrained models unless it already exists."""
    if out.exists() and not force:
        return out
    import torch

    from stagewise.converters import zoo
    from stagewise.converters.build import BuildOptions, build_bundle
    from stagewise.converters.torch_cascade import cascade_plans
    from stagewise.datasets import open_image_set
    from stagewise.images import Preprocess

    torch.set_num_threads(2)
    data = open_image_set(archive)
    calib, _ = data.split([0.5, 0.5], seed=0)
    plans = cascade_plans([("lite0_224", zoo.efficientnet_lite0(image_size=224), (224, 224)),
                           ("lite2_260", zoo.efficientnet_lite2(image_size=260), (260, 260))], combine="mean_probs")
    out.parent.mkdir(parents=True, exist_ok=True)
    return build_bundle(out, "lite0@224>lite2@260 mean", plans,
                        Preprocess.from_manifest(dict(zoo.EFFICIENTNET_LITE_PREPROCESS)),
                        imagenet_class_names(data), calib, BuildOptions(threads=threads, overwrite=force),
                        kind="cascade")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=BUNDLE)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    print(build(require_data(args.data, "imagenet-sample-320.tar"), args.out, args.threads, args.force))


if __name__ == "__main__":
    main()
