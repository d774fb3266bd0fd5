"""Exit decisions in the graph: a stage exported with its exit score and answer as outputs (ONNX, the temperature
fed as an input) or given them at load time (OpenVINO) answers as the executor's numpy scoring does, one image or a
batch, for every score the graph can compute; a bundle without them keeps the numpy path."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from stagewise.bundle import write_bundle  # noqa: E402
from stagewise.converters.onnx_export import add_decision  # noqa: E402
from stagewise.exits import GRAPH_SCORES  # noqa: E402
from stagewise.manifest import Manifest  # noqa: E402
from stagewise.runtimes import load  # noqa: E402
from toy_bundle import toy_files, toy_manifest  # noqa: E402

TEMPERATURES = (1.7, 0.6, 1.3)


def _manifest(score: str) -> dict:
    manifest = toy_manifest(latency=False)
    for stage, t in zip(manifest["stages"], TEMPERATURES):
        stage["exit"].update(score=score, temperature=t)
    return manifest


def _images(n: int = 24) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(n)]


def _with_thresholds(manifest: dict, plain: Path, images: list[np.ndarray]) -> dict:
    """``manifest`` with operating point ``mid``: each stage exits at the median of its scores on ``images``."""
    with load(plain, runtime="onnxruntime", warmup=False) as cascade:
        scores = np.array([[r.score for r in cascade.run_all_stages(im).trace] for im in images])
    manifest = copy.deepcopy(manifest)
    mid = [float(v) for v in np.median(scores, axis=0)[:-1]] + [None]
    manifest["operating_points"].insert(0, {"name": "mid", "thresholds": mid})
    manifest["default_operating_point"] = "mid"
    return manifest


def _bundles(tmp_path: Path, score: str, images: list[np.ndarray]) -> tuple[Path, Path]:
    """The toy bundle scored in numpy (no decision outputs) and the same with the decision in each ONNX graph."""
    files = toy_files(tmp_path / "models")
    manifest = _manifest(score)
    first = write_bundle(tmp_path / "probe", manifest, files)
    manifest = _with_thresholds(manifest, first, images)
    plain = write_bundle(tmp_path / "plain", manifest, files)
    decided_files, decided = {}, copy.deepcopy(manifest)
    for stage in decided["stages"]:
        rel = stage["artifacts"]["onnx"]["files"][0]["path"]
        out = tmp_path / "decided" / Path(rel).name
        out.parent.mkdir(exist_ok=True)
        stage["artifacts"]["onnx"]["decision"] = add_decision(files[rel], out, "logits", score)
        decided_files[rel] = out
    return plain, write_bundle(tmp_path / "graph", decided, decided_files)


def _same(got, expected) -> None:
    assert (got.label, got.stage_index, got.budget_limited) == (expected.label, expected.stage_index, expected.budget_limited)
    assert got.score == pytest.approx(expected.score, rel=1e-5, abs=1e-6)
    assert [(r.decision, r.label) for r in got.trace] == [(r.decision, r.label) for r in expected.trace]
    assert [r.score for r in got.trace] == pytest.approx([r.score for r in expected.trace], rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(got.probabilities, expected.probabilities, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("score", GRAPH_SCORES)
def test_onnx_graph_decision_answers_as_numpy(tmp_path, score):
    images = _images()
    plain, graph = _bundles(tmp_path, score, images)
    doc = json.loads((graph / "manifest.json").read_text())
    assert Manifest.from_dict(doc).to_dict() == doc and Manifest.from_dict(doc).stages[0].artifacts["onnx"].decision
    with load(plain, runtime="onnxruntime") as reference, load(graph, runtime="onnxruntime") as cascade:
        assert [st.decision for st in reference._stages] == [None] * 3
        assert all(st.decision == ("exit_score", "exit_label") for st in cascade._stages)
        answers = [reference.predict(im) for im in images]
        assert len({a.stage_index for a in answers}) > 1  # the thresholds let some images exit early and others not
        for im, expected in zip(images, answers):
            _same(cascade.predict(im), expected)
        for got, expected in zip(cascade.predict_batch(images, max_batch=7), answers):
            _same(got, expected)
        for k in range(3):
            _same(cascade.predict_stage(images[0], k), reference.predict_stage(images[0], k))


def test_refitted_temperature_reaches_the_graph(tmp_path):
    """The temperature is an input of the exported graph: a manifest refitted after export (``stagewise
    calibrate``) changes the graph's scores without touching the model files."""
    images = _images(4)
    _, graph = _bundles(tmp_path, "max_softmax", images)
    doc = json.loads((graph / "manifest.json").read_text())
    with load(graph, runtime="onnxruntime") as cascade:
        before = [r.score for r in cascade.run_all_stages(images[0]).trace]
    for stage in doc["stages"]:
        stage["exit"]["temperature"] = 4.0
    (graph / "manifest.json").write_text(json.dumps(doc))
    with load(graph, runtime="onnxruntime") as cascade:
        after = cascade.run_all_stages(images[0])
    logits = np.stack([lg[0] for lg in cascade_logits(graph, images[0])])
    expected = [float(np.max(np.exp(z / 4.0 - np.max(z / 4.0)) / np.exp(z / 4.0 - np.max(z / 4.0)).sum())) for z in logits]
    assert [r.score for r in after.trace] == pytest.approx(expected, rel=1e-5)
    assert [r.score for r in after.trace] != pytest.approx(before, rel=1e-3)


