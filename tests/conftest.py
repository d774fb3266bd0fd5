"""Shared test fixtures: tiny labelled image folders, hand-made manifests and a scripted mock backend."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stagewise.datasets import ImageSet
from stagewise.manifest import Manifest


def make_image_folder(root: Path, classes: int = 3, per_class: int = 40, size: int = 16, seed: int = 0) -> Path:
    """Class folders of noisy images whose dominant colour channel is the class (easy to learn)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 110, (size, size, 3)).astype(np.uint8)
            img[..., c % 3] += np.uint8(100 + 40 * (c // 3))
            Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


def texture_images(n: int, seed: int, size: int = 32) -> ImageSet:
    """Grey noise whose contrast is the class (std 25 or 50): downscaling averages the noise away,
    so a model trained at ``size`` sees weaker activations at a smaller size."""
    rng = np.random.default_rng(seed)
    sources, targets = [], []
    for i in range(n):
        c = i % 2
        img = np.clip(128 + rng.normal(0, (25, 50)[c], (size, size, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="PNG")
        sources.append(buffer.getvalue())
        targets.append(c)
    return ImageSet(tuple(sources), np.array(targets), ("smooth", "rough"))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def stage_entry(name: str, source: dict, files: list[str], carry: bool, score: str = "max_softmax",
                combine: str = "own") -> dict:
    return {"name": name, "input": source,
            "artifacts": {"onnx": {"files": [{"path": f} for f in files], "precision": "fp32"}},
            "outputs": {"logits": "logits", **({"carry": "carry"} if carry else {})},
            "exit": {"score": score, "temperature": 1.0, "combine": combine}, "cost": {"macs": 1}}


def manifest_for(stages: list[dict], labels: list[str], thresholds: dict[str, list]) -> dict:
    """A valid manifest around ``stages`` with named operating points."""
    return {
        "format": "stagewise-bundle", "format_version": 1, "name": "test",
        "producer": {"stagewise": "0.1.0", "source_framework": "torch"},
        "task": {"type": "classification", "labels": labels},
        "input": {"color": "RGB", "layout": "NCHW", "dtype": "float32", "mean": [0, 0, 0], "std": [1, 1, 1],
                  "resize": "stretch"},
        "stages": stages,
        "operating_points": [{"name": n, "thresholds": t} for n, t in thresholds.items()],
        "default_operating_point": next(iter(thresholds)),
    }


def assert_manifest_round_trips(bundle: Path) -> None:
    """The bundle's ``manifest.json`` parses to a :class:`Manifest` whose ``to_dict`` is the document itself."""
    if bundle.is_dir():
        doc = json.loads((bundle / "manifest.json").read_text())
    else:
        with zipfile.ZipFile(bundle) as zf:
            doc = json.loads(zf.read("manifest.json"))
    assert Manifest.from_dict(doc).to_dict() == doc


def onnx_stage_model(path: Path, rows: int, cols: int, scale: float) -> None:
    """A tiny ONNX stage (input ``image`` n x 3 x 8 x 8, output ``logits`` n x 3): the mean colour of the
    top-left ``rows`` x ``cols`` pixels, times ``scale``, as class logits (the dominant channel is the class)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array((np.eye(3) * scale).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(3, np.float32), "b")
    starts = numpy_helper.from_array(np.array([0, 0], np.int64), "starts")
    ends = numpy_helper.from_array(np.array([rows, cols], np.int64), "ends")
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    nodes = [helper.make_node("Slice", ["image", "starts", "ends", "axes"], ["crop"]),
             helper.make_node("GlobalAveragePool", ["crop"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["logits"])]
    graph = helper.make_graph(nodes, "stage", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
                              [w, b, starts, ends, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


class FakeClock:
    """A clock that only moves when a mock stage 'runs'."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ScriptedStage:
    """A mock stage: takes ``latency_ms`` on the fake clock; its confidence comes from the input.

    Stage ``k`` reads pixel (0, k) of channel 0 as a confidence in 0-255 and predicts the class in
    channel 1, pixel (0, 0); the carry is the input itself, so every stage sees the image.
    """

    def __init__(self, k: int, clock: FakeClock, latency_ms: float | list[float], classes: int = 3):
        self.k, self.clock, self.classes = k, clock, classes
        self.latencies = latency_ms if isinstance(latency_ms, list) else None
        self.latency = latency_ms
        self.calls: list[int] = []

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        self.calls.append(len(x))
        ms = self.latencies.pop(0) if self.latencies else self.latency
        self.clock.now += ms / 1e3
        confidence = x[:, 0, 0, self.k] / 255.0
        label = x[:, 1, 0, 0].astype(int) % self.classes
        logits = np.zeros((len(x), self.classes), dtype=np.float32)
        strength = np.log(np.clip(confidence, 1e-3, 1 - 1e-3) / (1 - np.clip(confidence, 1e-3, 1 - 1e-3)) * (self.classes - 1))
        logits[np.arange(len(x)), label] = strength
        return {"logits": logits, "carry": x}


def scripted_image(confidences: list[int], label: int, size: int = 8) -> np.ndarray:
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[0, :len(confidences), 0] = confidences
    img[0, 0, 1] = label
    return img
