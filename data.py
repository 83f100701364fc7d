"""Datasets and batched augmentations: images decoded once into one cached uint8 tensor (N, 3, S, S), each
whole (the authors crop the original), augmented a batch at a time on the device as torchvision's ops."""

import errno
import functools
import hashlib
import json
import math
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import common

# classes per dataset, as the papers use them
DATASETS = {
    "digits": 10, "cifar10": 10, "cifar100": 20, "stl10": 10, "imagenet10": 10, "imagenet-dogs": 15,
    "tiny-imagenet": 200, "rsod": 4, "ucmerced": 21, "siri-whu": 12, "aid": 30, "d0": 40, "dtd": 47,
    "chaoyang": 4,
}
IMAGENET_WNIDS = {
    "imagenet10": "n02056570 n02085936 n02128757 n02690373 n02692877 n03095699 n04254680 n04285008 "
                  "n04467665 n07747607".split(),
    "imagenet-dogs": "n02085936 n02086646 n02088238 n02091467 n02097130 n02099601 n02101388 n02101556 "
                     "n02102177 n02105056 n02105412 n02105855 n02107142 n02110958 n02112137".split(),
}
# CIFAR-100's 20 super-classes (coarse ids in sorted order, as its meta file)
CIFAR100_SUPERCLASSES = dict(line.split(": ") for line in """\
aquatic_mammals: beaver dolphin otter seal whale
fish: aquarium_fish flatfish ray shark trout
flowers: orchid poppy rose sunflower tulip
food_containers: bottle bowl can cup plate
fruit_and_vegetables: apple mushroom orange pear sweet_pepper
household_electrical_devices: clock keyboard lamp telephone television
household_furniture: bed chair couch table wardrobe
insects: bee beetle butterfly caterpillar cockroach
large_carnivores: bear leopard lion tiger wolf
large_man-made_outdoor_things: bridge castle house road skyscraper
large_natural_outdoor_scenes: cloud forest mountain plain sea
large_omnivores_and_herbivores: camel cattle chimpanzee elephant kangaroo
medium_mammals: fox porcupine possum raccoon skunk
non-insect_invertebrates: crab lobster snail spider worm
people: baby boy girl man woman
reptiles: crocodile dinosaur lizard snake turtle
small_mammals: hamster mouse rabbit shrew squirrel
trees: maple_tree oak_tree palm_tree pine_tree willow_tree
vehicles_1: bicycle bus motorcycle pickup_truck train
vehicles_2: lawn_mower rocket streetcar tank tractor""".splitlines())
# fine label id (names sorted, as torchvision's CIFAR100.classes) -> coarse id
_coarse_of = {f: c for c, name in enumerate(sorted(CIFAR100_SUPERCLASSES)) for f in CIFAR100_SUPERCLASSES[name].split()}
CIFAR100_COARSE = [_coarse_of[f] for f in sorted(_coarse_of)]
TORCHVISION = ("cifar10", "cifar100", "stl10")  # torchvision's classes, by name.upper()
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_VERSION = 3  # bumped when the decoding changes: old caches are rebuilt
CHAOYANG_CLASSES = ["normal", "serrated", "adenocarcinoma", "adenoma"]  # its label ids 0-3


class DataError(ValueError):
    """Bad dataset input; the message says how to fix it."""


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, 3, S, S) uint8, CPU: each image whole, squashed to S x S
    sizes: torch.Tensor  # (N, 2) int64: each original's (height, width), the frame crops are drawn in
    labels: torch.Tensor | None
    files: list  # paths in the folder, or "cifar10/train/123"-style ids
    classes: list
    num_classes: int  # K: --num-clusters, else len(classes)
    name: str
    unlabeled: torch.Tensor | None = None  # STL-10's unlabeled split (CC's instance loss)

    def __len__(self):
        return len(self.images)


# --- Loading

