"""Shared test fixtures: image folders drawn at run time, and helpers that run a method script end
to end on the CPU. The suite reads nothing outside the repository."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent

# Eight classes a network can tell apart at 32 px: a colour and a shape per class, each image with
# its own position, size, background shade and pixel noise.
CLASSES = [("red-disc", (220, 40, 40), "disc"), ("green-disc", (40, 200, 60), "disc"),
           ("blue-square", (40, 70, 220), "square"), ("yellow-square", (230, 210, 40), "square"),
           ("cyan-stripes", (40, 200, 210), "stripes"), ("magenta-stripes", (210, 50, 200), "stripes"),
           ("white-cross", (240, 240, 240), "cross"), ("orange-cross", (240, 140, 30), "cross")]


def draw_image(kind, colour, size, rng):
    """One RGB PIL image of `size` (width, height): a shape of `colour` on a noisy dark background."""
    w, h = size
    background = rng.integers(0, 90, 3)
    pixels = np.clip(background + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(pixels)
    d = ImageDraw.Draw(im)
    r = rng.uniform(0.25, 0.4) * min(w, h)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    c = tuple(int(v) for v in np.clip(np.array(colour) + rng.integers(-20, 21, 3), 0, 255))
    if kind == "disc":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=c)
    elif kind == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=c)
    elif kind == "stripes":
        step = max(2, int(r / 2))
        for x0 in range(0, w, 2 * step):
            d.rectangle([x0, 0, x0 + step - 1, h], fill=c)
    else:
        t = max(1, int(r / 3))
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=c)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=c)
    return im


def make_image_folder(folder, classes=8, per_class=32, size=(48, 40), ext=".jpg", seed=0, flat=False):
    """Write `per_class` images of each of the first `classes` classes into `folder/<class>/` (or all
    into `folder/` when `flat`), as `ext` files of `size`; returns the folder."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    for name, colour, kind in CLASSES[:classes]:
        where = folder if flat else folder / name
        where.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_image(kind, colour, size, rng).save(where / f"{name}{i:03d}{ext}")
    return folder


def make_run(folder, **kw):
    """A common.Run of cc.py on the CPU, its folder <folder>/run (not made yet): for tests of the run's parts."""
    import cc
    import common

    return common.Run(cc.Args(**{"device": "cpu", "out_dir": str(folder), "run_name": "run", **kw}), "cc")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so the fixture below knows whether the test passed."""
    outcome = yield
    setattr(item, "report_" + call.when, outcome.get_result())


@pytest.fixture
def tmp_path(tmp_path, request):
    """pytest's tmp_path, deleted as soon as its test passes: the end-to-end runs write ResNet
    checkpoints of ~250 MB each, and pytest would keep three sessions of them. A failed test's
    folder stays for inspection."""
    yield tmp_path
    report = getattr(request.node, "report_call", None)
    if report is not None and report.passed:
        shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """256 JPEG images, 48x40 px, in 8 class folders: the end-to-end tests' dataset."""
    return make_image_folder(tmp_path_factory.mktemp("images") / "shapes")


def run_script(script, *args, out_dir, data_root, timeout=900, threads=2):
    """Run `python <script> args...` on the CPU, fail with its output if it fails, return stdout."""
    cmd = [sys.executable, str(ROOT / script), *map(str, args), "--out-dir", str(out_dir), "--data-root", str(data_root),
           "--device", "cpu", "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc.stdout


RUN_FILES = ["args.json", "log.jsonl", "checkpoint.pt", "final.json", "assignments.csv", "clusters.png"]


def check_run_files(run_path, num_images, epochs):
    """Every file a run writes is there and well formed."""
    for name in RUN_FILES:
        assert (run_path / name).is_file(), f"{name} missing in {run_path}"
    log = [json.loads(line) for line in (run_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, epochs + 1))
    assert all(r["img_per_s"] > 0 and r["seconds"] > 0 for r in log)
    final = json.loads((run_path / "final.json").read_text())
    for key in ("nmi", "acc", "ari"):
        assert 0.0 <= final[key] <= 1.0 or (key == "ari" and -1 <= final[key] <= 1)
    for key in ("epochs", "img_per_s", "wall_seconds", "device", "precision", "peak_memory_mb"):
        assert key in final, key
    assert final["epochs"] == epochs
    rows = (run_path / "assignments.csv").read_text().splitlines()
    assert rows[0] == "index,file,label,class,cluster,confidence" and len(rows) == num_images + 1
    assert (run_path / "clusters.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return final


def check_resume(script, tmp_path, image_folder, *args, epochs=2):
    """Train `epochs` epochs in one go, and 1 epoch then --resume auto to `epochs`: the final
    metrics and every logged loss are equal, each epoch logged once (exact resume on CPU)."""
    common = ["--dataset", image_folder, "--max-images", 256, "--image-size", 32, "--eval-every", 1, "--save-every", 1, *args]
    full = run_script(script, *common, "--epochs", epochs, "--run-name", "full", out_dir=tmp_path, data_root=tmp_path / "data")
    run_script(script, *common, "--epochs", 1, "--run-name", "part", out_dir=tmp_path, data_root=tmp_path / "data")
    run_script(script, *common, "--epochs", epochs, "--run-name", "part", "--resume", "auto", out_dir=tmp_path, data_root=tmp_path / "data")
    a = check_run_files(tmp_path / "full", 256, epochs)
    b = json.loads((tmp_path / "part" / "final.json").read_text())
    for key in ("nmi", "acc", "ari"):
        assert a[key] == b[key], (key, a[key], b[key])
    # the losses of every epoch (epoch 1 of "part" was its last, so it was not evaluated mid-run)
    log = lambda p: [{k: v for k, v in json.loads(line).items() if k == "epoch" or k.startswith("loss")}
                     for line in (p / "log.jsonl").read_text().splitlines()]
    assert log(tmp_path / "full") == log(tmp_path / "part")
    assert "final: NMI" in full
    return a


@pytest.fixture
def fake_stl10(monkeypatch, image_folder):
    """`--dataset stl10` reads the test images, and a copy of them (in reverse order) as STL-10's
    unlabeled split when the script asks for it: for the scripts' handling of the 100k unlabeled
    images. In-process runs (`module.main(argv)`) only."""
    import data

    real = data.load_dataset

    def load(name, *args, with_unlabeled=False, **kwargs):
        if str(name) != "stl10":
            return real(name, *args, with_unlabeled=with_unlabeled, **kwargs)
        ds = real(image_folder, *args, **kwargs)
        ds.name, ds.unlabeled = "stl10", ds.images.flip(0).clone() if with_unlabeled else None
        return ds

    monkeypatch.setattr(data, "load_dataset", load)


def adam_steps(checkpoint):
    """How many optimiser steps a run took, from its checkpoint (Adam counts them per parameter)."""
    import torch

    state = torch.load(checkpoint, weights_only=True)["optimizer"]["state"]
    return int(next(iter(state.values()))["step"])


def in_process(module, *args, out_dir, data_root):
    """Run `module.main` in this process on the CPU (one thread) and return the run folder's final.json."""
    argv = [*map(str, args), "--out-dir", str(out_dir), "--data-root", str(data_root), "--device", "cpu", "--threads", "1"]
    module.main(argv)
    name = argv[argv.index("--run-name") + 1]
    return json.loads((Path(out_dir) / name / "final.json").read_text())
