"""Pixel input: stages that take uint8 NHWC and normalise in their graph agree with the float-input export,
on every format; old float-input bundles still load and answer the same."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import stagewise
from stagewise.converters.build import build_bundle
from stagewise.converters.export import StageInputs, check_signature, exporter
from stagewise.converters.options import BuildOptions
from stagewise.converters.plans import cascade_plans, pixel_plan
from stagewise.datasets import open_image_set
from stagewise.images import Preprocess
from toy_models import residual_net

PRE = Preprocess(mean=(123.7, 116.3, 103.5), std=(58.4, 57.1, 57.4), resize="shorter_crop", crop_fraction=0.875)
FORMATS = [f for f, module in (("onnx", "onnxruntime"), ("openvino", "openvino"), ("tflite", "litert_torch"))
           if importlib.util.find_spec(module) is not None]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)  # sizes around and away from the stage size: every one is resized and cropped
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(16, 16), (17, 17), (20, 28), (31, 18)] * 4]


@pytest.mark.parametrize("fmt", FORMATS)
def test_pixel_stage_agrees_with_float_stage(tmp_path, images, fmt):
    torch.manual_seed(0)
    plan = cascade_plans([("only", residual_net(), (16, 16))])[0]
    pixels = pixel_plan(plan, PRE)
    assert pixels.source == {"source": "image", "size": [16, 16], "dtype": "uint8", "layout": "NHWC"}
    x_float, x_pixels = PRE.tensor(images, (16, 16)), PRE.pixels(images, (16, 16))
    assert x_pixels.dtype == np.uint8 and x_pixels.shape == (len(images), 16, 16, 3)
    export = exporter(fmt)
    options = BuildOptions(formats=(fmt,))
    got = {}
    for name, p, x in (("float", plan, x_float), ("pixels", pixels, x_pixels)):
        (tmp_path / name).mkdir()
        exported = export.export(p, tmp_path / name, StageInputs(x, x, x), options)
        check_signature(export, p, exported)
        inputs, _ = export.signature(exported.files)
        assert inputs[0].dtype == ("uint8" if name == "pixels" else "float32")
        got[name] = export.run(p, exported.files, x)["logits"]
    np.testing.assert_array_equal(got["pixels"].argmax(1), got["float"].argmax(1))
    np.testing.assert_allclose(got["pixels"], got["float"], atol=1e-4 * max(1.0, np.abs(got["float"]).max()))


def test_old_float_input_bundle_loads_and_answers_like_the_pixel_bundle(tmp_path, image_folder):
    calib = open_image_set(image_folder)
    torch.manual_seed(0)
    models = [("small", residual_net(), (12, 12)), ("large", residual_net(), (16, 16))]
    bundles = {}
    for pixel_input in (False, True):
        plans = cascade_plans(models, combine="mean_probs")
        bundles[pixel_input] = build_bundle(tmp_path / f"b{pixel_input}", "b", plans, PRE, calib.classes, calib,
                                            BuildOptions(profile_images=3, pixel_input=pixel_input))
    pictures = [calib.image(i) for i in range(24)]
    with stagewise.load(bundles[False], threads=1) as old, stagewise.load(bundles[True], threads=1) as new:
        assert [s.input.dtype for s in old.bundle.manifest.stages] == [None, None]
        assert [(s.input.dtype, s.input.layout) for s in new.bundle.manifest.stages] == [("uint8", "NHWC")] * 2
        for a, b in zip(old.stage_logits(pictures), new.stage_logits(pictures)):
            np.testing.assert_array_equal(a.argmax(1), b.argmax(1))
            np.testing.assert_allclose(a, b, atol=1e-4)
        a = [old.predict(im, operating_point="full") for im in pictures]
        b = new.predict_batch(pictures, operating_point="full")
    assert [p.label for p in a] == [p.label for p in b]


def test_one_crop_rule_for_every_size_and_no_copy_when_ready():
    centre = Preprocess(mean=(0, 0, 0), std=(1, 1, 1))
    # a 224 image is centre-cropped like a 225 one (the box scales with the image)
    assert centre.crop_box(224, 224, (224, 224)) == (14.0, 14.0, 210.0, 210.0)
    assert centre.crop_box(225, 225, (224, 224)) == pytest.approx((14.0625, 14.0625, 210.9375, 210.9375))
    assert centre.crop_box(375, 500, (224, 224)) == pytest.approx((85.9375, 23.4375, 414.0625, 351.5625))
    ready = np.zeros((16, 12, 3), np.uint8)
    assert np.shares_memory(Preprocess(mean=(0, 0, 0), std=(1, 1, 1), resize="stretch").pixels([ready], (16, 12)),
                            ready)
    square = np.zeros((16, 16, 3), np.uint8)  # crop fraction 1: the box of a square image at the size is all of it
    assert np.shares_memory(Preprocess(mean=(0, 0, 0), std=(1, 1, 1), crop_fraction=1.0).pixels([square], (16, 16)),
                            square)
    assert not np.shares_memory(centre.pixels([square], (16, 16)), square)