def load_dataset(name_or_path, root="./data", image_size=224, max_images=None, seed=1, num_clusters=None,
                 with_unlabeled=False, storage_size=None, cache_dir=None, need=None, memory=None):
    """A named dataset (DATASETS) or an image folder at storage_side's S (by default native: the papers
    crop the original). need: --batch-size, checked before decoding."""
    for flag, value, least, what in (("num-clusters", num_clusters, 2, "at least 2"), ("max-images", max_images, 2,
                                     "at least 2"), ("storage-size", storage_size, 1, "a positive number of pixels")):
        if value is not None and value < least:
            raise DataError(f"--{flag} must be {what}, got {value}")
    side, name = (storage_size, memory), str(name_or_path)
    title = name if name in DATASETS else os.path.basename(os.path.normpath(name))
    # a source: uint8 images (N, 3, s, s) or a folder; N ids or [(file, bytes, mtime_ns)]; labels; classes
    if name == "digits":
        from sklearn.datasets import load_digits
        d = load_digits()  # 1797 8x8 greys with values 0..16
        x = torch.from_numpy(np.round(d.images * (255 / 16)).astype(np.uint8))[:, None].expand(-1, 3, -1, -1)
        source = x, [f"digits/{i}" for i in range(len(x))], d.target, [str(c) for c in range(10)]
    elif name in TORCHVISION:  # train and test pooled: the papers' transductive protocol
        (a, labels, _), (b, more, classes) = [_torchvision(name, root, split) for split in ("train", "test")]
        files = [f"{name}/train/{i}" for i in range(len(a))] + [f"{name}/test/{i}" for i in range(len(b))]
        labels += more
        if name == "cifar100":  # 20 super-classes as ground truth, as CC and DCSC report CIFAR-100
            labels, classes = [CIFAR100_COARSE[y] for y in labels], sorted(CIFAR100_SUPERCLASSES)
        source = torch.cat([a, b]), files, labels, classes
    elif name in IMAGENET_WNIDS:
        wnids, candidates = IMAGENET_WNIDS[name], [os.path.join(root, name), os.path.join(root, "imagenet", "train")]
        folder = next((f for f in candidates if all(os.path.isdir(os.path.join(f, w)) for w in wnids)), None)
        if folder is None:
            raise DataError(f"{name} not found: expected an ImageNet train folder with the class folders "
                            f"{' '.join(wnids)} in {candidates[1]}/<wnid>/*.JPEG (or a copy of just those in "
                            f"{candidates[0]}/<wnid>/)")
        source = _folder(folder, num_clusters, wnids)
    elif name == "chaoyang":
        source = _chaoyang(os.path.join(root, "chaoyang"))
    elif name in DATASETS or os.path.isdir(name):
        folder = os.path.join(root, {"tiny-imagenet": "tiny-imagenet-200/train"}.get(name, name)) if name in DATASETS else name
        if name == "dtd" and os.path.isdir(os.path.join(folder, "images")):  # DTD as published
            folder = os.path.join(folder, "images")
        if name == "tiny-imagenet" and not os.path.isdir(folder):
            raise DataError(f"Tiny-ImageNet not found: expected {folder}/<wnid>/images/*.JPEG; download "
                            f"http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it into {root}/")
        if not os.path.isdir(folder):
            published = {"rsod": f"; RSOD as published, {folder}/<class>/JPEGImages/*.jpg, works",
                         "dtd": f"; DTD as published, {folder}/images/<class>/*.jpg, works"}.get(name, "")
            raise DataError(f"dataset '{name}' not found: expected the folder {folder}/ with one sub-folder per "
                            f"class ({DATASETS[name]} classes), e.g. {folder}/<class>/<image>.jpg (images are found "
                            f"recursively{published}). Download it from its publisher, or pass --data-root.")
        source = _folder(folder, num_clusters)
    elif os.sep in name or name.startswith("."):
        raise DataError(f"folder {name} not found: expected {name}/<class>/<image>.jpg (one sub-folder per class) "
                        f"or a flat folder of images with --num-clusters")
    else:
        raise DataError(f"unknown dataset '{name}': use one of {', '.join(DATASETS)}, or the path of a folder "
                        f"of images (one sub-folder per class, or a flat folder with --num-clusters)")
    where, files, labels, classes = source
    k = num_clusters or len(classes)

    def check(n):  # a training run needs one batch, and an image per cluster
        if need is None:
            return
        if n < need:
            raise DataError(f"{title} has {n} images, fewer than --batch-size {need}: lower --batch-size")
        if n < k:
            fix = "lower --num-clusters" if num_clusters else f"raise --max-images to at least the {k} classes"
            raise DataError(f"{title} has {n} images, fewer than the {k} clusters: {fix}")

    labels = torch.as_tensor(labels, dtype=torch.int64) if labels is not None else None
    keep = balanced_subset(labels, max_images, seed, total=len(files)) if max_images else None
    check(len(files) if keep is None else len(keep))
    if isinstance(where, str):
        images, sizes, labels, files = _stored(where, files, labels, keep, side, max_images, seed,
                                               cache_dir or os.path.join(root, ".cache"), title)
    else:
        if keep is not None:
            where, labels, files = where[keep], labels[keep], [files[i] for i in keep]
        sizes = torch.tensor(where.shape[-2:]).repeat(len(where), 1)
        images = _resize_uint8(where, storage_side(len(where), where.shape[-1], *side)).contiguous()
    ds = ImageSet(images, sizes, labels, files, classes, k, title)
    check(len(ds))  # unreadable images were dropped
    if name in DATASETS and len(ds.classes) != DATASETS[name]:
        warnings.warn(f"{name}: found {len(ds.classes)} classes, the paper's dataset has {DATASETS[name]}")
    small = (ds.sizes < image_size).any(1)
    if small.any():
        h, w = ds.sizes[small.nonzero()[0, 0]].tolist()
        warnings.warn(f"{ds.name}: {int(small.sum())} of {len(ds)} images are smaller than the training size "
                      f"{image_size} px (e.g. {w}x{h}); they are up-sampled to it")
    native, stored = int(ds.sizes.max()), ds.images.shape[-1]
    if stored < native and not storage_size:
        warnings.warn(f"{ds.name}: {len(ds)} images at their native {native} px would take {len(ds) * 3 * native ** 2 / 1e9:.1f} "
                      f"GB, more than the {memory / 1e9:.1f} GB the store may use: stored at {stored} px (--storage-size S sets the side)")
    if with_unlabeled and name == "stl10":
        u = _torchvision(name, root, "unlabeled")[0]
        u = u[balanced_subset(None, max_images, seed, total=len(u))] if max_images else u
        ds.unlabeled = _resize_uint8(u, ds.images.shape[-1]).contiguous()
    return ds


