"""New classes on a pretrained backbone: the last-layer classifier against the new-class early-exit bundle.

The job ``stagewise convert MODEL --new-classes`` exists for: a network pretrained on ImageNet
classifies a label set it never saw. Here the 1,000-image ImageNet sample (one image per
ILSVRC-2012 class) is relabelled into 8 coarse classes by ranges of the ILSVRC class index
(:data:`COARSE`: fish, birds, amphibians and reptiles, invertebrates, dogs, wild carnivores, other
mammals, and man-made objects), so the zoo model's own 1,000 outputs mean nothing for it. Split
stratified with a seed into 60 % train / 20 % calibration / 20 % test; the test images are only
used for the reported figures.

Two bundles are built through ``stagewise.converters.convert`` on the same data (ONNX, fp32):

* ``last``: ``--new-classes`` without exits — one stage, the new linear head on the penultimate
  (pooled) features: the last-layer classifier;
* ``early``: ``--new-classes --exits auto:2`` — exits placed automatically, every stage (the last
  included) a head for the new classes.

Both are benchmarked by :func:`stagewise.runtimes.bench.benchmark` with ``last`` as the reference
in the same rotated round robin (batch 1, ``--threads`` ONNX Runtime threads): top-1, mean ms,
exit shares and the speed-up at equal accuracy. Conversion wall time is reported per phase
(backbone features, exit placement, heads, export + calibration), on the ``--device`` that
extracted the features, and once more for a re-run of ``early`` that reads the feature cache.

    python -m benchmarks.new_classes                      # CPU, writes benchmarks/results/new_classes.json
    python -m benchmarks.new_classes --device cuda        # feature extraction on a GPU
    python -m benchmarks.new_classes --limit 300 --model tests/new_class_models.py:pretrained_toy --input-size 32 \
        --out /tmp/new_classes.json     # smoke run of the pipeline (a toy backbone, seconds)
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks import harness

NAME = "new_classes"

#: Coarse classes as ranges of the ILSVRC-2012 class index (sorted wnids), ends inclusive.
COARSE: dict[str, tuple[tuple[int, int], ...]] = {
    "fish": ((0, 6), (389, 397)),
    "bird": ((7, 24), (80, 100), (127, 146)),
    "amphibian_reptile": ((25, 68),),
    "invertebrate": ((69, 79), (107, 126), (300, 329)),
    "dog": ((151, 268),),
    "wild_carnivore": ((269, 299),),
    "other_mammal": ((101, 106), (147, 150), (330, 388)),
    "object": ((398, 999),),
}


def coarse_of(index: int) -> str:
    """The coarse class of ILSVRC class ``index``."""
    return next(name for name, spans in COARSE.items() if any(a <= index <= b for a, b in spans))


def regrouped(images, root: Path, seed: int) -> dict[str, Path]:
    """``images`` written as class folders of their coarse class, split 60/20/20 (stratified, seeded)."""
    from stagewise.datasets import ImageSet

    targets = np.array([list(COARSE).index(coarse_of(int(t))) for t in images.targets])
    coarse = ImageSet(images.sources, targets, tuple(COARSE), images.origin)
    parts = dict(zip(("train", "calibration", "test"), coarse.split([0.6, 0.2, 0.2], seed=seed)))
    folders = {}
    for part, subset in parts.items():
        for i, source in enumerate(subset.sources):
            folder = root / part / subset.classes[subset.targets[i]]
            folder.mkdir(parents=True, exist_ok=True)
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
            (folder / f"{i:04d}.jpg").write_bytes(data)
        folders[part] = root / part
    return folders


def timed_convert(**kwargs) -> tuple[Path, dict[str, float], float]:
    """Convert, returning the bundle, the wall seconds of each phase (summed by name) and in all."""
    from stagewise.converters import convert
    from stagewise.progress import PHASE_TIMES

    before = len(PHASE_TIMES)
    start = time.perf_counter()
    path = convert(**kwargs)
    total = time.perf_counter() - start
    phases: dict[str, float] = defaultdict(float)
    for name, seconds in PHASE_TIMES[before:]:
        phases[name] += seconds
    return path, {k: round(v, 2) for k, v in phases.items()}, round(total, 2)


def markdown(result: dict) -> str:
    rows = ["| configuration | top-1 % | mean ms | exits | speed-up vs last-layer | equal-accuracy reference |",
            "|---|---:|---:|---|---:|---|"]
    for r in result["bench"]["rows"]:
        if r["kind"] == "stage_alone":
            continue
        name = "last-layer classifier (reference)" if r["kind"] == "reference" else f"early exit, {r['name']}"
        speed = r.get("speedup_vs_equal_accuracy_single")
        rows.append(f"| {name} | {harness.percent(r['top1'])} | {r['mean_ms']:.2f} | "
                    f"{harness.exit_shares(r['exit_histogram'])} | "
                    f"{result['last_ms'] / r['mean_ms']:.2f}x | "
                    f"{r.get('equal_accuracy_reference') or ('more accurate than it' if r.get('more_accurate_than_every_single') else '-')}"
                    f"{f' ({speed:.2f}x)' if speed else ''} |")
    # "backbone features" runs inside "exit placement" and "heads"; the columns overlap, the total does not
    phases = ["| conversion (wall s) | " + " | ".join(result["phase_names"]) + " | total |",
              "|---|" + "---:|" * (len(result["phase_names"]) + 1)]
    for name, run in result["conversions"].items():
        phases.append(f"| {name} | " + " | ".join(f"{run['phases'].get(p, 0):.1f}" for p in result["phase_names"])
                      + f" | {run['total_s']:.1f} |")
    m = result["machine"]
    return (f"**New classes on {result['model']}** ({result['n_test']} test images, {len(COARSE)} coarse classes of "
            f"the ImageNet sample; split {result['split']}; exits {', '.join(result['exits']) or '-'}; "
            f"features on {result['device']}; ONNX Runtime, {result['threads']} thread(s); {m['cpu']}, {m['date']}; "
            f"`{result['command']}`)\n\n" + "\n".join(rows) + "\n\n" + "\n".join(phases) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = harness.parser(__doc__, out=f"{NAME}.json", render=True, limit=None)
    ap.add_argument("--model", default="stagewise.converters.zoo:efficientnet_lite0", help="backbone factory")
    ap.add_argument("--device", default="cpu", help="where torch extracts features: auto, cpu, cuda, mps")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split")
    ap.add_argument("--target-drop", type=float, default=0.5, help="allowed top-1 drop (points) of the default point")
    ap.add_argument("--input-size", type=int, default=None, help="input size (default: the model's own)")
    args = ap.parse_args(argv)
    if harness.render_only(args, NAME, markdown):
        return
    from stagewise import load
    from stagewise.bundle import read_bundle
    from stagewise.datasets import open_image_set
    from stagewise.runtimes.bench import benchmark

    images = open_image_set(harness.require_data(args.data, harness.IMAGENET))
    images = harness.subset(images, args.limit, args.seed)
    work = Path(tempfile.mkdtemp(prefix="stagewise-new-classes-"))
    try:
        parts = regrouped(images, work / "data", args.seed)
        common = dict(data=parts["train"], calibration_data=parts["calibration"], new_classes=True, force=True,
                      device=args.device, threads=args.threads, target_drop=args.target_drop,
                      input_size=args.input_size)
        conversions = {}
        last, phases, total = timed_convert(model=args.model, out=work / "last.swb", cache=work / "cache-last",
                                            **common)
        conversions["last-layer classifier"] = {"phases": phases, "total_s": total}
        early, phases, total = timed_convert(model=args.model, out=work / "early.swb", exits=["auto:2"],
                                             cache=work / "cache", **common)
        conversions["early exit, auto:2"] = {"phases": phases, "total_s": total}
        _, phases, total = timed_convert(model=args.model, out=work / "again.swb", exits=["auto:2"],
                                         cache=work / "cache", **common)
        conversions["early exit, auto:2, features cached"] = {"phases": phases, "total_s": total}
        test = open_image_set(parts["test"])
        manifest = read_bundle(early).manifest
        with load(early, threads=args.threads) as cascade, load(last, threads=args.threads) as reference:
            result = benchmark(cascade, harness.decode_all(test, "decoding test images"), test.targets,
                               references={"last": reference})
        last_ms = next(r["mean_ms"] for r in result["rows"] if r["kind"] == "reference")
        names = sorted({p for c in conversions.values() for p in c["phases"]})
        out = {**harness.metadata(NAME, argv), "model": args.model, "device": args.device, "threads": args.threads,
               "split": f"stratified 0.6/0.2/0.2 seed {args.seed}", "coarse_classes": {k: list(v) for k, v in COARSE.items()},
               "n_images": len(images), "n_test": len(test), "exits": [s.head.get("after") for s in manifest.stages],
               "conversions": conversions, "phase_names": names, "bench": result, "last_ms": last_ms}
        harness.save(out, args.out, markdown)
        harness.publish(args, NAME, markdown(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