def cascade_logits(bundle: Path, image: np.ndarray) -> list[np.ndarray]:
    with load(bundle, runtime="onnxruntime", warmup=False) as cascade:
        return cascade.stage_logits([image])


def test_a_changed_score_falls_back_to_numpy(tmp_path):
    """A bundle recalibrated with another exit score than its graph computes is scored in numpy."""
    images = _images(6)
    plain, graph = _bundles(tmp_path, "max_softmax", images)
    for folder in (plain, graph):
        doc = json.loads((folder / "manifest.json").read_text())
        for stage in doc["stages"]:
            stage["exit"]["score"] = "margin"
        (folder / "manifest.json").write_text(json.dumps(doc))
    with load(plain, runtime="onnxruntime") as reference, load(graph, runtime="onnxruntime") as cascade:
        assert [st.decision for st in cascade._stages] == [None] * 3
        for im in images:
            _same(cascade.predict(im), reference.predict(im))


@pytest.mark.parametrize("score", GRAPH_SCORES)
def test_openvino_adds_the_decision_at_load(tmp_path, score):
    ov = pytest.importorskip("openvino")
    images = _images()
    plain, _ = _bundles(tmp_path, score, images)
    doc = json.loads((plain / "manifest.json").read_text())
    files = {}
    for stage in doc["stages"]:
        artifact = stage["artifacts"].pop("onnx")
        name = Path(artifact["files"][0]["path"]).stem
        xml = tmp_path / "ir" / f"{name}.xml"
        ov.save_model(ov.convert_model(str(plain / artifact["files"][0]["path"])), str(xml), compress_to_fp16=False)
        artifact["files"] = [{"path": f"openvino/{name}.xml"}, {"path": f"openvino/{name}.bin"}]
        stage["artifacts"]["openvino"] = artifact
        files.update({f"openvino/{name}.xml": xml, f"openvino/{name}.bin": xml.with_suffix(".bin")})
    bundle = write_bundle(tmp_path / "ov", doc, files)
    with load(plain, runtime="onnxruntime") as reference, \
            load(bundle, runtime="openvino", options={"cache_dir": False}) as cascade:
        assert all(st.decision == ("exit_score", "exit_label") for st in cascade._stages)
        answers = [reference.predict(im) for im in images]
        for im, expected in zip(images, answers):
            _same(cascade.predict(im), expected)
        for got, expected in zip(cascade.predict_batch(images, max_batch=5), answers):
            _same(got, expected)


def test_logits_without_a_known_class_count_get_no_decision(tmp_path):
    """The exporter leaves a stage whose logits have no fixed class count to the executor's scoring."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["image"], ["logits"])], "s",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", "c"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", "c"])])
    src = tmp_path / "s.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    assert add_decision(src, tmp_path / "d.onnx", "logits", "max_softmax") is None
    assert not (tmp_path / "d.onnx").exists()