def storage_side(n, native, given=None, memory=None, cached=None):
    """`given` (--storage-size), else native, or where n x 3 x S^2 bytes exceed `memory` the largest S
    that fits (a cache's S kept till native fits)."""
    if given or memory is None or n * 3 * native ** 2 <= memory:
        return min(given or native, native)
    return cached if cached and cached < native else max(1, math.isqrt(memory // (3 * n)))


def balanced_subset(labels, n, seed, total=None):
    """Sorted indices of a seeded, class-balanced subset of n images."""
    total = len(labels) if labels is not None else total
    if n >= total:
        return torch.arange(total)
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    # ranks 0, 1, 2... of every class in turn: the classes' counts differ by one at most
    lab = torch.as_tensor(labels)[perm] if labels is not None else torch.zeros(total, dtype=torch.int64)
    order, counts = torch.argsort(lab, stable=True), torch.bincount(lab)
    rank = torch.empty_like(lab)
    rank[order] = torch.arange(total) - (torch.cumsum(counts, 0) - counts)[lab[order]]
    return perm[torch.argsort(rank * total + torch.arange(total))[:n]].sort().values


def _resize_uint8(x, size):
    if x.shape[-1] == size:
        return x
    out = torch.empty(len(x), 3, size, size, dtype=torch.uint8)
    for i in range(0, len(x), 1024):
        y = torch.nn.functional.interpolate(x[i:i + 1024].float(), (size, size), mode="bilinear", antialias=True)
        out[i:i + 1024] = y.round_().clamp_(0, 255)
    return out


def _torchvision(name, root, split):
    import torchvision
    cls = getattr(torchvision.datasets, name.upper())
    kw = {"split": split} if name == "stl10" else {"train": split == "train"}
    try:
        d = cls(root, download=False, **kw)
    except RuntimeError:
        try:
            d = cls(root, download=True, **kw)
        except Exception as e:
            raise DataError(f"{cls.__name__} is not in {os.path.join(root, cls.base_folder)} and could not be "
                            f"downloaded ({type(e).__name__}: {e}); download {cls.url} and extract it into {root}/ "
                            f"(or pass --data-root)") from e
    x = torch.from_numpy(d.data)
    if name == "stl10":
        return x, [int(y) for y in d.labels], d.classes
    return x.permute(0, 3, 1, 2), list(d.targets), d.classes


def _folder(folder, num_clusters, only=None):
    """The images in folder's class folders (or `only` those), searched recursively, or in a flat folder."""
    listing = []
    for sub in only or [""]:
        for top, dirs, fnames in os.walk(os.path.join(folder, sub), followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # skips our .cache
            for f in sorted(f for f in fnames if os.path.splitext(f)[1].lower() in IMAGE_EXTS and not f.startswith(".")):
                st = os.stat(os.path.join(top, f))
                listing.append((os.path.relpath(os.path.join(top, f), folder), st.st_size, st.st_mtime_ns))
    if not listing:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) in {folder}: expected {folder}/<class>/.../<image>.jpg "
                        f"(one sub-folder per class) or {folder}/<image>.jpg")
    flat = [r for r in listing if os.sep not in r[0]]
    if len(flat) == len(listing):  # no class folders: the user's own unlabelled images
        if num_clusters is None:
            raise DataError(f"{folder} is a flat folder of unlabelled images: pass --num-clusters K, or put the "
                            f"images in one sub-folder per class")
        return folder, listing, None, []
    if flat:
        warnings.warn(f"{folder}: ignoring {len(flat)} images outside the class folders, e.g. {flat[0][0]}")
        listing = [r for r in listing if os.sep in r[0]]
    classes = sorted({r[0].split(os.sep)[0] for r in listing})
    if set(classes) <= {"train", "test", "val", "valid", "validation"}:  # splits: clustering them finds K = 2
        fix = (f"for Chaoyang pass --dataset chaoyang --data-root {os.path.dirname(os.path.normpath(folder))} (labels "
               f"from its train.json / test.json)" if os.path.isfile(os.path.join(folder, "train.json")) else
               f"put the images in one sub-folder per class, all splits pooled ({folder}/<class>/<image>.jpg)")
        raise DataError(f"{folder}: its only sub-folders are {', '.join(classes)}, dataset splits, not classes: {fix}")
    if len(classes) < 2:
        raise DataError(f"{folder}: found 1 class folder with images ({classes[0]}); clustering needs at least 2 "
                        f"(or a flat folder of images with --num-clusters)")
    index = {c: i for i, c in enumerate(classes)}
    return folder, listing, [index[r[0].split(os.sep)[0]] for r in listing], classes


def _chaoyang(folder):
    """Chaoyang as published, both splits pooled: {train,test}/*.jpg, labels in {train,test}.json."""
    pairs = []
    for split in ("train", "test"):
        path = os.path.join(folder, f"{split}.json")
        if not os.path.isfile(path):
            raise DataError(f"Chaoyang not found: expected {folder}/train/ and {folder}/test/ with their label files "
                            f"{folder}/train.json and {folder}/test.json, as downloaded; or pass --data-root")
        try:
            with open(path) as f:
                entries = [(e["name"], int(e["label"])) for e in json.load(f)]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path} is not Chaoyang's label file, a JSON list of "
                            f"{{\"name\": \"{split}/<file>\", \"label\": 0-3}} ({type(e).__name__}: {e}); download it again") from e
        for file, label in entries:
            if not 0 <= label < len(CHAOYANG_CLASSES):
                raise DataError(f"{path}: label {label} of {file} is not one of Chaoyang's 0-3; download it again")
        pairs += entries
    missing = [f for f, _ in pairs if not os.path.exists(os.path.join(folder, f))]
    if missing:
        raise DataError(f"{len(missing)} images named in Chaoyang's label files are not in {folder} "
                        f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); extract the whole download there")
    stats = [os.stat(os.path.join(folder, f)) for f, _ in pairs]
    listing = [(os.path.normpath(f), st.st_size, st.st_mtime_ns) for (f, _), st in zip(pairs, stats)]
    return folder, listing, [y for _, y in pairs], CHAOYANG_CLASSES


