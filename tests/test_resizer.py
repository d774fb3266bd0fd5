"""The resizer a bundle records (``input.resizer``): Pillow by default, OpenCV on request, the same
one at calibration and on the device; a device without OpenCV gets a clear error at load."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from click.testing import CliRunner

import stagewise
from stagewise.cli import cli
from stagewise.datasets import open_image_set
from stagewise.errors import InvalidOptionError, ManifestError, MissingExtraError
from stagewise.images import Preprocess
from stagewise.manifest import Manifest

pytest.importorskip("cv2", reason='the OpenCV resizer needs OpenCV: pip install "stagewise[opencv]" (the dev install has it)')

PILLOW = Preprocess(mean=(123.7, 116.3, 103.5), std=(58.4, 57.1, 57.4), resize="shorter_crop", crop_fraction=0.875)
OPENCV = Preprocess(mean=PILLOW.mean, std=PILLOW.std, resize="shorter_crop", crop_fraction=0.875, resizer="opencv")
DEMO = Path(__file__).resolve().parents[1] / "sdk" / "demo_data" / "imagenet-160"
TOY = str(Path(__file__).with_name("toy_models.py"))


def photo(width: int, height: int) -> np.ndarray:
    """A real photo (a demo image) at ``width`` x ``height``."""
    from PIL import Image

    return np.asarray(Image.fromarray(open_image_set(DEMO).image(0)).resize((width, height), Image.Resampling.BICUBIC))


def test_opencv_resizes_the_crop_box_close_to_pillow():
    image = photo(500, 375)
    a = PILLOW.pixels([image], (224, 224))[0].astype(float)
    b = OPENCV.pixels([image], (224, 224))[0].astype(float)
    assert b.shape == (224, 224, 3)
    assert 0 < np.abs(a - b).mean() < 3  # another library, the same box: about one grey level apart
    shifted = OPENCV.crop_resized(image, (0.0, 0.0, 328.0, 328.0), (224, 224)).astype(float)
    assert np.abs(shifted - b).mean() > 3 * np.abs(a - b).mean()  # it did resize the centre box, not another
    ready = np.zeros((16, 12, 3), np.uint8)
    stretch = Preprocess(mean=(0, 0, 0), std=(1, 1, 1), resize="stretch", resizer="opencv")
    assert np.shares_memory(stretch.pixels([ready], (16, 12)), ready)  # already at the size: no copy


def test_opencv_low_passes_large_downscales():
    """A box many times the stage size is halved with a Gaussian pyramid first, so noise does not alias
    through (a plain bilinear resize keeps all of it)."""
    import cv2

    noise = np.random.default_rng(0).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)
    plain = cv2.resize(noise[:, 250:1750], (224, 224), interpolation=cv2.INTER_LINEAR)
    ours = OPENCV.pixels([noise], (224, 224))[0]
    pillow = PILLOW.pixels([noise], (224, 224))[0]
    assert plain.std() > 40  # aliased: the noise survives
    assert ours.std() < 2 * pillow.std() < plain.std() / 2


def test_manifest_records_the_resizer_and_old_bundles_mean_pillow():
    assert "resizer" not in PILLOW.to_manifest()  # older runtimes still read a Pillow bundle
    assert OPENCV.to_manifest()["resizer"] == "opencv"
    assert Preprocess.from_manifest(PILLOW.to_manifest()).resizer == "pillow"
    assert Preprocess.from_manifest(OPENCV.to_manifest()) == OPENCV
    with pytest.raises(InvalidOptionError, match="pillow, opencv"):
        Preprocess(mean=(0, 0, 0), std=(1, 1, 1), resizer="cv2")


@pytest.fixture(scope="module")
def opencv_bundle(tmp_path_factory, image_folder) -> Path:
    out = tmp_path_factory.mktemp("cv") / "b"
    result = CliRunner().invoke(cli, ["convert", f"{TOY}:residual_net", "--exits", "layer1", "--data", str(image_folder),
                                      "--mean", "123.7,116.3,103.5", "--std", "58.4,57.1,57.4", "--resizer", "opencv",
                                      "--format", "onnx", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def test_opencv_bundle_runs_with_the_resizer_it_was_calibrated_with(opencv_bundle):
    manifest = json.loads((opencv_bundle / "manifest.json").read_text())
    assert manifest["input"]["resizer"] == "opencv"
    assert "bilinear by opencv" in CliRunner().invoke(cli, ["inspect", str(opencv_bundle)]).output
    pictures = [np.ascontiguousarray(photo(40 + 3 * i, 30 + 2 * i)[:, :, ::-1 if i % 2 else 1]) for i in range(12)]
    with stagewise.load(opencv_bundle, threads=1) as cascade:
        assert cascade.preprocess.resizer == "opencv"
        stage, pre = cascade.router.inputs[0].size, cascade.preprocess
        got = cascade.router.input(0, pictures, None)
        np.testing.assert_array_equal(got, np.stack([pre.resized(im, stage) for im in pictures]))
        pillow = replace(pre, resizer="pillow")
        assert not np.array_equal(got, np.stack([pillow.resized(im, stage) for im in pictures]))
        one = [cascade.predict(im, operating_point="full").label for im in pictures]
        assert one == [p.label for p in cascade.predict_batch(pictures, operating_point="full")]
    assert Manifest.from_dict(manifest).to_dict()["input"] == manifest["input"]
    manifest["input"]["resizer"] = "cv2"
    with pytest.raises(ManifestError, match="resizer"):
        Manifest.from_dict(manifest)


def test_a_device_without_opencv_is_told_what_to_install(opencv_bundle, monkeypatch):
    from stagewise import images

    monkeypatch.setitem(sys.modules, "cv2", None)  # importing it now fails as if it were not installed
    images._opencv.cache_clear()  # forget the module an earlier test imported
    try:
        with pytest.raises(MissingExtraError, match=r'stagewise\[opencv\]'):
            stagewise.load(opencv_bundle, threads=1)
    finally:
        images._opencv.cache_clear()
