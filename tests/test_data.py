"""Tests for data.py: augmentation ops against torchvision, parameter sampling, dataset loading and caching.

Run: python -m pytest -q tests/test_data.py   (CPU, small images drawn at run time or bundled with scikit-learn)
"""

import dataclasses
import os
import pickle
import urllib.error

import numpy as np

import pytest
import torch
import torchvision
import torchvision.transforms.v2.functional as TF
from sklearn.datasets import load_sample_images

import data

from conftest import CLASSES, draw_image, make_image_folder


def real_batch(n=6, size=48):
    """n real photographs (uint8, n x 3 x size x size): square crops of scikit-learn's two bundled
    sample images (a temple and a flower, 427x640), at different places and scales."""
    photos = [torch.from_numpy(im.copy()).permute(2, 0, 1) for im in load_sample_images().images]
    out = []
    for i in range(n):
        photo = photos[i % 2]
        side = 160 + 40 * (i // 2)
        top, left = 20 * i, 30 * i
        out.append(TF.resize(photo[:, top:top + side, left:left + side], [size, size], antialias=True))
    return torch.stack(out)


@pytest.fixture(scope="module")
def x():
    return real_batch().float() / 255


def per_sample(fn, x, *params):
    """Reference: torchvision's functional op applied image by image."""
    return torch.stack([fn(x[i], *(p[i].item() for p in params)) for i in range(len(x))])


def resized_crop(x, boxes, size, flip=None):
    """Boxes of x resized to size x size (mirrored where flip), as the views crop: data's weights."""
    return data._resample(x, data._crop_weights(*data._crop_grid(boxes.float(), x.shape[-1], size, flip)))


def hflip(x, flip):
    """Reference: torchvision's horizontal_flip of the images where flip is True."""
    return torch.stack([TF.horizontal_flip(im) if f else im for im, f in zip(x, flip)])


def linear_op(kind):
    """ColorJitter's linear op `kind` (brightness, contrast or saturation) on every sample, as the
    views run it (data._jitter_stage with the same kind for all)."""
    def op(x, f):
        flag = lambda k: torch.full((len(x), 1, 1, 1), kind == k)
        return data._jitter_stage(x, f.view(-1, 1, 1, 1), flag("brightness"), flag("saturation"))
    return op


# --- ops against torchvision.transforms.v2.functional, same parameters --------------------------------

@pytest.mark.parametrize("size", [20, 48, 80])  # down-scaling, same size, up-scaling
def test_resized_crop(x, size):
    boxes = torch.tensor([[0, 0, 48, 48], [5, 3, 30, 41], [10, 20, 7, 9], [0, 40, 48, 8], [47, 47, 1, 1],
                          [2, 0, 45, 36]])
    out = resized_crop(x, boxes, size)
    ref = torch.stack([TF.resized_crop(x[i], *boxes[i].tolist(), [size, size], antialias=True) for i in range(len(x))])
    assert out.shape == (6, 3, size, size)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    flip = torch.tensor([True, False, False, True, True, False])
    torch.testing.assert_close(resized_crop(x, boxes, size, flip=flip), hflip(ref, flip), atol=1e-5, rtol=0)
    # a uint8 input gives the same result in [0, 1]
    x8 = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(resized_crop(x8, boxes, size), resized_crop(x8.float() / 255, boxes, size),
                               atol=1e-5, rtol=0)


def test_resize_is_eval_transform(x):
    ref = TF.resize(x, [32, 32], antialias=True)
    torch.testing.assert_close(data.resize(x, 32), ref, atol=1e-5, rtol=0)
    aug = data.Augmentation((data.View(norm=data.IMAGENET),) * 2, 32)
    torch.testing.assert_close(aug.eval((x * 255).round().to(torch.uint8)),
                               TF.normalize(TF.resize((x * 255).round() / 255, [32, 32], antialias=True),
                                            data.IMAGENET_MEAN, data.IMAGENET_STD), atol=1e-4, rtol=0)


@pytest.mark.parametrize("op,ref,factors", [
    (linear_op("brightness"), TF.adjust_brightness, [0.0, 0.2, 0.9, 1.0, 1.5, 1.8]),
    (linear_op("contrast"), TF.adjust_contrast, [0.0, 0.2, 0.9, 1.0, 1.5, 1.8]),
    (linear_op("saturation"), TF.adjust_saturation, [0.0, 0.2, 0.9, 1.0, 1.5, 1.8]),
    (data.adjust_hue, TF.adjust_hue, [-0.5, -0.2, -0.01, 0.0, 0.17, 0.5]),
])
def test_color_ops(x, op, ref, factors):
    f = torch.tensor(factors)
    torch.testing.assert_close(op(x, f), per_sample(ref, x, f), atol=2e-5, rtol=0)


def test_hue_special_pixels():
    # grey pixels, ties between channels, pure primaries and secondaries, black and white
    px = torch.tensor([[0.5, 0.5, 0.5], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1],
                       [0.3, 0.3, 0.1], [0.1, 0.3, 0.3], [0.3, 0.1, 0.3], [0, 0, 0], [1, 1, 1]])
    img = px.t().reshape(1, 3, 3, 4).expand(5, -1, -1, -1)
    f = torch.tensor([-0.5, -0.25, 0.1, 1 / 3, 0.5])
    torch.testing.assert_close(data.adjust_hue(img, f), per_sample(TF.adjust_hue, img, f), atol=2e-6, rtol=0)