def _stored(folder, listing, labels, keep, side, max_images, seed, cache_dir, name):
    """The listed files (`keep` of them) at storage_side(*side), decoded or from the cache."""
    key = [CACHE_VERSION, os.path.abspath(folder), listing, None if labels is None else labels.tolist(), max_images, seed, side[0]]
    cache = os.path.join(cache_dir, f"{name}-{side[0] or 'native'}-{hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]}.pt")
    if os.path.exists(cache):
        try:  # memory-mapped: starts at once, and the processes on one machine share the pages
            c = torch.load(cache, weights_only=True, mmap=True)
            n, native, stored = len(c["files"]), int(c["sizes"].max()), c["images"].shape[-1]
            if stored != storage_side(n, native, *side, cached=stored):
                raise OSError(f"stored at {stored} px, and {storage_side(n, native, *side)} px fits the memory now")
            _report_bad(c["bad"], len(c["files"]) + len(c["bad"]), folder)
            return c["images"], c["sizes"], c["labels"], c["files"]
        except (OSError, RuntimeError, KeyError, EOFError) as e:
            warnings.warn(f"rebuilding the cache {cache} ({e})")
    if keep is not None:
        listing, labels = [listing[i] for i in keep], labels[keep] if labels is not None else None
    files = [r[0] for r in listing]
    paths = [os.path.join(folder, f) for f in files]
    workers = os.cpu_count() or 1
    print(f"decoding {len(paths)} images of {folder} with {workers} threads (once; cached in {cache})")
    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding and resizing
        sizes = list(pool.map(_image_size, paths))
        size = storage_side(sum(s is not None for s in sizes), max((max(s) for s in sizes if s), default=1), *side)
        arr = np.zeros((len(paths), 3, size, size), np.uint8)

        def work(i):
            try:
                arr[i] = _decode(paths[i], size).transpose(2, 0, 1)
                return sizes[i] is not None
            except Exception:
                return False

        ok = list(pool.map(work, range(len(paths))))
    bad = [f for f, good in zip(files, ok) if not good]
    _report_bad(bad, len(files), folder)
    if bad:
        arr, files = arr[np.array(ok)], [f for f, g in zip(files, ok) if g]
        labels = labels[torch.tensor(ok)] if labels is not None else None
    images = torch.from_numpy(arr)
    sizes = torch.tensor([s[::-1] for s, good in zip(sizes, ok) if good], dtype=torch.int64).view(-1, 2)  # (h, w)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = f"{cache}.{os.getpid()}.tmp"
    torch.save({"images": images, "sizes": sizes, "labels": labels, "files": files, "bad": bad}, tmp)
    os.replace(tmp, cache)  # atomic: a killed run leaves no half cache
    return images, sizes, labels, files


def _report_bad(bad, total, folder):
    names = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
    if len(bad) > 0.01 * total:
        raise DataError(f"{len(bad)} of {total} images in {folder} cannot be read ({names}); "
                        f"fix or remove them (up to 1% are skipped with a warning)")
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable images in {folder}: {names}")


def _image_size(path):  # (width, height), None if unreadable
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:
        return None


def _decode(path, size):  # (size, size, 3) uint8 RGB, aspect not kept
    with Image.open(path) as im:
        im.draft("RGB", (size, size))  # JPEG: decoded at a smaller scale that still covers size x size
        im = to_rgb(im)
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)  # PIL widens the filter when shrinking: antialiased
        return np.asarray(im)


