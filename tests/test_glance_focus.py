"""Glance and focus (AnchorNet): CAM output, patch choice, patch stages in the manifest, converter and runtime."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import stagewise
from stagewise.converters.build import build_bundle
from stagewise.converters.options import BuildOptions
from stagewise.converters.plans import glance_focus_plans
from stagewise.converters.torch_cam import glance_stage
from stagewise.datasets import open_image_set
from stagewise.errors import ConversionError, ManifestError
from stagewise.images import Preprocess
from stagewise.manifest import CamGrid, Manifest
from stagewise.runtimes.patches import PatchChoice, box_iou, cell_boxes, select_patches
from toy_models import residual_net

PRE = Preprocess(mean=(128, 128, 128), std=(64, 64, 64), resize="stretch", crop_fraction=1.0)


def test_patches_follow_the_iou_rule_and_the_count():
    rng = np.random.default_rng(0)
    grid = CamGrid((7, 7), "proportional", (32.0, 32.0), (16.0, 16.0))
    boxes = cell_boxes(grid, (224, 224), (0.0, 0.0, 448.0, 448.0), 0.4)
    for count, iou in [(1, 0.3), (3, 0.3), (5, 0.1), (4, 0.6)]:
        cam = rng.normal(size=(7, 7))
        kept = select_patches(cam, boxes, count, iou)
        assert len(kept) == count and len(set(kept.tolist())) == count
        assert kept[0] == cam.argmax()
        for t in range(1, count):
            assert box_iou(boxes[kept[t]], boxes[kept[:t]]).max() < iou
            # every cell scoring higher than the chosen one overlaps a patch kept before it
            better = np.flatnonzero(cam.ravel() > cam.ravel()[kept[t]])
            skipped = [i for i in better if i not in kept[:t]]
            assert all(box_iou(boxes[i], boxes[kept[:t]]).max() >= iou for i in skipped)


def test_patch_boxes_sit_on_the_cells_inside_the_view():
    grid = CamGrid((4, 4), "proportional", (8.0, 8.0), (4.0, 4.0))
    view = (10.0, 0.0, 74.0, 64.0)  # a 64 x 64 region of the original image, 2 pixels per input pixel
    boxes = cell_boxes(grid, (32, 32), view, 0.25)
    np.testing.assert_allclose(boxes[5], [10 + 24 - 8, 24 - 8, 10 + 24 + 8, 24 + 8])  # cell (1, 1) centred at 12 px
    assert (boxes[:, 0] >= 10).all() and (boxes[:, 2] <= 74).all() and (boxes[:, 1] >= 0).all()
    np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], 16.0)
    # too few cells pass the rule: the best others fill the count
    assert len(select_patches(np.arange(16.0), boxes, 16, 0.01)) == 16


def test_random_patches_are_seeded_by_seed_and_image():
    cam = np.zeros((4, 4))
    image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    grid = CamGrid((4, 4), "proportional", (1.0, 1.0), (0.5, 0.5))
    args = (grid, (4, 4), (0.0, 0.0, 4.0, 4.0), 0.25, 3, 0.3)
    first = PatchChoice("random", 1).boxes(cam, image, *args)
    np.testing.assert_array_equal(first, PatchChoice("random", 1).boxes(cam, image, *args))
    seeds = [PatchChoice("random", s).boxes(cam, image, *args) for s in range(2, 8)]
    assert any(not np.array_equal(first, other) for other in seeds)
    with pytest.raises(ValueError):
        PatchChoice("saliency")


def test_exact_mapping_for_a_network_without_padding():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(4, 8, 3, stride=2),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5))
    module, grid = glance_stage(net, (32, 32))
    assert grid == CamGrid((7, 7), "exact", (4.0, 4.0), (3.5, 3.5), (7, 7))
    _, padded = glance_stage(residual_net(), (16, 16))
    assert padded.mapping == "proportional" and padded.grid == (8, 8) and padded.stride == (2.0, 2.0)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, cam = module(x)
        features = net[:4](x)
        expected = torch.einsum("nc,nchw->nhw", net[6].weight[net(x).argmax(1)], features)
    torch.testing.assert_close(logits, net(x))
    torch.testing.assert_close(cam, expected)


def test_a_model_without_pooling_and_linear_is_refused():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 3))
    with pytest.raises(ConversionError, match="global average pooling"):
        glance_stage(net, (16, 16))
    conv_head = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3), torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten())
    with pytest.raises(ConversionError, match="Linear"):
        glance_stage(conv_head, (16, 16))


@pytest.fixture(scope="module")
def calib(image_folder):
    return open_image_set(image_folder)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, calib):
    torch.manual_seed(0)
    plans = glance_focus_plans(("glance", residual_net(), (16, 16)), (residual_net(), (16, 16)), count=2, iou=0.3,
                               patch_fraction=0.5)
    out = tmp_path_factory.mktemp("glance") / "gf.swb"
    return build_bundle(out, "gf", plans, PRE, calib.classes, calib, BuildOptions(profile_images=3), kind="cascade")


def test_exported_cam_equals_the_torch_cam(bundle, calib):
    torch.manual_seed(0)
    source = residual_net()
    images = [calib.image(i) for i in range(20)]
    with stagewise.load(bundle, threads=1) as cascade:
        session = cascade._stages[0].session
        out = session.run(PRE.pixels(images, (16, 16)))
        spec = cascade.bundle.manifest.stages[0]
    x = torch.from_numpy(PRE.tensor(images, (16, 16)))
    with torch.no_grad():
        features = source.layer2(source.down(source.layer1(source.stem(x))))
        logits = source(x)
        cam = torch.einsum("nc,nchw->nhw", source.fc.weight[logits.argmax(1)], features)
    np.testing.assert_allclose(out["cam"], cam.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["logits"], logits.numpy(), rtol=1e-4, atol=1e-4)
    assert spec.outputs.cam == "cam" and spec.cam.grid == (8, 8) and spec.cam.mapping == "proportional"


def test_batch_equals_one_by_one_with_patch_stages(bundle, calib):
    images = [calib.image(i) for i in range(len(calib))]
    with stagewise.load(bundle, threads=1) as cascade:
        manifest = cascade.bundle.manifest
        assert [s.input.source for s in manifest.stages] == ["image", "patch", "patch"]
        point = next(p.name for p in manifest.operating_points if p.name != "full")
        for mode in ("cam", "random"):
            cascade.choose_patches(mode, seed=3)
            single = [cascade.predict(im, operating_point=point) for im in images]
            batch = cascade.predict_batch(images, operating_point=point, max_batch=16)
            assert [(p.label, p.stage_index) for p in batch] == [(p.label, p.stage_index) for p in single]
            np.testing.assert_allclose([p.score for p in batch], [p.score for p in single], rtol=1e-5)
            assert [[r.box for r in p.trace] for p in batch] == [[r.box for r in p.trace] for p in single]
        full = [cascade.run_all_stages(im) for im in images[:10]]
    for p in full:
        glance, first, second = p.trace
        assert glance.box is None and first.box is not None and second.box is not None
        side = first.box[2] - first.box[0]
        assert side == pytest.approx(8.0) and box_iou(np.array(first.box), np.array([second.box]))[0] < 0.3


def _document(bundle_path) -> dict:
    return Manifest.from_dict(stagewise.bundle.read_bundle(bundle_path).manifest.to_dict()).to_dict()


def test_manifest_with_patch_stages_validates_and_a_patch_from_a_stage_without_cam_is_refused(bundle):
    doc = _document(bundle)
    assert Manifest.from_dict(doc).to_dict() == doc
    broken = copy.deepcopy(doc)
    del broken["stages"][0]["outputs"]["cam"]
    del broken["stages"][0]["cam"]
    with pytest.raises(ManifestError, match="glance.*no CAM output.*--focus"):
        Manifest.from_dict(broken)
    half = copy.deepcopy(doc)
    del half["stages"][0]["cam"]
    with pytest.raises(ManifestError, match="both outputs.cam"):
        Manifest.from_dict(half)
    index = copy.deepcopy(doc)
    index["stages"][2]["input"]["index"] = 2
    with pytest.raises(ManifestError, match="below count"):
        Manifest.from_dict(index)
    unknown = copy.deepcopy(doc)
    unknown["stages"][1]["input"]["from"] = "focus1"
    with pytest.raises(ManifestError, match="not an earlier stage"):
        Manifest.from_dict(unknown)


def test_cli_converts_inspects_and_explains_a_glance_and_focus_bundle(tmp_path, image_folder):
    from pathlib import Path

    from click.testing import CliRunner
    from PIL import Image

    from stagewise.cli import cli

    toy = str(Path(__file__).with_name("toy_models.py"))
    out = tmp_path / "gf"
    runner = CliRunner()
    done = runner.invoke(cli, ["convert", "--stage", f"{toy}:residual_net@16", "--focus", f"{toy}:residual_net@16",
                               "--patches", "2", "--iou", "0.3", "--patch-fraction", "0.5", "--data", str(image_folder),
                               "--out", str(out), "--threads", "1"])
    assert done.exit_code == 0, done.output
    shown = runner.invoke(cli, ["inspect", str(out)])
    assert "proportional mapping" in shown.output and "patch 2/2 from glance" in shown.output
    image = next(image_folder.glob("class0/*.png"))
    picture = tmp_path / "why.png"
    ran = runner.invoke(cli, ["run", str(out), str(image), "--operating-point", "full", "--explain", str(picture),
                              "--patches", "random", "--patch-seed", "1", "--json"])
    assert ran.exit_code == 0, ran.output
    assert Image.open(picture).size == (16, 16)
    trace = json.loads(ran.output.splitlines()[-1])["trace"]
    assert trace[0]["box"] is None and all(len(r["box"]) == 4 for r in trace[1:])


@pytest.mark.parametrize("artifact_format, runtime, packages", [("openvino", "openvino", ("openvino",)),
                                                                ("tflite", "litert", ("ai_edge_litert", "litert_torch"))])
def test_other_runtimes_run_the_glance_and_focus_bundle_like_onnx_runtime(tmp_path, calib, artifact_format, runtime,
                                                                          packages):
    for package in packages:
        pytest.importorskip(package, reason=f"{package} is not installed")
    torch.manual_seed(0)
    plans = glance_focus_plans(("glance", residual_net(), (16, 16)), (residual_net(), (16, 16)), count=2, iou=0.3,
                               patch_fraction=0.5)
    out = build_bundle(tmp_path / "gf", "gf", plans, PRE, calib.classes, calib,
                       BuildOptions(formats=("onnx", artifact_format), profile_images=3), kind="glance_focus")
    images = [calib.image(i) for i in range(30)]
    answers = {}
    for name in ("onnxruntime", runtime):
        with stagewise.load(out, runtime=name, threads=1) as cascade:
            answers[name] = [(p.label, p.stage_index, p.trace[-1].box) for p in cascade.predict_batch(images, "full")]
    assert answers[runtime] == answers["onnxruntime"]


def test_zoo_names_are_short_for_the_model_zoo():
    from stagewise.converters import zoo
    from stagewise.converters.factory import load_factory

    assert load_factory("zoo:efficientnet_lite0") is zoo.efficientnet_lite0
    with pytest.raises(ConversionError, match="no callable"):
        load_factory("zoo:resnet9000")


def test_a_toml_config_describes_a_glance_and_focus_conversion(tmp_path):
    from stagewise.converters import request_from_toml

    config = tmp_path / "glance.toml"
    config.write_text('kind = "glance_focus"\nout = "g.swb"\ndata = "images"\n\n[[stages]]\n'
                      'model = "zoo:efficientnet_lite0"\nsize = 224\n\n[focus]\nmodel = "zoo:efficientnet_lite0"\n'
                      'size = 224\npatches = 2\niou = 0.4\npatch_fraction = 0.6\n')
    job = request_from_toml(config, {"patches": 3})
    assert job.kind == "glance_focus" and job.focus.model == "zoo:efficientnet_lite0" and job.focus.size == 224
    assert (job.steps.patches, job.steps.iou, job.steps.patch_fraction) == (3, 0.4, 0.6) and job.out == tmp_path / "g.swb"
