"""Whole images: the cache keeps every image whole (squashed to S x S, original size beside it),
training crops follow torchvision's RandomResizedCrop on the ORIGINAL image, the eval view is the
whole image resized, and the named datasets load from their published layouts.

Run: python -m pytest -q tests/test_whole_images.py   (CPU; images drawn at run time)
"""

import contextlib
import io
import json
import os
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image

import common
import data

from conftest import make_image_folder

THIRDS = [(230, 30, 30), (30, 200, 40), (40, 60, 230)]  # red | green | blue, left to right


def thirds_image(height=60, width=180):
    """A 3:1 picture of three coloured vertical thirds: a centre crop would show only the green one."""
    pixels = np.zeros((height, width, 3), np.uint8)
    for i, colour in enumerate(THIRDS):
        pixels[:, i * width // 3:(i + 1) * width // 3] = colour
    return Image.fromarray(pixels)


def smooth_image(height, width):
    """Ramps and a slow wave: resampling it twice (original -> stored -> crop) changes it little."""
    y, x = np.mgrid[0:height, 0:width]
    wave = 127 + 100 * np.sin(x / 15) * np.cos(y / 11)
    return Image.fromarray(np.stack([255 * x / width, 255 * y / height, wave], -1).astype(np.uint8))


def two_class_folder(folder, picture):
    """picture in class a, its mirror in class b (a folder dataset needs two classes), as lossless PNGs."""
    for cls, im in (("a", picture), ("b", picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT))):
        os.makedirs(folder / cls, exist_ok=True)
        im.save(folder / cls / "image.png")
    return folder


# --- crop boxes: torchvision's RandomResizedCrop on the original ------------------------------------

def box_stats(boxes, height, width):
    """Area scale, log aspect and centre position (as fractions of the original) of boxes (n, 4)."""
    top, left, h, w = boxes.double().unbind(1)
    return {"scale": (h * w / (height * width), 0, 1), "log_aspect": (torch.log(w / h), -0.4, 0.4),
            "centre_y": ((top + h / 2) / height, 0, 1), "centre_x": ((left + w / 2) / width, 0, 1)}


def histogram_distance(a, b, lo, hi, bins=10):
    """Total variation distance between the 10-bin histograms of two samples."""
    return 0.5 * (torch.histc(a, bins, lo, hi) / len(a) - torch.histc(b, bins, lo, hi) / len(b)).abs().sum().item()


