"""load_image on real files Pillow writes: EXIF orientation, 16-bit and float modes, bombs, empty and broken files."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from stagewise import ImageInputError
from stagewise.images import load_image


def png_with_size(path: Path, width: int, height: int) -> Path:
    """A real 1x1 PNG whose header declares ``width`` x ``height`` (with a valid header checksum)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (10, 20, 30)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_exif_orientation_turns_the_image_upright(tmp_path):
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, :16] = (255, 0, 0)   # left half red
    stored[:, 16:] = (0, 0, 255)   # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: display rotated 90 degrees clockwise
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, "JPEG", exif=exif, quality=95)

    upright = load_image(path)
    assert upright.shape == (32, 16, 3)
    expected = np.asarray(Image.open(path).convert("RGB").transpose(Image.Transpose.ROTATE_270))
    assert np.array_equal(upright, expected)
    assert upright[2, 8, 0] > 200 and upright[2, 8, 2] < 50    # red on top
    assert upright[-3, 8, 2] > 200 and upright[-3, 8, 0] < 50  # blue at the bottom
    with Image.open(path) as opened:
        assert np.array_equal(load_image(opened), expected)
    with open(path, "rb") as file:
        assert np.array_equal(load_image(file), expected)


def test_16_bit_png_keeps_its_range(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 4).round().astype(np.uint16).reshape(4, 64)
    path = tmp_path / "depth.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    rgb = load_image(path)
    assert rgb.shape == (4, 64, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], rgb[..., 2])
    assert np.array_equal(rgb[..., 0], np.rint(ramp / 257.0).astype(np.uint8))
    assert rgb.min() == 0 and rgb.max() == 255
    assert len(np.unique(rgb)) > 200  # scaled, not clipped to a few values


def test_32_bit_integer_image_within_16_bits_is_scaled_and_beyond_is_refused():
    assert load_image(Image.fromarray(np.full((2, 3), 65535, np.int32))).max() == 255
    with pytest.raises(ImageInputError, match=r"integer image with values in \[0, 70000\]"):
        load_image(Image.fromarray(np.array([[0, 70000]], np.int32)))


def test_float_tiff_is_scaled_from_0_1(tmp_path):
    ramp = np.linspace(0, 1, 50, dtype=np.float32).reshape(5, 10)
    path = tmp_path / "float.tif"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "F"
    rgb = load_image(path)
    assert np.array_equal(rgb[..., 1], np.rint(ramp * 255).astype(np.uint8))
    assert rgb.max() == 255 and rgb.min() == 0


@pytest.mark.parametrize("values", [[0.0, 2.5], [float("nan"), 0.5]])
def test_float_image_outside_0_1_is_refused(values):
    with pytest.raises(ImageInputError, match="float image .* 0-1"):
        load_image(Image.fromarray(np.array([values], np.float32)))


@pytest.mark.parametrize("mode", ["P", "LA", "CMYK", "1", "RGBA"])
def test_other_modes_still_become_rgb(mode):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)).convert(mode)
    rgb = load_image(image)
    assert rgb.shape == (6, 5, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb, np.asarray(image.convert("RGB")))


def test_huge_declared_size_is_refused_without_decoding(tmp_path, monkeypatch):
    def no_decoding(self):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    path = png_with_size(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(ImageInputError, match="too large .* PIL.Image.MAX_IMAGE_PIXELS"):
        load_image(path)  # the patched decoder fails the test if the pixels are decoded


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [40, 50])  # Pillow warns between 1x and 2x the limit, raises above 2x
def test_images_over_the_bomb_limit_are_refused(tmp_path, monkeypatch, side):
    path = tmp_path / "big.png"
    Image.new("RGB", (side, side)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageInputError, match="raise PIL.Image.MAX_IMAGE_PIXELS"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert load_image(path).shape == (side, side, 3)


@pytest.mark.parametrize("size", [(0, 0), (0, 7), (7, 0)])
def test_empty_images_are_refused(size):
    with pytest.raises(ImageInputError, match="at least one pixel"):
        load_image(Image.new("RGB", size))


def test_a_file_declaring_zero_width_is_refused(tmp_path):
    with pytest.raises(ImageInputError):
        load_image(png_with_size(tmp_path / "empty.png", 0, 5))


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_broken_files_are_image_input_errors(tmp_path, damage):
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[60:160] = bytes(100)
    path.write_bytes(bytes(data))
    with pytest.raises(ImageInputError, match=r"cannot decode .*\(truncated, corrupt or not an image\)"):
        load_image(path)
    with pytest.raises(ImageInputError, match="cannot decode"):
        load_image(Image.open(path))


def test_missing_file():
    with pytest.raises(ImageInputError, match="file not found"):
        load_image("/nonexistent/cat.jpg")