def to_rgb(im):
    """8-bit RGB, greys by their real range (Pillow's convert clips 16-bit ones to white, 0-1 floats to
    black): integers 0-65535, floats 0-1, else their min-max; transparency on white."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        x = np.asarray(im).astype(np.float64)
        lo, hi = 0.0, 1.0 if im.mode == "F" else 65535.0
        if x.min() < lo or x.max() > hi or not np.isfinite(x).all():
            x = np.nan_to_num(x, posinf=0.0, neginf=0.0)
            lo, hi = float(x.min()), float(x.max())
        im = Image.fromarray(np.round((x - lo) / max(hi - lo, 1e-12) * 255).clip(0, 255).astype(np.uint8))
    if im.mode in ("LA", "PA", "La", "RGBa") or (im.mode in ("P", "L", "RGB") and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im)
    return im.convert("RGB")


def batches(images, labels, batch_size, shuffle=True, drop_last=True, generator=None, rank=0, world_size=1, device=None):
    """(uint8 images, labels or None, int64 CPU indices) batches on `device`; under torchrun this rank's
    share of a global batch, in rank 0's order."""
    n = len(images)
    if batch_size % world_size:
        raise DataError(f"batch size {batch_size} must divide by the number of processes {world_size}")
    if drop_last and n < batch_size:
        raise DataError(f"batch size {batch_size} is larger than the {n} images; lower --batch-size")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if shuffle and world_size > 1 and torch.distributed.is_initialized():  # NCCL sends GPU tensors only
        order = order.to(device if device is not None and torch.distributed.get_backend() == "nccl" else "cpu")
        torch.distributed.broadcast(order, src=0)
        order = order.cpu()
    device = torch.device(device) if device is not None else None
    # the order where images and labels live, copied once per epoch, not per step
    on = {d: to_device([order], d)[0] for d in {torch.device("cpu"), images.device, getattr(labels, "device", images.device)}}
    for start in range(0, n - n % batch_size if drop_last else n, batch_size):
        idx = {d: o[start:start + batch_size].tensor_split(world_size)[rank] for d, o in on.items()}
        x, y = images[idx[images.device]], labels[idx[labels.device]] if labels is not None else None
        if device is not None and x.device != device:
            if x.device.type == "cpu" and device.type == "cuda":  # only a CPU tensor can be pinned
                x = x.pin_memory()
            x = x.to(device, non_blocking=True)
        yield x, y, idx[torch.device("cpu")]