def test_grayscale_solarize_normalize(x):
    torch.testing.assert_close(data.rgb_to_grey(x).expand_as(x), TF.rgb_to_grayscale(x, num_output_channels=3), atol=1e-6, rtol=0)
    assert torch.equal(data.solarize(x, 0.5), TF.solarize(x, 0.5))
    torch.testing.assert_close(data.normalize(x), TF.normalize(x, data.IMAGENET_MEAN, data.IMAGENET_STD))


@pytest.mark.parametrize("kernel", [3, 7, 23])
def test_gaussian_blur(x, kernel):
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 3.7])
    ref = torch.stack([TF.gaussian_blur(x[i], [kernel, kernel], [sigma[i].item()] * 2) for i in range(6)])
    torch.testing.assert_close(data.blur(x, data._gaussian_kernels(sigma, kernel)), ref, atol=1e-5, rtol=0)


def test_blur_kernel_size():
    assert data.blur_kernel_size(224) == 23  # the 23 px kernel of CC's code at 224 px
    assert data.blur_kernel_size(128) == 13 and data.blur_kernel_size(8) == 3  # at least 3 taps
    for size in (32, 64, 96, 128, 224, 256):
        k = data.blur_kernel_size(size)
        assert k % 2 == 1 and abs(k - 0.1 * size) <= 2


# --- sampling ---------------------------------------------------------------------------------------

def test_crop_boxes_ranges_and_distribution():
    g = torch.Generator().manual_seed(0)
    n, hgt, wid = 20000, 64, 64
    b = data.sample_crop_boxes(n, hgt, wid, g).double()
    top, left, h, w = b.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= hgt).all() and (left + w <= wid).all()
    assert (h >= 1).all() and (w >= 1).all()
    area, ratio = h * w / (hgt * wid), w / h
    # rounding to whole pixels lets area and ratio stray slightly out of the sampling ranges
    assert area.min() >= 0.07 and area.max() <= 1
    assert ratio.min() >= 0.75 * 0.93 and ratio.max() <= 4 / 3 / 0.93
    assert abs(torch.log(ratio).mean()) < 0.01  # log-uniform ratio: symmetric in log space
    assert len({tuple(r) for r in b[:100].tolist()}) > 95  # different samples, different boxes
    # same distribution as torchvision's RandomResizedCrop.get_params
    torch.manual_seed(0)
    img = torch.zeros(3, hgt, wid)
    ref = torch.tensor([torchvision.transforms.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
                        for _ in range(4000)]).double()
    assert abs(area.mean() - (ref[:, 2] * ref[:, 3] / (hgt * wid)).mean()) < 0.015
    assert abs((top + h / 2).mean() - (ref[:, 0] + ref[:, 2] / 2).mean()) < 0.5


