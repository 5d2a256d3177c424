"""Reading images and masks: every mode is converted, every broken file is a DatasetError naming it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from dcad.core.data import load_image, load_mask
from dcad.core.errors import DatasetError

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)
GREY = RNG.integers(0, 256, (12, 10), dtype=np.uint8)


def test_rgb_roundtrip(tmp_path: Path) -> None:
    Image.fromarray(RGB).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (12, 10, 3)
    np.testing.assert_array_equal(out, RGB)


def test_greyscale_is_replicated_to_three_channels(tmp_path: Path) -> None:
    Image.fromarray(GREY).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.shape == (12, 10, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], GREY)


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    alpha = np.zeros((12, 10, 1), np.uint8)  # fully transparent: colour must survive unchanged
    Image.fromarray(np.concatenate([RGB, alpha], axis=2), "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), RGB)


def test_palette_image_is_expanded(tmp_path: Path) -> None:
    pal = Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    pal.save(tmp_path / "p.png")
    expected = np.asarray(pal.convert("RGB"))
    np.testing.assert_array_equal(load_image(tmp_path / "p.png"), expected)


def test_16bit_grey_png_is_scaled_to_8bit(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")  # PIL writes mode I;16
    out = load_image(tmp_path / "d.png")
    np.testing.assert_array_equal(out[..., 0], np.array([[0, 1, 128, 255]], np.uint8))
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_16bit_rgb_tiff_is_scaled(tmp_path: Path) -> None:
    values = (RGB.astype(np.uint16) * 257)
    tifffile.imwrite(tmp_path / "c.tif", values, photometric="rgb")
    out = load_image(tmp_path / "c.tif")
    assert out.shape == (12, 10, 3)
    assert np.abs(out.astype(int) - RGB.astype(int)).max() <= 1


def test_uppercase_jpeg_extension_loads(tmp_path: Path) -> None:
    flat = np.zeros((16, 16, 3), np.uint8)
    flat[..., 0], flat[..., 1], flat[..., 2] = 200, 100, 30
    Image.fromarray(flat).save(tmp_path / "x.JPG", format="JPEG", quality=95)
    out = load_image(tmp_path / "x.JPG")
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - flat.astype(int)).max() <= 3


def test_truncated_png_names_the_file(tmp_path: Path) -> None:
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"t\.png.*(truncated|unreadable)"):
        load_image(tmp_path / "t.png")


def test_not_an_image_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "fake.png").write_text("hello")
    with pytest.raises(DatasetError, match=r"fake\.png: unreadable image"):
        load_image(tmp_path / "fake.png")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope\.png: image file not found"):
        load_image(tmp_path / "nope.png")


def test_mask_is_binarised_above_zero(tmp_path: Path) -> None:
    mask = np.zeros((6, 5), np.uint8)
    mask[1, 1], mask[2, 3] = 1, 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    out = load_mask(tmp_path / "m.png")
    assert out.dtype == np.bool_
    np.testing.assert_array_equal(out, mask > 0)


def test_rgba_mask_ignores_alpha(tmp_path: Path) -> None:
    rgba = np.zeros((6, 5, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[2, 2, 0] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "m.png")
    out = load_mask(tmp_path / "m.png")
    assert out.sum() == 1 and out[2, 2]


def test_mask_shape_mismatch_names_file_and_sizes(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((6, 5), np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(DatasetError, match=r"m\.png: mask size 5x6 does not match image size 7x8"):
        load_mask(tmp_path / "m.png", shape=(8, 7))