# --- A run's dataset: decoded once by rank 0, errors as one line, on the GPU when it fits
def host_memory():
    """Bytes of host memory available now (Linux: MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def store_memory(args, run, share=0.25):
    """What the uint8 dataset may take (storage_side): half the host's available memory; under
    --data-on-device yes also place_images' share of the GPU's (auto: too large, it stays on the host)."""
    host = host_memory()
    limits = [host // 2] if host else []
    if args.data_on_device == "yes" and getattr(run, "device", torch.device("cpu")).type == "cuda":
        limits.append(int(share * torch.cuda.mem_get_info(run.device)[0]))
    return min(limits, default=None)


def place_images(images, choice, run, share=0.25):
    """The uint8 dataset on the GPU when it fits in `share` of its free memory (auto): no host transfers."""
    if run.device.type != "cuda" or choice == "no" or choice == "auto" and \
            images.numel() > share * torch.cuda.mem_get_info(run.device)[0]:
        return images
    return images.to(run.device)


def load_data(args, run, with_unlabeled=False):
    """load_dataset for a run's flags, its errors and warnings as one line each; under torchrun rank 0 decodes
    and caches first."""
    cache = Path(args.cache_dir or Path(args.data_root) / ".cache").absolute()
    memory = store_memory(args, run)  # measured before rank 0 decodes, so that all choose one size
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for turn in (True, False):
                if run.distributed and turn != run.is_main:
                    torch.distributed.barrier()
                if turn == run.is_main:
                    ds = load_dataset(args.dataset, root=args.data_root, image_size=args.image_size, max_images=args.max_images,
                                      seed=args.seed, num_clusters=args.num_clusters, with_unlabeled=with_unlabeled,
                                      storage_size=args.storage_size, cache_dir=str(cache),
                                      need=None if args.eval_only else args.batch_size, memory=memory)
        for w in caught if run.is_main else []:
            print(f"warning: {w.message}", file=sys.stderr, flush=True)
    except DataError as e:
        common.fail(str(e))
    except OSError as e:  # the decoded-image cache cannot be written, e.g. a read-only --data-root
        where = Path(str(e.filename or "")).absolute()
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST) or \
                cache not in (where, *where.parents) and where not in cache.parents:
            raise
        common.fail(f"cannot write the image cache in {cache} ({e.strerror}): pass --cache-dir a folder you can write to")
    args.num_clusters = ds.num_classes  # recorded with the run: --eval-only on another folder keeps the model's K
    return ds


# --- Augmentation ops on floats in [0, 1] (B, 3, H, W), as torchvision's, with no host sync: parameters come
# in one copy (to_device), constants are made on the device (_vector), per-sample choices are where or slices.

@functools.lru_cache(maxsize=None)
def _vector(values, device):
    """A constant made on `device` by fill kernels: a host copy would wait for the GPU."""
    return torch.stack([torch.full((), v, dtype=torch.float32, device=device) for v in values])


def to_device(tensors, device):
    """CPU tensors on `device` by ONE non-blocking copy of a pinned buffer."""
    device, tensors = torch.device(device), list(tensors)
    if device.type == "cpu" or not tensors:
        return tensors
    buf, unpack = _pack(tensors, pin=True)
    return unpack(buf.to(device, non_blocking=True))


def _pack(tensors, pin=False):
    """(the tensors' bytes in a uint8 buffer, a function viewing a copy of it as the tensors)."""
    tensors = [t.contiguous() for t in tensors]
    sizes = [t.nbytes for t in tensors]
    starts = [sum(-(-n // 8) * 8 for n in sizes[:i]) for i in range(len(sizes))]  # 8-byte aligned for .view(dtype)
    buf = torch.empty(starts[-1] + sizes[-1], dtype=torch.uint8, pin_memory=pin)
    for t, start, n in zip(tensors, starts, sizes):
        buf[start:start + n] = t.reshape(-1).view(torch.uint8)
    return buf, lambda b: [b[start:start + n].view(t.dtype).view(t.shape) for t, start, n in zip(tensors, starts, sizes)]


def _crop_grid(boxes, n_in, size, flip=None, sizes=None):
    """Boxes (B, 4) = (top, left, height, width) in originals of sizes (B, 2) (default: S x S) as the
    parts of their _crop_weights small enough to make on the CPU; flip (B,): mirrored."""
    offset, length = boxes[:, :2], boxes[:, 2:]  # rows, columns
    if sizes is not None:  # the same part, at least one stored pixel wide
        f = n_in / sizes.to(torch.float32)
        length = (length * f).clamp(min=1.0)
        offset = torch.minimum(offset * f, n_in - length)
    scale = length / size
    center = scale[..., None] * (torch.arange(size, device=boxes.device) + 0.5)  # crop coordinates
    if flip is not None:
        center[:, 1] = torch.where(flip[:, None], center[:, 1].flip(-1), center[:, 1])
    c = torch.arange(n_in, device=boxes.device) + 0.5 - offset[..., None]  # pixel centres, crop coordinates
    return c, center, scale.clamp(min=1.0), (c >= 0) & (c < length[..., None])


def _crop_weights(c, center, support, inside):
    """(B, 2, size, S) row and column weights of torchvision's resized_crop(..., antialias=True); a fractional
    box takes the pixels whose centres lie in it."""
    t = (c[..., None, :] - center[..., :, None]) / support[..., None, None]
    w = (1 - t.abs()).clamp(min=0) * inside[..., None, :]
    return w / w.sum(-1, keepdim=True)


def _resample(x, w):
    ry, rx = w[:, 0], w[:, 1]
    if x.dtype == torch.uint8:
        x, ry = x.float(), ry / 255
    return ry[:, None] @ x @ rx.transpose(1, 2)[:, None]  # (B, 3, size, size)


@functools.lru_cache(maxsize=None)
def _whole(stored, size, device):
    return _crop_weights(*_crop_grid(_vector((0.0, 0.0, stored, stored), device)[None], stored, size))


def resize(x, size):
    """The whole image resized: the eval transform, and PICI's weak view that "merely resizes and
    normalizes" (PICI paper, Sec. 4.1)."""
    return _resample(x, _whole(x.shape[-1], size, x.device))


def rgb_to_grey(x):
    return (_vector((0.2989, 0.587, 0.114), x.device) @ x.flatten(2)).view(len(x), 1, *x.shape[2:])  # torchvision's


def adjust_hue(x, f):
    """The hue turned by f (B,): HSV's hue h in sixths, each channel min + chroma * ramp(h)."""
    lo, v = torch.aminmax(x, dim=1)
    c = v - lo  # chroma
    below = x[:, :2] < v[:, None]  # r, g below the largest (argmax over 3 channels is slow on the CPU)
    top = below[:, 0] * (1 + below[:, 1])  # the largest channel, the first of equals: HSV's sector
    diff = (x.roll(-1, 1) - x.roll(1, 1)).gather(1, top[:, None])[:, 0]  # g - b, b - r or r - g
    h = diff / (c + (c == 0)) + (2 * top + 6 * f.view(-1, 1, 1))  # grey pixels: 0 / 1
    h = torch.remainder(h, 6)[:, None]
    k = _vector((-1.0, 2.0, 2.0, 3.0, 2.0, 4.0, 1.0, -1.0, -1.0), x.device).view(3, 3, 1, 1)
    ramps = torch.addcmul(k[0], (h - k[1]).abs_(), k[2]).clamp_(0, 1)  # R: 1 outside [1, 5]; G, B: peaks at 2, 4
    return torch.addcmul(lo[:, None], ramps, c[:, None])


def _jitter_stage(x, f, bright, sat, out=None):
    """ColorJitter's brightness (bright), saturation (sat) or contrast, by f (B, 1, 1, 1)."""
    grey = rgb_to_grey(x)
    toward = torch.where(sat, grey, grey.mean(dim=(1, 2, 3), keepdim=True))
    return torch.clamp(torch.where(bright, x * f, torch.lerp(toward, x, f)), 0, 1, out=out)


def _jitter_stages(factors, order, apply):
    """Each sample's ColorJitter order as stages: the costly hue one for all, the ops before it 0-2, after it
    3-5. Jittered samples first, by the hue's place p, stage k < 3 takes p > k (order[k]), 3 + k p <= k."""
    at = (order == 3).int().argmax(1)  # the hue's place in each order
    perm = torch.where(apply, 3 - at, 4).argsort(stable=True)  # jittered first, latest hue first
    order, factors, at, m = order[perm], factors[perm], at[perm], int(apply.sum())
    ops = torch.cat([order[:, :3], order[:, 1:]], 1)  # (B, 6): 0 brightness, 1 contrast, 2 saturation
    first = [int((at[:m] > k).sum()) for k in range(3)]
    slices = [(0, n) for n in first] + [(n, m) for n in first]
    return [perm, perm.argsort(), factors.gather(1, ops), ops == 0, ops == 2, factors[:, 3]], slices


def blur_kernel_size(size):
    """Odd kernel of about 10% of the image: 23 at 224 px (CC's code), 13 at 128, 3 at 32 and below."""
    k = max(3, int(0.1 * size))
    return k + 1 - k % 2


def _gaussian_kernels(sigma, kernel_size):
    t = torch.arange(-(kernel_size // 2), kernel_size // 2 + 1, device=sigma.device)
    k = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    return k / k.sum(1, keepdim=True)


@functools.lru_cache(maxsize=None)
def _reflect_index(n, kernel_size, device):
    """(n, kernel_size): each tap's pixel, reflected at the edges without repeating them."""
    r = kernel_size // 2
    src = (torch.arange(n, device=device)[:, None] + torch.arange(-r, r + 1, device=device)).abs()
    return torch.where(src > n - 1, 2 * (n - 1) - src, src)


def blur(x, k):
    """torchvision's gaussian_blur, kernel k (B, kernel_size): a banded matrix per sample on rows and columns."""
    n, size = x.shape[-1], k.shape[1]
    m = torch.zeros(len(x), n, n, device=x.device)
    m.scatter_add_(2, _reflect_index(n, size, x.device).expand(len(x), n, -1), k[:, None, :].expand(-1, n, -1))
    return m[:, None] @ x @ m.transpose(1, 2)[:, None]


def solarize(x, threshold=0.5):
    return torch.where(x >= threshold, 1 - x, x)


def normalize(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return (x - _vector(tuple(mean), x.device)[:, None, None]) / _vector(tuple(std), x.device)[:, None, None]


# --- Random parameters, sampled as torchvision does, from a seeded CPU generator

def _uniform(shape, lo, hi, g):
    return lo + (hi - lo) * torch.rand(shape, generator=g)


def sample_crop_boxes(n, height, width, g, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop boxes (n, 4) = (top, left, h, w) in originals height x width (numbers or (n,)
    tensors): torchvision's 10 tries, then its fallback."""
    height, width = (torch.as_tensor(v, dtype=torch.float64).expand(n)[:, None] for v in (height, width))
    area = height * width * _uniform((n, 10), *scale, g)
    aspect = torch.exp(_uniform((n, 10), math.log(ratio[0]), math.log(ratio[1]), g))
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    height, width = height[:, 0], width[:, 0]
    fw = torch.where(width / height > ratio[1], torch.round(height * ratio[1]), width)  # the fallback
    fh = torch.where(width / height < ratio[0], torch.round(width / ratio[0]), height)
    found, u = fits.any(1)[:, None], torch.rand(n, 2, generator=g).double()
    frame, box, fall = torch.stack([height, width], 1), torch.stack([h, w], 1), torch.stack([fh, fw], 1)
    corner = torch.where(found, torch.floor(u * (frame - box + 1)), torch.div(frame - fall, 2, rounding_mode="floor"))
    return torch.cat([corner, torch.where(found, box, fall)], 1).long()


@dataclass(frozen=True)
class View:
    """One view's transform, in this order, each op with its probability per sample: crop (RandomResizedCrop's
    scale; None: whole), flip, ColorJitter (random order), grayscale, Gaussian blur, solarize (at 0.5);
    then normalise by norm = (mean, std)."""
    crop: tuple | None = None
    flip: float = 0.0
    jitter: tuple = (0.0, 0.0, 0.0, 0.0)
    p_jitter: float = 0.0
    p_grey: float = 0.0
    p_blur: float = 0.0
    sigma: tuple = (0.1, 2.0)
    p_solarize: float = 0.0
    norm: tuple | None = None

    @property
    def random(self):
        return self.crop is not None or max(self.flip, self.p_jitter, self.p_grey, self.p_blur, self.p_solarize) > 0


IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)  # a View's norm for ImageNet statistics


def sample_view(n, height, width, g, view):
    """A View's random parameters for n images, drawn in a fixed order from g."""
    coin = lambda p: torch.rand(n, generator=g) < p
    b, c, s, h = view.jitter
    lo, hi = torch.tensor([max(0, 1 - b), max(0, 1 - c), max(0, 1 - s), -h]), torch.tensor([1 + b, 1 + c, 1 + s, h])
    boxes = sample_crop_boxes(n, height, width, g, scale=view.crop) if view.crop is not None else torch.stack(
        [torch.zeros(n), torch.zeros(n), torch.as_tensor(height).expand(n), torch.as_tensor(width).expand(n)], 1).long()
    return dict(boxes=boxes, flip=coin(view.flip), jitter=coin(view.p_jitter), factors=_uniform((n, 4), lo, hi, g),
                order=torch.argsort(torch.rand(n, 4, generator=g), dim=1), gray=coin(view.p_grey),
                blur=coin(view.p_blur), sigma=_uniform(n, *view.sigma, g), solarize=coin(view.p_solarize))


class Augmentation:
    """Two views of a batch of whole uint8 images on its device, as a recipe (View, View) says; eval: the
    whole image resized and normalised. On the CPU: bit for bit each op on its own samples."""

    def __init__(self, recipe, image_size):
        recipe = tuple(recipe)
        if len(recipe) != 2 or not all(isinstance(v, View) for v in recipe):
            raise ValueError(f"an augmentation recipe is two data.View, got {recipe!r}")
        if recipe[0].norm != recipe[1].norm:
            raise ValueError("the two views of a recipe must share the normalisation: the eval transform uses it")
        self.recipe, self.size, self.kernel, self.norm = recipe, image_size, blur_kernel_size(image_size), recipe[0].norm

    def views(self, x, generator, sizes=None, extra=None, recipe=None):
        """x (B, 3, S, S) uint8 of originals sized (B, 2) (height, width) -> two float32 views; extra() draws
        more CPU tensors (PICI's masking noise), sent with them, a third item."""
        n, s = len(x), x.shape[-1]
        sizes = torch.tensor([[s, s]]).expand(n, 2) if sizes is None else sizes.cpu()
        recipe = recipe or self.recipe
        drawn = [self._params(v, n, s, generator, sizes) if v.random else ([], None) for v in recipe]
        more = list(extra()) if extra is not None else []
        moved = iter(to_device([t for p, _ in drawn for t in p] + more, x.device))  # the one copy
        out = [self._apply(x, v, [next(moved) for _ in p], slices) if v.random else self.eval(x)
               for v, (p, slices) in zip(recipe, drawn)]
        return (*out, list(moved)) if extra is not None else tuple(out)

    def view(self, x, g, v, sizes=None):
        """One View; one with nothing random is `eval` and draws nothing."""
        return self.views(x, g, sizes, recipe=(v,))[0]

    def _params(self, v, n, s, g, sizes):
        q = sample_view(n, sizes[:, 0], sizes[:, 1], g, v)
        # ResizedCrop "crops an image to a random size" (CC paper, Sec. 3.1): the box is drawn on the
        # original, as RandomResizedCrop on the full image. The flip comes with the crop: it commutes
        # with the colour ops, blur and solarize, so BYOL's flip-last order gives the same images
        p, slices = [*_crop_grid(q["boxes"], s, self.size, q["flip"], sizes)], None
        if v.p_jitter > 0:
            jitter, slices = _jitter_stages(q["factors"], q["order"], q["jitter"])
            p += jitter
        if v.p_grey > 0:
            p.append(q["gray"])
        if v.p_blur > 0:  # an unblurred sample gets the kernel [0 .. 1 .. 0]: x itself
            k = _gaussian_kernels(q["sigma"], self.kernel)
            p.append(torch.where(q["blur"][:, None], k, (torch.arange(self.kernel) == self.kernel // 2).float()))
        if v.p_solarize > 0:
            p.append(torch.where(q["solarize"], 0.5, math.inf))
        return p, slices

    def _apply(self, x, v, p, slices):
        p = iter(p)
        x = _resample(x, _crop_weights(*(next(p) for _ in range(4))))
        if v.p_jitter > 0:  # in place, stage by stage on _jitter_stages' slices
            perm, back, f, bright, sat, hue = (next(p) for _ in range(6))
            x, m = x[perm], slices[-1][1]
            for i, (a, b) in enumerate(slices):
                if i == 3 and m:
                    x[:m] = adjust_hue(x[:m], hue[:m])
                if b > a:
                    _jitter_stage(x[a:b], *(t[a:b, i, None, None, None] for t in (f, bright, sat)), out=x[a:b])
            x = x[back]
        if v.p_grey > 0:
            x = torch.where(next(p).view(-1, 1, 1, 1), rgb_to_grey(x), x)
        if v.p_blur > 0:
            x = blur(x, next(p))
        if v.p_solarize > 0:
            x = solarize(x, next(p).view(-1, 1, 1, 1))
        return normalize(x, *v.norm) if v.norm else x

    def eval(self, x):
        x = resize(x, self.size)
        return normalize(x, *self.norm) if self.norm else x
