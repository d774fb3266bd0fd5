"""`stagewise calibrate` end to end on real ONNX Runtime stages (tiny hand-made models, no torch).

Three stages read the same 8x8 image: stage 0 averages the top-left quadrant, stage 1 the left
half, stage 2 the whole image; each maps mean colour to class logits (the dominant channel is
the class), so later stages see more pixels and are more often right.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from stagewise.bundle import read_bundle
from stagewise.cli import cli
from stagewise.datasets import open_image_set
from stagewise.errors import CalibrationError, DatasetError
from stagewise.runtimes import load
from stagewise.runtimes.calibrate import exit_table
from toy_bundle import toy_bundle, toy_manifest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """Labelled class folders and the same images as one flat, unlabelled folder."""
    root = tmp_path_factory.mktemp("cal-data")
    rng = np.random.default_rng(0)
    flat = root / "flat"
    flat.mkdir()
    for c in range(3):
        (root / "labelled" / f"class{c}").mkdir(parents=True)
        for i in range(60):
            img = rng.integers(0, 200, (8, 8, 3))
            img[..., c] += 25
            img = np.clip(img, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / "labelled" / f"class{c}" / f"{i:03d}.png")
            Image.fromarray(img).save(flat / f"c{c}_{i:03d}.png")
    return root / "labelled", flat


@pytest.fixture()
def bundle(tmp_path) -> Path:
    return toy_bundle(tmp_path / "toy.swb", tmp_path, toy_manifest(["class0", "class1", "class2"], latency=False))


def _run(*args: str):
    result = CliRunner().invoke(cli, ["calibrate", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_target_drop_prints_table(bundle, data):
    output = _run(str(bundle), "--data", str(data[0]), "--target-drop", "1")
    manifest = read_bundle(bundle).manifest
    assert manifest.default_operating_point == "drop-1pt"
    names = [p.name for p in manifest.operating_points]
    assert {"full", "drop-1pt", "pareto-1"} <= set(names)
    assert "drop-1pt" in output and "expected top-1" in output and "oracle" in output
    point = manifest.point("drop-1pt")
    assert point.expected.accuracy >= manifest.calibration["reference_accuracy"] - 0.01 - 1e-12
    assert all(s.exit.temperature != 1.0 for s in manifest.stages)  # fitted by NLL


def test_label_free_learned_score_with_guarantee(bundle, data):
    labelled, flat = data
    output = _run(str(bundle), "--data", str(flat), "--no-labels", "--score", "learned",
                  "--risk", "0.1", "--delta", "0.2")
    b = read_bundle(bundle)  # verifies every file's sha256, the learned models included
    m = b.manifest
    assert [s.exit.score for s in m.stages] == ["learned", "learned", "max_softmax"]
    model_files = [s.exit.model.path for s in m.stages[:2]]
    assert all(p.startswith("exits/") and (b.root / p).is_file() for p in model_files)
    assert m.calibration["targets"] == "full_model_agreement"
    assert m.default_operating_point == "risk-disagree-10pt-d0.2"
    point = m.point(m.default_operating_point)
    g = point.guarantee
    assert (g.epsilon, g.delta, g.risk, g.n + g.n_tune) == (0.1, 0.2, "disagreement", 180)
    assert point.expected.accuracy is None and point.expected.agreement is not None
    assert "guarantee: disagreement <= 10%" in output
    shown = CliRunner().invoke(cli, ["inspect", str(bundle)], env={"COLUMNS": "250"})
    assert "disagreement <= 10% w.p. >= 0.8" in shown.output
    b.close()
    # the runtime computes the learned score exactly as calibration did, per image and batched
    images = open_image_set(labelled)
    frames = [images.image(i) for i in range(0, len(images), 7)]
    with load(bundle, threads=1) as cascade:
        cascade.use(m.default_operating_point)
        single = [cascade.predict(f) for f in frames]
        batch = cascade.predict_batch(frames)
        assert [p.stage_index for p in single] == [p.stage_index for p in batch]
        assert [p.label for p in single] == [p.label for p in batch]
        offline = exit_table(cascade, frames, images.targets[::7], np.ones(3)).scores
        online = [[r.score for r in p.trace] for p in single]
        for k, row in enumerate(online):
            np.testing.assert_allclose(row, offline[:len(row), k], rtol=1e-5)


def test_alpha_on_directory_bundle(bundle, data, tmp_path):
    folder = tmp_path / "dir-bundle"
    b = read_bundle(bundle)
    shutil.copytree(b.root, folder)
    b.close()
    _run(str(folder), "--data", str(data[0]), "--alpha", "0.2", "--score", "max_logit", "--no-temperature")
    m = json.loads((folder / "manifest.json").read_text())
    point = next(p for p in m["operating_points"] if p["name"] == "alpha-0.2")
    assert m["default_operating_point"] == "alpha-0.2" and point["goal"]["kind"] == "false_acceptance_rate"
    # on the calibration images, at most alpha * m / M exit at stage m with a wrong answer
    images = open_image_set(data[0])
    with load(folder, threads=1) as cascade:
        logits = cascade.stage_logits([images.image(i) for i in range(len(images))])
    for k, t in enumerate(point["thresholds"][:2]):
        if t is not None:
            wrong = logits[k].copy()
            wrong[np.arange(len(wrong)), images.targets] = -np.inf
            assert (wrong.max(1) >= t).mean() <= 0.2 * (k + 1) / 3 + 1e-12
    # a learned score then back: unused model files are removed from the directory
    _run(str(folder), "--data", str(data[0]), "--score", "learned", "--target-drop", "2")
    assert len(list((folder / "exits").glob("*.npz"))) == 2
    _run(str(folder), "--data", str(data[0]), "--score", "max_softmax", "--target-drop", "2")
    assert list((folder / "exits").glob("*.npz")) == []
    read_bundle(folder).close()


def test_usage_errors(bundle, data):
    runner = CliRunner()
    both = runner.invoke(cli, ["calibrate", str(bundle), "--data", str(data[0]), "--alpha", "0.1", "--target-drop", "1"])
    assert isinstance(both.exception, CalibrationError) and "exactly one goal" in str(both.exception)
    no_delta = runner.invoke(cli, ["calibrate", str(bundle), "--data", str(data[0]), "--risk", "0.05"])
    assert isinstance(no_delta.exception, CalibrationError) and "needs delta" in str(no_delta.exception)
    bad_alpha = runner.invoke(cli, ["calibrate", str(bundle), "--data", str(data[0]), "--alpha", "1.5"])
    assert isinstance(bad_alpha.exception, CalibrationError) and "alpha must lie in (0, 1)" in str(bad_alpha.exception)
    unlabelled = runner.invoke(cli, ["calibrate", str(bundle), "--data", str(data[1]), "--target-drop", "1"])
    assert unlabelled.exit_code != 0 and "one folder per class" in str(unlabelled.exception)
    error_needs_labels = runner.invoke(cli, ["calibrate", str(bundle), "--data", str(data[1]), "--no-labels",
                                             "--risk", "0.05", "--delta", "0.1", "--risk-kind", "error_increase"])
    assert error_needs_labels.exit_code != 0 and "needs labels" in str(error_needs_labels.exception)


def test_open_image_set_without_labels_reads_any_layout(data, tmp_path):
    labelled, flat = data
    with tarfile.open(tmp_path / "flat.tar.gz", "w:gz") as tar:
        tar.add(flat, arcname="photos")
    from_flat = open_image_set(flat, labelled=False)
    from_tar = open_image_set(tmp_path / "flat.tar.gz", labelled=False)
    from_classes = open_image_set(labelled, labelled=False)
    assert len(from_flat) == len(from_tar) == len(from_classes) == 180
    assert from_flat.classes == from_classes.classes == ("unlabelled",) and not from_classes.targets.any()
    np.testing.assert_array_equal(from_flat.image(0), from_tar.image(0))
    with pytest.raises(DatasetError, match="one folder per class"):
        open_image_set(flat)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        open_image_set(tmp_path / "empty", labelled=False)


def test_label_free_conversion_end_to_end(tmp_path, data):
    """No labels anywhere: heads distilled from the teacher's softmax, thresholds from agreement."""
    pytest.importorskip("torch")
    from stagewise.calibration import Goal, Settings
    from stagewise.converters.build import build_bundle
    from stagewise.converters.options import BuildOptions
    from stagewise.converters.heads import HeadTraining
    from stagewise.converters.label_free import MARKER, TEACHER_ONLY, pseudo_labelled
    from stagewise.converters.plans import early_exit_plans
    from stagewise.images import Preprocess
    from stagewise.runtimes.calibrate import recalibrate
    from toy_models import residual_net

    import torch

    torch.manual_seed(0)
    flat = data[1]
    pre = Preprocess(mean=(128, 128, 128), std=(64, 64, 64), resize="stretch", crop_fraction=1.0)
    model = residual_net()
    images = open_image_set(flat, labelled=False)
    assert len(images) == 180 and images.classes == ("unlabelled",)
    teacher_set = pseudo_labelled(model, images, pre, (8, 8), ["a", "b", "c"])
    assert teacher_set.origin.endswith(MARKER)
    assert TEACHER_ONLY.distill == 1.0
    fast = HeadTraining(**{**TEACHER_ONLY.__dict__, "max_iter": 50})
    plans = early_exit_plans(model, ["layer1"], pre, (8, 8), teacher_set, fast)
    # the converter runs the whole suite too: no labels, learned score, a guarantee as the default point
    options = BuildOptions(profile_images=5, labelled=False, goal=Goal("risk", 0.1, 0.2),
                           calibration=Settings(score="learned"))
    out = build_bundle(tmp_path / "lf.swb", "lf", plans, pre, ["a", "b", "c"], teacher_set, options)
    built = read_bundle(out)
    assert built.manifest.stages[0].exit.score == "learned"
    assert (built.root / built.manifest.stages[0].exit.model.path).is_file()
    assert built.manifest.calibration["targets"] == "full_model_agreement"
    assert built.manifest.default_operating_point == "risk-disagree-10pt-d0.2"
    built.close()
    manifest = recalibrate(out, flat, labelled=False, target_drop=2.0, settings=Settings(score="max_softmax"))
    assert manifest.calibration["targets"] == "full_model_agreement"
    assert manifest.point("drop-2pt").expected.agreement >= 0.98 - 1e-12
    assert manifest.stages[0].exit.model is None
