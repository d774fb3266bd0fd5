"""Build (once) the ImageNet cascade the budget benchmark runs: EfficientNet-Lite0@224 -> Lite2@260, mean probs.

Thresholds are calibrated on the first half of the 1,000-image sample (seed 0); the budget
benchmark reports on the other half. The bundle is cached under ``runs/budget/`` and rebuilt
only when absent (or with ``--force``).

    python -m benchmarks.budget_build            # prints the bundle path
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import harness

BUNDLE = harness.RUNS / "budget" / "lite0_224_lite2_260_mean.swb"


def build(parts: harness.Parts, out: Path = BUNDLE, threads: int = 1, force: bool = False) -> Path:
    """The cascade bundle at ``out``, built from the pretrained models unless it already exists."""
    if out.exists() and not force:
        return out
    from stagewise.converters import zoo
    from stagewise.converters.build import build_bundle
    from stagewise.converters.options import BuildOptions
    from stagewise.converters.plans import cascade_plans
    from stagewise.images import Preprocess

    harness.set_threads(torch=2)
    plans = cascade_plans([("lite0_224", zoo.efficientnet_lite0(image_size=224), (224, 224)),
                           ("lite2_260", zoo.efficientnet_lite2(image_size=260), (260, 260))], combine="mean_probs")
    out.parent.mkdir(parents=True, exist_ok=True)
    return build_bundle(out, "lite0@224>lite2@260 mean", plans,
                        Preprocess.from_manifest(dict(zoo.EFFICIENTNET_LITE_PREPROCESS)),
                        list(zoo.imagenet_labels()), parts.calibration, BuildOptions(threads=threads, overwrite=force),
                        kind="cascade")


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--out", type=Path, default=BUNDLE, help="the bundle (default: runs/budget/...)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the bundle exists")
    args = ap.parse_args()
    print(build(harness.imagenet_parts(args.data), args.out, args.threads, args.force))


if __name__ == "__main__":
    main()