@pytest.mark.parametrize("hw", [(40, 100), (100, 40), (50, 60)])
def test_crop_boxes_fallback_matches_torchvision(hw):
    # a scale range that never fits forces torchvision's fallback: centre crop clamped to the ratio range
    hgt, wid = hw
    b = data.sample_crop_boxes(5, hgt, wid, torch.Generator().manual_seed(0), scale=(2.0, 3.0))
    ref = torchvision.transforms.RandomResizedCrop.get_params(torch.zeros(3, hgt, wid), [2.0, 3.0], [3 / 4, 4 / 3])
    assert b.tolist() == [list(ref)] * 5


# Views as the recipes in the method files declare them (which values each method uses is tested
# in test_recipes.py); here: that data.py draws and applies whatever a View says.
SIMCLR = data.View(crop=(0.08, 1.0), flip=0.5, jitter=(0.8, 0.8, 0.8, 0.2), p_jitter=0.8, p_grey=0.2, p_blur=0.5,
                   sigma=(0.1, 2.0))
BYOL = data.View(crop=(0.08, 1.0), flip=0.5, jitter=(0.4, 0.4, 0.2, 0.1), p_jitter=0.8, p_grey=0.2, p_blur=1.0,
                 norm=data.IMAGENET)
PAIRS = {"simclr": (SIMCLR, SIMCLR),
         "byol": (BYOL, dataclasses.replace(BYOL, p_blur=0.1, p_solarize=0.2)),
         "weak-strong": (data.View(norm=data.IMAGENET), BYOL)}


