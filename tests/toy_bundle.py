"""A small real ONNX bundle (three image stages, three classes), the ONNX stage models it is made of,
an image it classifies, and the manifest round-trip check the bundle tests share."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from stagewise.bundle import write_bundle
from stagewise.manifest import Manifest
from stagewise.testing import manifest_for, stage_entry


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


def toy_manifest(labels: Sequence[str] = ("red", "green", "blue"), latency: bool = True) -> dict:
    """The toy bundle's manifest: operating points ``full`` and ``fast``; with ``latency``, a profile of stage 0."""
    stages = [stage_entry(f"s{k}", {"source": "image", "size": [8, 8], "tensor": "image"}, [f"onnx/s{k}.onnx"],
                          carry=False) for k in range(3)]
    manifest = manifest_for(stages, labels, {"full": [None, None, None], "fast": [0.6, 0.6, None]})
    manifest["input"].update(mean=[128, 128, 128], std=[64, 64, 64])
    if latency:
        manifest["stages"][0]["cost"]["latency_ms"] = {"onnxruntime-cpu-defaultt": {"p50": 1.0, "p95": 2.0}}
    return manifest


def toy_files(folder: Path) -> dict[str, Path]:
    """The three stage models (stage ``k`` sees the top-left 4x4, 8x4 and 8x8 pixels), written in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for k, (rows, cols) in enumerate([(4, 4), (8, 4), (8, 8)]):
        f = folder / f"s{k}.onnx"
        onnx_stage_model(f, rows, cols, scale=6.0)
        files[f"onnx/s{k}.onnx"] = f
    return files


def toy_bundle(out: Path, models: Path, manifest: dict | None = None) -> Path:
    """Write the toy bundle (``manifest``, default :func:`toy_manifest`) to ``out`` (a directory, or a
    ``.swb``), its models built in ``models``."""
    return write_bundle(out, manifest or toy_manifest(), toy_files(models))


def toy_image() -> np.ndarray:
    """An 8x8 image that every stage calls "green"."""
    img = np.full((8, 8, 3), 100, np.uint8)
    img[..., 1] = 220
    return img


def assert_manifest_round_trips(bundle: Path) -> None:
    """The bundle's ``manifest.json`` parses to a :class:`Manifest` whose ``to_dict`` is the document itself."""
    if bundle.is_dir():
        doc = json.loads((bundle / "manifest.json").read_text())
    else:
        with zipfile.ZipFile(bundle) as zf:
            doc = json.loads(zf.read("manifest.json"))
    assert Manifest.from_dict(doc).to_dict() == doc


def nodes_for_seconds(open_probe: Callable[[int], Callable[[], object]], seconds: float, probe: int = 40) -> int:
    """How many repeated nodes make a slow test stage run ``seconds`` on this machine: ``open_probe(probe)`` builds
    a ``probe``-node stage and returns a call that runs it once; the fastest of three timed runs sizes it, so a
    busy machine sizes the stage longer, never shorter. Machines differ 2x in speed: never hard-code the count."""
    run = open_probe(probe)
    run()
    fastest = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        fastest = min(fastest, time.perf_counter() - t0)
    return max(probe, int(seconds / (fastest / probe)) + 1)
