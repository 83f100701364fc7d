"""Every image mode Pillow opens becomes 8-bit RGB by its real range: hand-made 2x2 images whose
pixel values are known, written as files and decoded as a dataset folder's images are."""
import numpy as np
import pytest
from PIL import Image

import data


def decoded(tmp_path, im, ext, **save):
    path = tmp_path / f"image{ext}"
    im.save(path, **save)
    with Image.open(path) as back:
        assert back.mode == im.mode, back.mode  # the file holds the mode under test
    return data._decode(path, 2)  # (2, 2, 3) uint8, no resize


def grey(values):
    return np.repeat(np.array(values, np.uint8)[..., None], 3, axis=2)


@pytest.mark.parametrize("mode,ext", [("I;16", ".png"), ("I;16", ".tif"), ("I;16B", ".tif")])
def test_16_bit_greys_scale_by_their_range(tmp_path, mode, ext):
    values = np.array([[0, 257], [32896, 65535]])  # 0, 1, 128, 255 in 8 bits
    im = Image.frombytes(mode, (2, 2), values.astype(">u2" if mode.endswith("B") else "<u2").tobytes())
    assert (decoded(tmp_path, im, ext) == grey([[0, 1], [128, 255]])).all()


def test_32_bit_integer_greys(tmp_path):
    im = Image.fromarray(np.array([[0, 257], [32896, 65535]], np.int32))  # 16-bit values in an I image
    assert (decoded(tmp_path, im, ".tif") == grey([[0, 1], [128, 255]])).all()
    im = Image.fromarray(np.array([[-1000, 0], [1000, 3000]], np.int32))  # not a 16-bit range: its own min-max
    assert (decoded(tmp_path, im, ".tif") == grey([[0, 64], [128, 255]])).all()


def test_float_greys(tmp_path):
    im = Image.fromarray(np.array([[0.0, 0.25], [0.5, 1.0]], np.float32))  # fractions of white
    assert (decoded(tmp_path, im, ".tif") == grey([[0, 64], [128, 255]])).all()
    im = Image.fromarray(np.array([[10.0, 20.0], [30.0, 50.0]], np.float32))  # another scale: its own min-max
    assert (decoded(tmp_path, im, ".tif") == grey([[0, 64], [128, 255]])).all()


def test_palette_with_a_transparent_colour_shows_white_there(tmp_path):
    im = Image.new("P", (2, 2))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putdata([0, 1, 1, 0])
    x = decoded(tmp_path, im, ".png", transparency=1)  # index 1, blue, is transparent
    assert (x == np.array([[[255, 0, 0], [255, 255, 255]], [[255, 255, 255], [255, 0, 0]]], np.uint8)).all()


def test_alpha_is_composited_on_white(tmp_path):
    rgba = Image.fromarray(np.array([[[0, 0, 0, 0], [0, 0, 0, 255]], [[200, 100, 0, 255], [0, 0, 0, 128]]], np.uint8), "RGBA")
    x = decoded(tmp_path, rgba, ".png")
    assert (x == np.array([[[255, 255, 255], [0, 0, 0]], [[200, 100, 0], [127, 127, 127]]], np.uint8)).all(), x
    la = Image.fromarray(np.array([[[10, 0], [10, 255]], [[90, 255], [200, 255]]], np.uint8), "LA")
    assert (decoded(tmp_path, la, ".png") == grey([[255, 10], [90, 200]])).all()


def test_cmyk_and_one_bit(tmp_path):
    cmyk = Image.fromarray(np.array([[[0, 0, 0, 0], [255, 0, 0, 0]], [[0, 0, 0, 255], [0, 255, 255, 0]]], np.uint8), "CMYK")
    x = decoded(tmp_path, cmyk, ".tif")
    assert (x == np.array([[[255, 255, 255], [0, 255, 255]], [[0, 0, 0], [255, 0, 0]]], np.uint8)).all(), x
    bits = Image.new("1", (2, 2))
    bits.putdata([0, 1, 1, 0])
    assert (decoded(tmp_path, bits, ".png") == grey([[0, 255], [255, 0]])).all()


def test_a_16_bit_photo_folder_loads_with_its_brightness(tmp_path):
    """The reported case: a 16-bit TIFF came out all white (mean 255)."""
    rng = np.random.default_rng(0)
    for c in ("dark", "light"):
        (tmp_path / "set" / c).mkdir(parents=True)
        for i in range(2):
            v = rng.integers(5000, 20000, (16, 16)) + (30000 if c == "light" else 0)
            Image.fromarray(v.astype(np.uint16)).save(tmp_path / "set" / c / f"{i}.tif")
    ds = data.load_dataset(str(tmp_path / "set"), image_size=16, cache_dir=str(tmp_path / "cache"))
    mean = ds.images.float().mean(dim=(1, 2, 3))
    assert (mean[ds.labels == 0] < 60).all() and (mean[ds.labels == 1] > 150).all(), mean