def test_view_probabilities():
    n = 20000
    g = torch.Generator().manual_seed(0)
    q = data.sample_view(n, 64, 64, g, SIMCLR)
    for key, p in [("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.5), ("solarize", 0.0)]:
        assert abs(q[key].float().mean() - p) < 0.015, key
    f = q["factors"]
    for i in range(3):  # brightness, contrast, saturation ~ U(0.2, 1.8)
        assert f[:, i].min() >= 0.2 and f[:, i].max() <= 1.8 and abs(f[:, i].mean() - 1) < 0.02
    assert f[:, 3].min() >= -0.2 and f[:, 3].max() <= 0.2 and abs(f[:, 3].mean()) < 0.01
    assert (q["order"].sort(1).values == torch.arange(4)).all()  # each row a permutation
    assert len({tuple(r) for r in q["order"].tolist()}) == 24  # all orders occur
    assert (q["order"][:, 0] == 2).float().mean().sub(0.25).abs() < 0.015
    assert q["sigma"].min() >= 0.1 and q["sigma"].max() <= 2.0
    # every field is read: other values, other draws
    other = data.View(crop=(0.5, 0.6), flip=0.1, jitter=(0.1, 0.3, 0.0, 0.05), p_jitter=0.3, p_grey=0.7, p_blur=0.25,
                      sigma=(1.0, 1.5), p_solarize=0.4)
    q = data.sample_view(n, 64, 64, g, other)
    for key, p in [("flip", 0.1), ("jitter", 0.3), ("gray", 0.7), ("blur", 0.25), ("solarize", 0.4)]:
        assert abs(q[key].float().mean() - p) < 0.015, key
    area = (q["boxes"][:, 2] * q["boxes"][:, 3]).double() / 64 ** 2
    assert area.min() >= 0.45 and area.max() <= 0.65  # scale 0.5-0.6, whole pixels
    lo, hi = q["factors"].min(0).values, q["factors"].max(0).values
    torch.testing.assert_close(lo, torch.tensor([0.9, 0.7, 1.0, -0.05]), atol=2e-3, rtol=0)
    torch.testing.assert_close(hi, torch.tensor([1.1, 1.3, 1.0, 0.05]), atol=2e-3, rtol=0)
    assert q["sigma"].min() >= 1.0 and q["sigma"].max() <= 1.5 and q["sigma"].max() - q["sigma"].min() > 0.49
    whole = data.sample_view(5, 40, 70, g, data.View(p_blur=1.0))  # no crop: the whole image
    assert whole["boxes"].tolist() == [[0, 0, 40, 70]] * 5


def reference_view(x8, q, view, size, kernel, flip_last):
    """One view composed image by image from torchvision's functional ops, in the recipe's order."""
    jitter = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    out = []
    for i in range(len(x8)):
        y = TF.resized_crop(x8[i].float() / 255, *q["boxes"][i].tolist(), [size, size], antialias=True)
        if not flip_last and q["flip"][i]:  # SimCLR / CC: flip right after the crop
            y = TF.horizontal_flip(y)
        if q["jitter"][i]:
            for o in q["order"][i].tolist():
                y = jitter[o](y, q["factors"][i, o].item())
        if q["gray"][i]:
            y = TF.rgb_to_grayscale(y, num_output_channels=3)
        if q["blur"][i]:
            y = TF.gaussian_blur(y, [kernel, kernel], [q["sigma"][i].item()] * 2)
        if q["solarize"][i]:
            y = TF.solarize(y, 0.5)
        if flip_last and q["flip"][i]:  # BYOL: flip last
            y = TF.horizontal_flip(y)
        if view.norm:
            y = TF.normalize(y, *view.norm)
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("pair", list(PAIRS))
def test_views_match_torchvision_composition(pair):
    x8 = real_batch(8, 48)
    aug = data.Augmentation(PAIRS[pair], 32)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    x_a, x_b = aug.views(x8, g)
    assert x_a.shape == x_b.shape == (8, 3, 32, 32) and x_a.dtype == x_b.dtype == torch.float32
    g2 = torch.Generator()
    g2.set_state(state)
    for out, view in zip((x_a, x_b), aug.recipe):
        if not view.random:  # PICI's weak view, CC's raw view: the eval transform, nothing drawn
            torch.testing.assert_close(out, aug.eval(x8))
            continue
        q = data.sample_view(8, 48, 48, g2, view)
        ref = reference_view(x8, q, view, 32, aug.kernel, flip_last=pair != "simclr")
        close = (out - ref).abs() <= 1e-4
        assert close.float().mean() > 0.9999, (out - ref).abs().max()  # solarize may flip a pixel at 0.5 exactly
    assert torch.equal(g2.get_state(), g.get_state())  # the views drew exactly what sample_view draws


def test_views_random_per_sample_and_seeded():
    x8 = real_batch(2, 48)[:1].expand(16, -1, -1, -1).contiguous()  # one image, 16 times
    aug = data.Augmentation(PAIRS["simclr"], 32)
    a1, b1 = aug.views(x8, torch.Generator().manual_seed(7))
    a2, b2 = aug.views(x8, torch.Generator().manual_seed(7))
    a3, _ = aug.views(x8, torch.Generator().manual_seed(8))
    assert torch.equal(a1, a2) and torch.equal(b1, b2)  # same seed, same views
    assert not torch.equal(a1, a3) and not torch.equal(a1, b1)
    flat = a1.flatten(1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(16) for j in range(i))  # per-sample parameters
    assert a1.min() >= 0 and a1.max() <= 1 + 1e-6  # norm None: no normalisation


def test_parameters_packed_for_one_copy():
    """to_device's packing: tensors of every dtype and shape come back bit for bit from one buffer."""
    g = torch.Generator().manual_seed(0)
    tensors = [torch.rand(5, 3, generator=g), torch.rand(7, generator=g) < 0.5, torch.randperm(9, generator=g),
               torch.rand(2, 2, generator=g).double(), torch.zeros(0), torch.tensor(3.5), torch.rand(4, 6, generator=g).T]
    buf, unpack = data._pack(tensors)
    assert buf.dtype == torch.uint8 and buf.dim() == 1
    out = unpack(buf.clone())  # a copy, as the device gets one
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(out, tensors))
    assert data.to_device(tensors, "cpu")[0] is tensors[0]  # on the CPU nothing is copied


def test_augmentation_bad_recipe():
    with pytest.raises(ValueError, match="two data.View"):
        data.Augmentation("simclr", 32)
    with pytest.raises(ValueError, match="normalisation"):
        data.Augmentation((SIMCLR, BYOL), 32)


# --- datasets --------------------------------------------------------------------------------------

def test_digits():
    ds = data.load_dataset("digits", image_size=32)
    assert ds.images.shape == (1797, 3, 8, 8) and ds.images.dtype == torch.uint8  # native 8x8 kept
    assert ds.images.max() == 255 and ds.images.min() == 0
    assert torch.equal(ds.images[:, 0], ds.images[:, 2])  # grey replicated
    assert ds.num_classes == 10 and len(ds.files) == 1797 and ds.labels.bincount().min() >= 170
    sub = data.load_dataset("digits", max_images=95, seed=3)
    counts = sub.labels.bincount()
    assert len(sub) == 95 and counts.min() >= 9 and counts.max() <= 10  # class-balanced
    assert torch.equal(sub.images, data.load_dataset("digits", max_images=95, seed=3).images)
    assert sub.files != data.load_dataset("digits", max_images=95, seed=4).files
    assert data.load_dataset("digits", num_clusters=20).num_classes == 20


def test_balanced_subset():
    labels = torch.tensor([0] * 50 + [1] * 5 + [2] * 30)
    idx = data.balanced_subset(labels, 30, seed=1)
    assert len(idx) == 30 and len(set(idx.tolist())) == 30 and torch.equal(idx, idx.sort().values)
    assert labels[idx].bincount().tolist() == [13, 5, 12] or labels[idx].bincount().tolist() == [12, 5, 13]
    assert len(data.balanced_subset(None, 7, seed=1, total=20)) == 7


def test_class_folders_all(tmp_path):
    folder = make_image_folder(tmp_path / "shapes", classes=8, per_class=12, size=(48, 40))
    ds = data.load_dataset(str(folder), root=str(tmp_path), storage_size=32)
    assert ds.images.shape == (96, 3, 32, 32) and ds.num_classes == 8 and ds.name == "shapes"
    assert ds.labels.bincount().tolist() == [12] * 8
    assert ds.classes[0] == "blue-square" and ds.files[0] == os.path.join("blue-square", "blue-square000.jpg")
    assert ds.images.float().std() > 20  # drawn pictures, not blanks


def test_default_size_subset(tmp_path):
    folder = make_image_folder(tmp_path / "big", classes=8, per_class=4, size=(256, 256), ext=".png")
    ds = data.load_dataset(str(folder), root=str(tmp_path), image_size=224, max_images=16)
    assert ds.images.shape == (16, 3, 256, 256) and ds.labels.bincount().tolist() == [2] * 8


def test_tiff_and_small_images(tmp_path):
    folder = make_image_folder(tmp_path / "tif", classes=4, per_class=2, size=(96, 96), ext=".tif")
    ds = data.load_dataset(str(folder), root=str(tmp_path), image_size=40)
    assert ds.images.shape == (8, 3, 96, 96) and ds.num_classes == 4 and ds.files[0].endswith(".tif")  # native
    assert ds.sizes.tolist() == [[96, 96]] * 8
    folder = make_image_folder(tmp_path / "small", classes=4, per_class=5, size=(128, 128))
    ds = data.load_dataset(str(folder), root=str(tmp_path), image_size=224, max_images=12)
    assert ds.images.shape == (12, 3, 128, 128)  # native 128 px
    assert ds.labels.bincount().tolist() == [3] * 4 and len(ds.classes) == 4


def copy_images(dst, n, start=0, cls="beach", size=(64, 64)):
    """Write n drawn JPEG images of one class into dst (named like the originals: <cls>NN.jpg).
    `start` offsets the random draw, so two calls give different pictures."""
    os.makedirs(dst, exist_ok=True)
    name, colour, kind = CLASSES[{"beach": 3, "forest": 1}.get(cls, 0)]
    rng = np.random.default_rng(1000 * start + len(cls))
    for i in range(start, start + n):
        draw_image(kind, colour, size, rng).save(os.path.join(dst, f"{cls}{i:02d}.jpg"))


def test_rsod_raw_layout(tmp_path):
    root = tmp_path / "data"
    for i, c in enumerate(["aircraft", "oiltank", "overpass", "playground"]):
        copy_images(root / "rsod" / c / "JPEGImages", 3, start=3 * i)
        os.makedirs(root / "rsod" / c / "Annotation" / "xml")
        (root / "rsod" / c / "Annotation" / "xml" / "x.xml").write_text("<annotation/>")
    (root / "rsod" / "readme.txt").write_text("not an image")
    ds = data.load_dataset("rsod", root=str(root), image_size=32)
    assert len(ds) == 12 and ds.classes == ["aircraft", "oiltank", "overpass", "playground"] and ds.num_classes == 4
    assert all(f.endswith(".jpg") and os.sep + "JPEGImages" + os.sep in f for f in ds.files)
    assert ds.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3


def test_imagenet_subset(tmp_path):
    train = tmp_path / "imagenet" / "train"
    for w in data.IMAGENET_WNIDS["imagenet10"] + ["n01440764"]:  # one extra class, not in ImageNet-10
        copy_images(train / w, 1)
    ds = data.load_dataset("imagenet10", root=str(tmp_path), image_size=32)
    assert len(ds) == 10 and ds.classes == data.IMAGENET_WNIDS["imagenet10"] and ds.num_classes == 10
    with pytest.raises(data.DataError, match="n02085936"):
        data.load_dataset("imagenet-dogs", root=str(tmp_path))


def test_flat_folder_is_unlabelled(tmp_path):
    copy_images(tmp_path / "mine", 5)
    with pytest.raises(data.DataError, match="num-clusters"):
        data.load_dataset(str(tmp_path / "mine"), root=str(tmp_path))
    ds = data.load_dataset(str(tmp_path / "mine"), root=str(tmp_path), image_size=32, num_clusters=3)
    assert ds.labels is None and ds.num_classes == 3 and len(ds) == 5 and ds.classes == []
    assert len(data.load_dataset(str(tmp_path / "mine"), root=str(tmp_path), num_clusters=3, max_images=2)) == 2


def test_cache_reuse_and_invalidation(tmp_path, monkeypatch):
    folder, root = tmp_path / "two", str(tmp_path / "root")
    copy_images(folder / "a", 4, cls="beach")
    copy_images(folder / "b", 4, cls="forest")
    first = data.load_dataset(str(folder), root=root, image_size=16)
    assert len(os.listdir(os.path.join(root, ".cache"))) == 1
    real_decode, calls = data._decode, []

    def no_decode(path, size):
        raise AssertionError("decoded again")

    monkeypatch.setattr(data, "_decode", no_decode)
    again = data.load_dataset(str(folder), root=root, image_size=16)  # from the cache
    assert torch.equal(first.images, again.images) and first.files == again.files
    assert torch.equal(first.labels, again.labels) and again.classes == ["a", "b"]
    assert torch.equal(first.sizes, again.sizes) and first.images.shape[-1] == 64  # native

    def counting(path, size):
        calls.append(path)
        return real_decode(path, size)

    monkeypatch.setattr(data, "_decode", counting)
    copy_images(folder / "b", 1, start=4, cls="forest")  # a new file: rebuild
    assert len(data.load_dataset(str(folder), root=root, image_size=16)) == 9 and len(calls) == 9
    calls.clear()
    copy_images(folder / "c", 1, start=50, cls="beach")
    os.replace(folder / "c" / "beach50.jpg", folder / "a" / "beach00.jpg")  # a changed file: rebuild
    os.rmdir(folder / "c")
    changed = data.load_dataset(str(folder), root=root, image_size=16)
    assert len(calls) == 9 and not torch.equal(changed.images[0], first.images[0])
    calls.clear()
    ds = data.load_dataset(str(folder), root=root, image_size=48)  # another training size: the same native store
    assert calls == [] and ds.images.shape[-1] == 64
    assert data.load_dataset(str(folder), root=root, image_size=48, storage_size=40).images.shape[-1] == 40
    assert len(calls) == 9  # --storage-size: rebuild
    calls.clear()
    data.load_dataset(str(folder), root=root, storage_size=40)
    assert calls == []
    monkeypatch.setattr(data, "CACHE_VERSION", data.CACHE_VERSION + 1)  # a new cache format: rebuild
    data.load_dataset(str(folder), root=root, image_size=48)
    assert len(calls) == 9
    assert not [f for f in os.listdir(os.path.join(root, ".cache")) if f.endswith(".tmp")]


# --- bad input: one clear DataError ------------------------------------------------------------------

def test_unknown_name(tmp_path):
    with pytest.raises(data.DataError, match="unknown dataset 'cifar11'.*cifar10.*ucmerced"):
        data.load_dataset("cifar11", root=str(tmp_path))


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(data.DataError, match=r"rsod/<class>/<image>"):
        data.load_dataset("rsod", root=str(tmp_path))
    with pytest.raises(data.DataError, match="folder ./no/such/folder not found"):
        data.load_dataset("./no/such/folder", root=str(tmp_path))
    with pytest.raises(data.DataError, match="tiny-imagenet-200"):
        data.load_dataset("tiny-imagenet", root=str(tmp_path))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "notes.txt").write_text("x")
    with pytest.raises(data.DataError, match=r"no images .*<class>"):
        data.load_dataset(str(tmp_path / "empty"), root=str(tmp_path))
    with pytest.raises(data.DataError, match="at least 2"):
        data.load_dataset("digits", num_clusters=1)


