"""Build the small CIFAR-10 demo set committed in ``sdk/demo_data/cifar10-1000``.

Takes the test part of the example's split of ``../shared/data/cifar10-train.tar.gz``
(``open_image_set(...).split([0.8, 0.1, 0.1], seed=0)[2]``: images that neither the committed
weights nor any threshold of the benchmarks were fitted on), keeps a stratified 1,000 of its
5,000 (``test.split([0.2], seed=0)[0]``: 100 per class) and writes them unchanged as PNG class
folders::

    <out>/<class>/<index>.png
    <out>/README.md

Run from the repository root (nothing is downloaded)::

    python -m benchmarks.make_cifar10_demo_images
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from benchmarks import harness

DEFAULT_OUT = harness.REPO_ROOT / "sdk" / "demo_data" / "cifar10-1000"

README = """# CIFAR-10 demo images (1,000)

1,000 CIFAR-10 training-set images (32x32 RGB PNG, 100 per class, class folders) for the second
part of `stagewise demo`. Read them with `stagewise.datasets.open_image_set("<this folder>")`.

- Source: `cifar10-train.tar.gz` (the CIFAR-10 training archive, not part of this repository).
- Which: the *test* part of the example's split, `open_image_set(archive).split([0.8, 0.1, 0.1],
  seed=0)[2]` — images the committed CIFAR-10 weights (`examples/cifar10`) were not trained on —
  stratified down to 1,000 with `.split([0.2], seed=0)[0]`; pixels unchanged.
- How it was made: `python -m benchmarks.make_cifar10_demo_images`.
- Licence: CIFAR-10 (Krizhevsky, 2009) is distributed by its authors for research use; the images
  come from the 80 Million Tiny Images collection and remain the property of their copyright
  holders. They are not covered by the project's Apache-2.0 licence.
"""


def main() -> int:
    ap = harness.parser(__doc__, threads=None)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    from stagewise.datasets import open_image_set

    archive = harness.require_data(args.data, harness.CIFAR10)
    test = open_image_set(archive).split([0.8, 0.1, 0.1], seed=0)[2]
    demo = test.split([0.2], seed=0)[0]
    for i in range(len(demo)):
        folder = args.out / demo.classes[demo.targets[i]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(demo.image(i)).save(folder / f"{i:04d}.png", optimize=True)
    (args.out / "README.md").write_text(README)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {len(demo)} images to {args.out} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
