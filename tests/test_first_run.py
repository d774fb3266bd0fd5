"""The README's first commands, as written, on a small generated CIFAR-10-like archive."""

from __future__ import annotations

import shlex
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")

from stagewise.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def readme_command(start: str) -> list[str]:
    """The README's shell command that starts with ``start`` (continuation lines joined)."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.strip().startswith(start))
    return shlex.split(line.split("#")[0])[1:]


def cifar_like_archive(path: Path, per_class: int = 20) -> Path:
    """A ``cifar10-train.tar.gz`` of 32x32 PNGs in class folders, whose colour depends on the class."""
    rng = np.random.default_rng(0)
    work = path.parent / "png"
    with tarfile.open(path, "w:gz") as tar:
        for c, name in enumerate(CLASSES):
            for i in range(per_class):
                img = rng.integers(0, 80, (32, 32, 3)).astype(np.uint8)
                img[..., c % 3] += np.uint8(60 + 15 * c)
                file = work / name / f"{i:03d}.png"
                file.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(file)
                tar.add(file, f"{name}/{i:03d}.png")
    return path


def test_readme_early_exit_convert_runs_as_written(tmp_path, monkeypatch):
    cifar_like_archive(tmp_path / "cifar10-train.tar.gz")
    monkeypatch.chdir(tmp_path)
    args = readme_command("stagewise convert examples/cifar10/model.py:resnet_cifar")
    args[args.index("examples/cifar10/model.py:resnet_cifar")] = f"{ROOT}/examples/cifar10/model.py:resnet_cifar"
    main([*args, "--max-head-images", "120"])  # returns normally; any failure would exit non-zero
    out = tmp_path / "cifar.swb"
    assert out.is_file()
    main(["inspect", str(out)])