def test_single_class(tmp_path):
    copy_images(tmp_path / "one" / "beach", 3)
    with pytest.raises(data.DataError, match="1 class folder"):
        data.load_dataset(str(tmp_path / "one"), root=str(tmp_path), image_size=32)


def test_unreadable_images(tmp_path):
    folder = tmp_path / "some_bad"
    copy_images(folder / "a", 100, cls="beach")
    copy_images(folder / "b", 100, cls="forest")
    (folder / "a" / "broken.jpg").write_bytes(b"not a jpeg")  # 1 of 201: skipped with a warning
    with pytest.warns(UserWarning, match="broken.jpg"):
        ds = data.load_dataset(str(folder), root=str(tmp_path), storage_size=16)
    assert len(ds) == 200 and "a/broken.jpg" not in ds.files
    folder = tmp_path / "many_bad"
    copy_images(folder / "a", 5, cls="beach")
    copy_images(folder / "b", 5, cls="forest")
    (folder / "b" / "broken.png").write_bytes(b"\x89PNG garbage")  # 1 of 11: too many
    with pytest.raises(data.DataError, match="broken.png"):
        data.load_dataset(str(folder), root=str(tmp_path), storage_size=16)


def test_torchvision_dataset_offline(tmp_path, monkeypatch):
    def offline(self):
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    monkeypatch.setattr(torchvision.datasets.STL10, "download", offline)
    with pytest.raises(data.DataError, match="cifar-10-batches-py.*cifar-10-python.tar.gz"):
        data.load_dataset("cifar10", root=str(tmp_path))
    with pytest.raises(data.DataError, match="stl10_binary"):
        data.load_dataset("stl10", root=str(tmp_path))


