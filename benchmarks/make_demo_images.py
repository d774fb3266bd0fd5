"""Build the small ImageNet demo set committed in ``sdk/demo_data/imagenet-160``.

Picks 160 of the 1,000 images of the ImageNet sample (``../shared/data/imagenet-sample-320.tar``,
one image per ILSVRC-2012 class) with ``numpy.random.default_rng(0).choice(1000, 160, replace=False)``,
re-encodes each with Pillow so that the shorter side is 300 px (Lanczos resampling) as a progressive
JPEG of quality 85 (``optimize=True``, no metadata; progressive coding stores the same pixels
as baseline in about 4% fewer bytes, which keeps the set under 5 MB), and writes::

    <out>/images/<wnid>.jpg
    <out>/labels.tsv     index  wnid  name  file   (rows in class-index order; index = ILSVRC-2012 class)
    <out>/README.md

Run from the repository root::

    python -m benchmarks.make_demo_images

Nothing is downloaded; the script exits with a message if the sample archive is absent.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from benchmarks import harness

DEFAULT_OUT = harness.REPO_ROOT / "sdk" / "demo_data" / "imagenet-160"
ARCHIVE = harness.IMAGENET
SIZE_LIMIT = 5_000_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = harness.parser(__doc__, threads=None)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: sdk/demo_data/imagenet-160)")
    ap.add_argument("--n", type=int, default=160, help="number of images (default 160)")
    ap.add_argument("--seed", type=int, default=0, help="numpy default_rng seed of the choice (default 0)")
    ap.add_argument("--short-side", type=int, default=300, help="shorter side in pixels (default 300)")
    ap.add_argument("--quality", type=int, default=85, help="JPEG quality (default 85)")
    return ap.parse_args(argv)


def read_sample(archive: Path) -> tuple[list[list[str]], dict[str, bytes]]:
    """Rows of ``labels.tsv`` (sorted by class index) and the image bytes by their tsv ``file``."""
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        tsv_name = min((k for k in members if PurePosixPath(k).name == "labels.tsv"), key=len)
        base = PurePosixPath(tsv_name).parent
        text = tar.extractfile(members[tsv_name]).read().decode()
        lines = text.splitlines()
        if lines[0].split("\t") != ["index", "wnid", "name", "file"]:
            sys.exit(f"error: unexpected labels.tsv header in {archive}: {lines[0]!r}")
        rows = sorted((line.split("\t") for line in lines[1:] if line.strip()), key=lambda r: int(r[0]))
        files = {r[3]: tar.extractfile(members[(base / r[3]).as_posix()]).read() for r in rows}
    return rows, files


def reencode(data: bytes, short_side: int, quality: int) -> tuple[bytes, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = short_side / min(w, h)
        size = (short_side, max(1, round(h * scale))) if w <= h else (max(1, round(w * scale)), short_side)
        im = im.resize(size, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality, optimize=True, progressive=True)
    return buf.getvalue(), size


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    archive = harness.require_data(args.data, ARCHIVE)
    rows, files = read_sample(archive)
    rng = np.random.default_rng(args.seed)
    picked = np.sort(rng.choice(len(rows), size=args.n, replace=False))

    images_dir = args.out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for stale in images_dir.glob("*.jpg"):
        stale.unlink()
    out_rows = ["index\twnid\tname\tfile"]
    total = 0
    for i in picked:
        index, wnid, name, src = rows[i]
        data, _ = reencode(files[src], args.short_side, args.quality)
        rel = f"images/{wnid}.jpg"
        (args.out / rel).write_bytes(data)
        total += len(data)
        out_rows.append(f"{index}\t{wnid}\t{name}\t{rel}")
    labels_text = "\n".join(out_rows) + "\n"
    (args.out / "labels.tsv").write_text(labels_text)
    total += len(labels_text.encode())

    readme = f"""# ImageNet demo images (160)

{args.n} photographs, one each of {args.n} different ImageNet (ILSVRC-2012) classes, for the
stagewise demo, examples and tests. Read them with
`stagewise.datasets.open_image_set("<this folder>")`.

- `labels.tsv`: `index  wnid  name  file`, the same format as the full sample; `index` is the
  standard ILSVRC-2012 class index (sorted wnids, 0-999) that ImageNet classifiers predict, so
  it is not contiguous here. `file` is `images/<wnid>.jpg`.
- Source: the 1,000-image ImageNet sample `{ARCHIVE}` (one image per class, shorter side
  320 px, JPEG quality 90), which is not part of this repository.
- How it was made: `python -m benchmarks.make_demo_images` chose {args.n} of the 1,000 images with
  `numpy.random.default_rng({args.seed}).choice(1000, {args.n}, replace=False)`, then Pillow resized
  each so its shorter side is {args.short_side} px (Lanczos) and saved it as a JPEG of quality
  {args.quality} (progressive, `optimize=True`, no metadata).
- Size: {total / 1e6:.2f} MB for the images and `labels.tsv`.
- Licence: the images come from ImageNet and remain the property of their copyright holders.
  They are included for non-commercial research and demonstration use only, under the ImageNet
  terms of access (https://image-net.org/download); they are not covered by the project's
  Apache-2.0 licence. Do not redistribute them for other purposes.
"""
    (args.out / "README.md").write_text(readme)
    total_all = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.n} images to {args.out}: {total_all / 1e6:.2f} MB in all "
          f"({total_all} bytes, README included)")
    if total_all >= SIZE_LIMIT:
        print(f"warning: the demo set is over {SIZE_LIMIT / 1e6:.0f} MB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