@pytest.mark.parametrize("height,width", [(100, 300), (200, 100)])  # 3:1 and 1:2 originals
def test_crop_boxes_match_torchvision_on_the_original(height, width):
    ours = data.sample_crop_boxes(20000, height, width, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    image = torch.zeros(1, height, width)
    ref = torch.tensor([torchvision.transforms.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
                        for _ in range(8000)])
    # the centre-square storage this replaced: boxes drawn on the middle square, never outside it
    side = min(height, width)
    square = data.sample_crop_boxes(20000, side, side, torch.Generator().manual_seed(1))
    square += torch.tensor([(height - side) // 2, (width - side) // 2, 0, 0])
    tolerance = 0.04  # sampling noise is about 0.015 here
    for key, (value, lo, hi) in box_stats(ours, height, width).items():
        ref_value = box_stats(ref, height, width)[key][0]
        assert histogram_distance(value, ref_value, lo, hi) < tolerance, key
    worst = max(histogram_distance(v, box_stats(ref, height, width)[k][0], lo, hi)
                for k, (v, lo, hi) in box_stats(square, height, width).items())
    assert worst > 3 * tolerance  # the comparison does tell the old behaviour apart
    # torchvision's fallback after ten misses (the centre crop clamped to the ratio range), as often
    # (a few % of the draws on the 3:1 original, rare on the 1:2 one)
    fallback = torch.tensor(torchvision.transforms.RandomResizedCrop.get_params(image, [2.0, 3.0], [3 / 4, 4 / 3]))
    share = lambda b: (b == fallback).all(1).double().mean().item()
    assert abs(share(ours) - share(ref)) < 0.01
    assert (ours[:, :2] >= 0).all() and (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()


def test_per_image_sizes():
    # one draw for images of different sizes equals the draws for each size on its own (same generator stream)
    sizes = torch.tensor([[100, 300], [200, 100], [64, 64]])
    mixed = data.sample_crop_boxes(3, sizes[:, 0], sizes[:, 1], torch.Generator().manual_seed(5))
    for i, (h, w) in enumerate(sizes.tolist()):
        alone = data.sample_crop_boxes(3, h, w, torch.Generator().manual_seed(5))
        assert torch.equal(mixed[i], alone[i])


@pytest.mark.parametrize("storage_size,mean_tol,max_tol", [(None, 0.001, 0.01), (270, 0.001, 0.01), (64, 0.004, 0.15)])
def test_crop_matches_torchvision_crop_of_the_original(tmp_path, storage_size, mean_tol, max_tol):
    height, width = 90, 270
    picture = smooth_image(height, width)
    ds = data.load_dataset(str(two_class_folder(tmp_path / "wide", picture)), root=str(tmp_path), image_size=32,
                           storage_size=storage_size)
    stored = ds.images.shape[-1]
    assert stored == (storage_size or 270) and ds.sizes[0].tolist() == [height, width]  # default: the native 270
    original = TF.to_image(picture).float() / 255
    # the views' crop path: no colour ops, so each view is the box of the original, resized and maybe flipped
    plain = data.View(crop=(0.08, 1.0), flip=0.5)
    n = 64
    x, sizes = ds.images[:1].expand(n, -1, -1, -1), ds.sizes[:1].expand(n, 2)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    out = data.Augmentation((plain, plain), 32).view(x, g, plain, sizes)
    q = data.sample_view(n, height, width, g.set_state(state), plain)
    ref = torch.stack([TF.resized_crop(original, *box.tolist(), [32, 32], antialias=True) for box in q["boxes"]])
    ref = torch.where(q["flip"][:, None, None, None], ref.flip(-1), ref)
    err = (out - ref).abs()
    assert err.mean() < mean_tol and err.max() < max_tol, (err.mean(), err.max())
    # the comparison is sharp: the mirror-image box (the same box read from the right) is far off
    mirrored = q["boxes"].clone()
    mirrored[:, 1] = width - q["boxes"][:, 1] - q["boxes"][:, 3]
    grid = data._crop_grid(mirrored, stored, 32, q["flip"], sizes)
    wrong = data._resample(x, data._crop_weights(*grid))
    assert (wrong - ref).abs().mean() > 10 * mean_tol


def test_training_crops_reach_every_part(tmp_path):
    ds = data.load_dataset(str(two_class_folder(tmp_path / "thirds", thirds_image())), root=str(tmp_path),
                           image_size=16)
    x, sizes = ds.images[:1].expand(512, -1, -1, -1), ds.sizes[:1].expand(512, 2)
    plain = data.View(crop=(0.08, 1.0), flip=0.5)
    views = data.Augmentation((plain, plain), 16).view(x, torch.Generator().manual_seed(0), plain, sizes)
    seen = [((views * 255 - torch.tensor(c)[:, None, None]).abs().amax(1) < 12).flatten(1).any(1) for c in THIRDS]
    # a centre square would never show the outer thirds; crops of the whole original show each in many views
    assert all(s.float().mean() > 0.3 for s in seen), [s.float().mean() for s in seen]


# --- the eval view: the whole image resized ----------------------------------------------------------

def test_wide_image_stored_and_evaluated_whole(tmp_path):
    ds = data.load_dataset(str(two_class_folder(tmp_path / "thirds", thirds_image(60, 180))), root=str(tmp_path),
                           image_size=24)
    assert ds.images.shape == (2, 3, 180, 180) and ds.sizes.tolist() == [[60, 180]] * 2  # S = the native 180
    crop = data.View(crop=(0.08, 1.0), flip=0.5)
    weak, strong = data.View(norm=data.IMAGENET), data.View(crop=(0.08, 1.0), flip=0.5, norm=data.IMAGENET)  # PICI-like
    for aug in (data.Augmentation((crop, crop), 24), data.Augmentation((weak, strong), 24)):
        out = aug.eval(ds.images[:1])
        if aug.norm:  # PICI's weak view is the eval view, ImageNet-normalised
            out = out * torch.tensor(data.IMAGENET_STD)[:, None, None] + torch.tensor(data.IMAGENET_MEAN)[:, None, None]
        assert out.shape == (1, 3, 24, 24)
        for i, colour in enumerate(THIRDS):  # each third of the output, away from the seams, is its colour
            third = out[0, :, :, i * 8 + 2:i * 8 + 6] * 255
            assert (third - torch.tensor(colour, dtype=torch.float32)[:, None, None]).abs().max() < 3, (i, colour)
    aug = data.Augmentation((weak, strong), 24)
    weak_view, _ = aug.views(ds.images, torch.Generator().manual_seed(0), ds.sizes)
    torch.testing.assert_close(weak_view, aug.eval(ds.images))  # a weak view is the eval view


def test_storage_size_default_and_cap(tmp_path):
    folder = two_class_folder(tmp_path / "thirds", thirds_image(60, 180))
    load = lambda **kw: data.load_dataset(str(folder), root=str(tmp_path), **kw)
    assert load(image_size=32).images.shape[-1] == 180  # the native (longest) side, whatever the training size
    assert load(image_size=224).images.shape[-1] == 180
    assert load(image_size=32, storage_size=40).images.shape[-1] == 40
    assert load(image_size=32, storage_size=1000).images.shape[-1] == 180  # never above native
    assert load(image_size=32, storage_size=40, memory=1000).images.shape[-1] == 40  # a given size is not capped
    with pytest.raises(data.DataError, match="--storage-size"):
        load(image_size=32, storage_size=0)


def test_storage_size_fits_the_memory(tmp_path):
    folder = two_class_folder(tmp_path / "thirds", thirds_image(60, 180))
    load = lambda **kw: data.load_dataset(str(folder), root=str(tmp_path / "root"), image_size=32, **kw)
    assert load(memory=2 * 3 * 180 ** 2).images.shape[-1] == 180  # the native store just fits
    with pytest.warns(UserWarning, match=r"thirds: 2 images at their native 180 px .* stored at 100 px \(--storage-size S sets"):
        assert load(memory=2 * 3 * 100 ** 2 + 5).images.shape[-1] == 100  # the largest side that fits: rebuilt
    with pytest.warns(UserWarning, match="stored at 100 px"):
        assert load(memory=2 * 3 * 120 ** 2).images.shape[-1] == 100  # the capped cache kept while native does not fit
    assert load(memory=None).images.shape[-1] == 180  # native fits again: rebuilt
    assert data.storage_side(10_000, 600, memory=10_000 * 3 * 600 ** 2) == 600  # AID native, 10.8 GB in 10.8 GB
    assert data.storage_side(10_000, 600, memory=10_000 * 3 * 600 ** 2 - 1) == 599
    assert data.storage_side(10_000, 600, given=256, memory=1) == 256


def test_the_store_fits_the_host_or_the_gpu_it_must_live_in(monkeypatch, tmp_path):
    folder = two_class_folder(tmp_path / "thirds", thirds_image(60, 180))
    args = common.parse_args(__import__("cc").Args, ["--dataset", str(folder), "--data-root", str(tmp_path), "--image-size", "32",
                                                     "--batch-size", "2", "--device", "cpu"])
    monkeypatch.setattr(data, "host_memory", lambda: 2 * (2 * 3 * 90 ** 2))  # half of it for the store: 90 px
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        ds = data.load_data(args, common.Run(args, "cc"))
    assert ds.images.shape[-1] == 90
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and "stored at 90 px (--storage-size S sets the side)" in lines[0], lines
    monkeypatch.setattr(data, "host_memory", lambda: None)  # unknown: no cap
    assert data.store_memory(args, None) is None
    monkeypatch.setattr(data, "host_memory", lambda: 10 ** 12)
    gpu = SimpleNamespace(device=torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 10 ** 9, 80 * 10 ** 9))
    assert data.store_memory(args, gpu) == 10 ** 12 // 2  # auto: a store too large for the GPU stays on the host
    args.data_on_device = "yes"
    assert data.store_memory(args, gpu) == 2 * 10 ** 9  # yes: a quarter of the GPU's free memory, as place_images


def test_upsampling_warning(tmp_path):
    folder = make_image_folder(tmp_path / "small", classes=2, per_class=2, size=(48, 40))
    with pytest.warns(UserWarning, match=r"4 of 4 images are smaller than the training size 64 px \(e.g. 48x40\).*up-sampled"):
        data.load_dataset(str(folder), root=str(tmp_path), image_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # large enough: no warning
        data.load_dataset(str(folder), root=str(tmp_path), image_size=40)


def test_scripts_print_the_upsampling_warning_in_one_line(tmp_path):
    folder = make_image_folder(tmp_path / "small", classes=2, per_class=2, size=(24, 20))
    args = common.parse_args(__import__("cc").Args, ["--dataset", str(folder), "--data-root", str(tmp_path), "--image-size", "32",
                                                     "--batch-size", "2", "--device", "cpu"])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        data.load_data(args, common.Run(args, "cc"))
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: small: 4 of 4 images are smaller than the training size 32 px")


@pytest.mark.parametrize("script", ["cc", "vtcc", "vitic", "pici", "dcsc"])
def test_scripts_pass_storage_size(tmp_path, script):
    folder = make_image_folder(tmp_path / "shapes", classes=2, per_class=2, size=(48, 40))
    module = __import__(script)
    args = common.parse_args(module.Args, ["--dataset", str(folder), "--data-root", str(tmp_path), "--image-size", "32",
                                           "--batch-size", "2", "--storage-size", "24"])
    ds = data.load_data(args, SimpleNamespace(distributed=False, is_main=True))
    assert ds.images.shape == (4, 3, 24, 24) and ds.sizes.tolist() == [[40, 48]] * 4


# --- named datasets in their published layouts ---------------------------------------------------------

def test_dtd_layout(tmp_path):
    dtd = tmp_path / "dtd"
    for i, cls in enumerate(["banded", "blotchy", "braided"]):
        make_image_folder(dtd / "images" / cls, classes=1, per_class=2, size=(60, 50), seed=i, flat=True)
    (dtd / "labels").mkdir()
    (dtd / "labels" / "train1.txt").write_text("banded/banded000.jpg\n")
    (dtd / "imdb").mkdir()
    (dtd / "imdb" / "imdb.mat").write_bytes(b"\0")
    with pytest.warns(UserWarning, match="found 3 classes, the paper's dataset has 47"):
        ds = data.load_dataset("dtd", root=str(tmp_path), image_size=32)
    assert ds.classes == ["banded", "blotchy", "braided"] and len(ds) == 6 and ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert ds.sizes.tolist() == [[50, 60]] * 6
    with pytest.raises(data.DataError, match=r"dtd/images/<class>"):
        data.load_dataset("dtd", root=str(tmp_path / "nowhere"))


def write_chaoyang(root, per_split=(6, 3)):
    """Chaoyang as downloaded: chaoyang/train/, chaoyang/test/ and the label lists train.json, test.json;
    the labels (0-3) are not in the folder names. Returns {file: label}."""
    rng = np.random.default_rng(0)
    truth = {}
    for split, n in zip(("train", "test"), per_split):
        (root / "chaoyang" / split).mkdir(parents=True)
        entries = []
        for i in range(n):
            label = i % 4
            name = f"{split}/{500 + i}-IMG{i:03d}x0{label}.JPG"
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "chaoyang" / name, "JPEG")
            entries.append({"name": name, "label": label})
            truth[name] = label
        (root / "chaoyang" / f"{split}.json").write_text(json.dumps(entries))
    return truth


def test_chaoyang_layout(tmp_path):
    truth = write_chaoyang(tmp_path)
    ds = data.load_dataset("chaoyang", root=str(tmp_path), image_size=32)
    assert len(ds) == 9 and ds.num_classes == 4 and ds.classes == data.CHAOYANG_CLASSES  # train and test pooled
    assert {f: y for f, y in zip(ds.files, ds.labels.tolist())} == {os.path.normpath(f): y for f, y in truth.items()}
    assert sum(f.startswith("test") for f in ds.files) == 3
    sub = data.load_dataset("chaoyang", root=str(tmp_path), image_size=32, max_images=4)
    assert sorted(sub.labels.tolist()) == [0, 1, 2, 3]  # class-balanced subset
    # the folder given as a path: its only sub-folders are splits, and the error says what to do
    with pytest.raises(data.DataError, match=r"only sub-folders are test, train.*--dataset chaoyang --data-root"):
        data.load_dataset(str(tmp_path / "chaoyang"), root=str(tmp_path), image_size=32)


def test_chaoyang_errors(tmp_path):
    with pytest.raises(data.DataError, match="train.json"):
        data.load_dataset("chaoyang", root=str(tmp_path))
    write_chaoyang(tmp_path)
    os.remove(tmp_path / "chaoyang" / "test" / "501-IMG001x01.JPG")
    with pytest.raises(data.DataError, match=r"1 images named in Chaoyang's label files are not in .*501-IMG001x01"):
        data.load_dataset("chaoyang", root=str(tmp_path))
    (tmp_path / "chaoyang" / "test.json").write_text('{"not": "a list"}')
    with pytest.raises(data.DataError, match="not Chaoyang's label file"):
        data.load_dataset("chaoyang", root=str(tmp_path))


def test_split_only_folder_is_an_error(tmp_path):
    for split in ("train", "test"):
        make_image_folder(tmp_path / "mine" / split, classes=1, per_class=2, flat=True)
    with pytest.raises(data.DataError, match=r"only sub-folders are test, train, dataset splits, not classes: put the "
                                             r"images in one sub-folder per class"):
        data.load_dataset(str(tmp_path / "mine"), root=str(tmp_path))
    make_image_folder(tmp_path / "mine" / "val", classes=1, per_class=2, flat=True)
    with pytest.raises(data.DataError, match="splits, not classes"):
        data.load_dataset(str(tmp_path / "mine"), root=str(tmp_path))
    make_image_folder(tmp_path / "mine" / "extra", classes=1, per_class=2, flat=True)  # a real class among them: fine
    assert len(data.load_dataset(str(tmp_path / "mine"), root=str(tmp_path), image_size=32).classes) == 4