# --- CIFAR-100's coarse labels --------------------------------------------------------------------

def test_cifar100_coarse_table():
    table = data.CIFAR100_COARSE
    assert len(table) == 100 and sorted(torch.tensor(table).bincount().tolist()) == [5] * 20
    assert table[:10] == [4, 1, 14, 8, 0, 6, 7, 7, 18, 3]  # apple, aquarium_fish, baby, bear, beaver, bed, ...
    assert table[-5:] == [0, 17, 8, 14, 13]  # whale, willow_tree, wolf, woman, worm


def test_cifar100_loader(tmp_path, monkeypatch):
    # fake CIFAR-100 files in torchvision's format; the coarse labels come from our table
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    fine_names = sorted(f for v in data.CIFAR100_SUPERCLASSES.values() for f in v.split())
    g = torch.Generator().manual_seed(0)
    fine = {"train": list(range(0, 100, 7)), "test": [99, 0, 50]}
    for split, labels in fine.items():
        x = torch.randint(0, 256, (len(labels), 3072), dtype=torch.uint8, generator=g).numpy()
        with open(folder / split, "wb") as f:
            pickle.dump({"data": x, "fine_labels": labels, "coarse_labels": [0] * len(labels)}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": fine_names}, f)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    ds = data.load_dataset("cifar100", root=str(tmp_path), image_size=224)
    n = len(fine["train"]) + len(fine["test"])
    assert ds.images.shape == (n, 3, 32, 32) and ds.num_classes == 20 and ds.classes[0] == "aquatic_mammals"
    assert ds.labels.tolist() == [data.CIFAR100_COARSE[y] for y in fine["train"] + fine["test"]]
    assert ds.files[0] == "cifar100/train/0" and ds.files[-1] == "cifar100/test/2"
    small = data.load_dataset("cifar100", root=str(tmp_path), image_size=8, storage_size=16)  # S < 32: shrunk
    assert small.images.shape == (n, 3, 16, 16) and small.sizes.tolist() == [[32, 32]] * n


# --- batches -----------------------------------------------------------------------------------------

def test_batches():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2)
    labels = torch.arange(10) * 10
    got = list(data.batches(images, labels, 4, generator=torch.Generator().manual_seed(0)))
    assert len(got) == 2 and all(len(x) == 4 for x, _, _ in got)  # drop_last
    idx = torch.cat([i for _, _, i in got])
    assert len(set(idx.tolist())) == 8 and not torch.equal(idx, torch.arange(8))  # shuffled, no repeats
    for x, y, i in got:
        assert torch.equal(x[:, 0, 0, 0].long(), i) and torch.equal(y, i * 10) and i.dtype == torch.int64
    again = list(data.batches(images, labels, 4, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(a[2], b[2]) for a, b in zip(got, again))  # seeded
    ordered = list(data.batches(images, None, 4, shuffle=False, drop_last=False))
    assert [len(i) for _, _, i in ordered] == [4, 4, 2] and ordered[0][1] is None
    assert torch.equal(torch.cat([i for _, _, i in ordered]), torch.arange(10))
    # each rank's share is a contiguous part of the same global batch
    shares = [list(data.batches(images, labels, 4, generator=torch.Generator().manual_seed(0), rank=r, world_size=2))
              for r in range(2)]
    for k, (_, _, i) in enumerate(got):
        assert torch.equal(torch.cat([shares[0][k][2], shares[1][k][2]]), i) and len(shares[0][k][2]) == 2
    with pytest.raises(data.DataError, match="divide"):
        list(data.batches(images, labels, 5, world_size=2))
    with pytest.raises(data.DataError, match="larger than"):
        list(data.batches(images, labels, 16))
