"""A small real ONNX bundle (three image stages, three classes) and an image it classifies, for the reliability tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conftest import manifest_for, onnx_stage_model, stage_entry
from stagewise.bundle import write_bundle


def toy_manifest() -> dict:
    stages = [stage_entry(f"s{k}", {"source": "image", "size": [8, 8], "tensor": "image"}, [f"onnx/s{k}.onnx"],
                          carry=False) for k in range(3)]
    manifest = manifest_for(stages, ["red", "green", "blue"], {"full": [None, None, None], "fast": [0.6, 0.6, None]})
    manifest["input"].update(mean=[128, 128, 128], std=[64, 64, 64])
    manifest["stages"][0]["cost"]["latency_ms"] = {"onnxruntime-cpu-defaultt": {"p50": 1.0, "p95": 2.0}}
    return manifest


def toy_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for k, (rows, cols) in enumerate([(4, 4), (8, 4), (8, 8)]):
        f = folder / f"s{k}.onnx"
        onnx_stage_model(f, rows, cols, scale=6.0)
        files[f"onnx/s{k}.onnx"] = f
    return files


def toy_bundle(out: Path, models: Path) -> Path:
    """Write the toy bundle to ``out`` (a directory, or a ``.swb``), its models built in ``models``."""
    return write_bundle(out, toy_manifest(), toy_files(models))


def toy_image() -> np.ndarray:
    """An 8x8 image that every stage calls "green"."""
    img = np.full((8, 8, 3), 100, np.uint8)
    img[..., 1] = 220
    return img
