"""What a researcher looks at during and after a run: the progress line inside an epoch, TensorBoard
curves, the labelled clusters.png, the class column and provenance in the result files, and the
exported features. Unit tests with a stand-in clock, stream and writer, then one tiny CPU run of
every script (32 px, 64 images, 1 epoch), run in this process so the stand-ins can be put in."""
import csv
import importlib
import io
import json
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import common
import data
from conftest import ROOT, check_run_files, make_run


class Stream(io.StringIO):
    """Console output captured; a terminal or a file (a cluster job's log) as asked."""

    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Sums:
    """Stands in for a loop's device tensor of loss sums; counts how often it is read (a device sync)."""

    def __init__(self, terms):
        self.values, self.reads = [0.0] * terms, 0

    def tolist(self):
        self.reads += 1
        return list(self.values)


class Recorder:
    """Stands in for torch.utils.tensorboard's SummaryWriter: records the calls."""

    def __init__(self, folder):
        self.folder, self.scalars, self.flushes, self.closed = folder, [], 0, False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        self.flushes += 1

    def close(self):
        self.closed = True


def run_on(tmp_path, stream, clock=None, is_main=True, **args):
    """A run (of cc.py) whose console is `stream`, timed by `clock`."""
    run = make_run(tmp_path, **args)
    run.stream, run.is_main, run.clock = stream, is_main, clock or run.clock
    return run


def train(progress, clock, epoch, steps, seconds_per_step, sums=None, weights=None):
    """A stand-in training loop: each step takes `seconds_per_step` and adds 1 and 2 to the loss sums."""
    for _ in progress(range(steps), epoch, steps, sums, weights):
        clock.now += seconds_per_step
        if sums is not None:
            sums.values = [sums.values[0] + 1.0, sums.values[1] + 2.0]


# --- 1. progress inside an epoch ------------------------------------------------------------------
def test_progress_in_a_file_prints_a_plain_line_at_most_every_minute(tmp_path):
    stream, clock, sums = Stream(tty=False), Clock(), Sums(2)
    progress = run_on(tmp_path, stream, clock, epochs=3, batch_size=32).progress
    train(progress, clock, 0, 600, 1.0, sums)  # a 10-minute epoch, one step a second
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
    assert len(lines) == 10  # at 60, 120, ... 600 s
    # step 60 of 600 after 60 s: 32 img/s, 540 s left in this epoch, two more 600 s epochs after it
    assert lines[0] == "epoch 1/3 step 60/600 | loss 3.0000 | 32 img/s | left 0:09:00, run 0:29:00"
    assert lines[-1].startswith("epoch 1/3 step 600/600 |")
    assert sums.reads == len(lines)  # the loss sums are read only for a printed line: no per-step sync


def test_progress_on_a_terminal_rewrites_one_line_in_place(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the live line is cut to the terminal's width
    stream, clock, sums = Stream(tty=True), Clock(), Sums(2)
    run = run_on(tmp_path, stream, clock, epochs=1, batch_size=8)
    train(run.progress, clock, 0, 40, 0.25, sums, weights=[1.0, 0.5])  # 10 s
    run.print("epoch 1/1 | the epoch line")
    out = stream.getvalue()
    assert out.count("\n") == 1 and out.endswith("\r\x1b[Kepoch 1/1 | the epoch line\n")  # the live line is cleared first
    draws = out.split("\r")[1:-1]
    assert len(draws) == 17 and sums.reads == 17  # from 2 s on, every 0.5 s, to 10 s
    assert draws[0] == "epoch 1/1 step 8/40 | loss 2.0000 | 32 img/s | left 0:00:08, run 0:00:08\x1b[K"  # weights 1 and 0.5
    assert draws[-1].startswith("epoch 1/1 step 40/40 |")


def test_progress_prints_nothing_for_a_short_epoch(tmp_path):
    for tty, seconds in ((True, 1.5), (False, 55.0)):
        stream, clock, sums = Stream(tty), Clock(), Sums(2)
        progress = run_on(tmp_path, stream, clock, epochs=5, batch_size=32).progress
        train(progress, clock, 0, 100, seconds / 100, sums)
        assert stream.getvalue() == "" and sums.reads == 0, tty


def test_progress_run_left_counts_whole_epochs_as_timed(tmp_path):
    stream, clock = Stream(tty=False), Clock()
    progress = run_on(tmp_path, stream, clock, epochs=10, batch_size=16).progress
    train(progress, clock, 0, 100, 1.0)  # 100 s of steps, then 50 s evaluating and saving
    clock.now += 50.0
    stream.truncate(0)
    stream.seek(0)
    train(progress, clock, 1, 100, 1.0)
    first = stream.getvalue().splitlines()[0]
    # 40 s left in epoch 2, then 8 epochs of 150 s; no loss sums given: no loss shown
    assert first == "epoch 2/10 step 60/100 | 16 img/s | left 0:00:40, run 0:20:40"


def test_progress_counts_several_loops_as_one_epoch(tmp_path):
    # CC and ViT-IC on STL-10: the unlabeled split's loop, then the labelled one, in one epoch
    stream, clock, sums = Stream(tty=False), Clock(), Sums(2)
    progress = run_on(tmp_path, stream, clock, epochs=1, batch_size=10).progress
    for _ in progress(range(90), 0, 120):
        clock.now += 1.0
    for _ in progress(range(30), 0, 120, sums):
        clock.now += 1.0
        sums.values = [sums.values[0] + 1.0, sums.values[1] + 2.0]
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("epoch 1/1 step 60/120 | 10 img/s")  # no loss yet: the first loop has none
    assert lines[1] == "epoch 1/1 step 120/120 | loss 3.0000 | 10 img/s | left 0:00:00, run 0:00:00"


def test_progress_only_on_the_main_process(tmp_path):
    stream, clock = Stream(tty=True), Clock()
    progress = run_on(tmp_path, stream, clock, is_main=False, epochs=1, batch_size=8).progress
    assert list(progress(range(5), 0, 5)) == [0, 1, 2, 3, 4]
    train(progress, clock, 0, 100, 1.0)
    assert stream.getvalue() == ""


def test_live_line_is_cut_to_the_terminal_width(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "30")
    stream = Stream(tty=True)
    run_on(tmp_path, stream).live("x" * 100)
    assert stream.getvalue() == "\r" + "x" * 29 + "\x1b[K"  # a wrapped line could not be rewritten


def test_duration_past_a_day():
    assert common.duration(59.6) == "0:01:00"
    assert common.duration(3 * 86400 + 4 * 3600 + 5 * 60 + 6) == "3d 4:05:06"
    assert common.duration(-5) == "0:00:00"


# --- 2. TensorBoard -------------------------------------------------------------------------------
def test_tensorboard_missing_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    assert common.tensorboard() is None
    stream = Stream(tty=False)
    monkeypatch.setattr(sys, "stdout", stream)
    run = make_run(tmp_path, tensorboard=True)
    (tmp_path / "run").mkdir()  # `with run:` makes it when training starts
    run.show({"epoch": 1, "loss": 1.0}, 1, "epoch 1")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "pip install tensorboard" in lines[0]
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_run_sends_every_number_to_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "tensorboard", lambda: Recorder)  # whether or not this machine has the package
    run = run_on(tmp_path, Stream(False), tensorboard=True)
    run.show({"epoch": 3, "stage": "train", "loss": 2.5, "loss_instance": 2.0, "lr": 3e-4, "img_per_s": 100.0, "nmi": None,
                    "acc": 0.5, "empty": 2, "cli_agreement": 0.75}, 3, "epoch 3")
    assert sorted(run.writer.scalars) == sorted([("loss/total", 2.5, 3), ("loss/instance", 2.0, 3), ("train/lr", 3e-4, 3),
                                                    ("train/img_per_s", 100.0, 3), ("eval/acc", 0.5, 3), ("health/empty", 2, 3),
                                                    ("train/cli_agreement", 0.75, 3)])
    assert run.writer.folder == str(tmp_path / "run" / "tensorboard") and run.writer.flushes == 1
    writer = run.writer
    run.close()
    assert writer.closed and run.writer is None


# --- 3. clusters.png --------------------------------------------------------------------------------
def test_grid_plan_labels_each_row_and_lists_empty_clusters():
    pred = torch.tensor([2, 2, 2, 2, 2, 2, 0, 0, 0, 3])
    labels = torch.tensor([1, 1, 1, 1, 0, 0, 0, 1, 0, 1])
    rows, notes = common.grid_plan(pred, 5, labels, ["cat", "dog"])
    assert [(c, m.tolist()) for c, m, _ in rows] == [(2, [0, 1, 2, 3, 4, 5]), (0, [6, 7, 8]), (3, [9])]  # largest first
    assert [lines for _, _, lines in rows] == [["cluster 2", "6 images", "dog", "67% of the cluster"],
                                               ["cluster 0", "3 images", "cat", "67% of the cluster"],
                                               ["cluster 3", "1 image", "dog", "100% of the cluster"]]
    assert notes == ["empty clusters (2 of 5): 1, 4"]
    rows, notes = common.grid_plan(pred, 4, None, [])  # unlabelled: id and size only
    assert rows[0][2] == ["cluster 2", "6 images"] and notes == ["empty clusters (1 of 4): 1"]


def test_grid_plan_shows_the_50_largest_of_many_clusters():
    sizes = torch.arange(200) % 7 + 1  # Tiny-ImageNet's 200 clusters, sizes 1 to 7
    pred = torch.repeat_interleave(torch.arange(200), sizes)
    rows, notes = common.grid_plan(pred, 200)
    shown = {c for c, _, _ in rows}
    assert len(rows) == 50 and min(sizes[list(shown)]) >= max(sizes[[c for c in range(200) if c not in shown]])
    assert notes == ["showing the 50 largest of 200 clusters; the other 150 are in assignments.csv"]


def ink(image, box):
    """How many dark (text) pixels lie in box (left, top, right, bottom)."""
    return int((np.asarray(image.crop(box).convert("L")) < 100).sum())


def test_cluster_grid_draws_a_label_panel_per_row_and_the_notes(tmp_path):
    images = torch.full((12, 3, 32, 32), 255, dtype=torch.uint8)  # white images: any dark pixel is text
    labels = torch.tensor([0] * 5 + [1] * 7)
    pred = torch.tensor([0] * 5 + [2] * 4 + [3] * 3)  # cluster 1 of 4 is empty
    common.save_cluster_grid(tmp_path / "a.png", images, pred, torch.rand(12), labels, ["cat", "dog"], num_clusters=4)
    pred = torch.tensor([0] * 5 + [1] * 4 + [2] * 3)  # none of 3 empty
    common.save_cluster_grid(tmp_path / "b.png", images, pred, torch.rand(12), labels, ["cat", "dog"], num_clusters=3)
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    row = 64 + 2
    assert a.width == 150 + 10 * row + 2 and b.height == 3 * row + 2  # no empty cluster: no note under the rows
    assert a.height > b.height  # cluster 1 is empty: a note under the rows
    for i in range(3):
        assert ink(a, (0, 2 + i * row, 150, 2 + i * row + 64)) > 50, f"row {i} has no label"
        assert ink(a, (150, 2 + i * row, a.width, 2 + i * row + 64)) == 0  # the white images, untouched
    assert ink(a, (0, 3 * row + 2, a.width, a.height)) > 50


# --- 4. result files: class column, provenance ------------------------------------------------------
def test_git_state_of_a_checkout_and_elsewhere(tmp_path, monkeypatch):
    def git_state(folder):  # provenance's git fields for scripts in `folder`
        monkeypatch.setattr(common, "__file__", str(folder / "common.py"))
        return {k: v for k, v in common.provenance().items() if k.startswith("git_")}

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # git must not find a repository above tmp_path
    assert git_state(tmp_path) == {"git_commit": None, "git_dirty": None}
    if shutil.which("git"):
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        if head.returncode == 0:  # the tests run from a checkout
            state = git_state(ROOT)
            assert state["git_commit"] == head.stdout.strip() and isinstance(state["git_dirty"], bool)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert git_state(ROOT) == {"git_commit": None, "git_dirty": None}


# --- every script end to end ----------------------------------------------------------------------
# script, extra flags, width of features.npy: the backbone output, or the instance projector's where
# the clustering is k-means on it
RUNS = {"cc": ("cc", [], 512), "vtcc": ("vtcc", ["--vit", "tiny"], 192), "vitic": ("vitic", [], 288),
        "pici": ("pici", ["--vit", "tiny"], 192), "dcsc": ("dcsc", [], 512),
        "vtcc-instance": ("vtcc", ["--vit", "tiny", "--heads", "instance"], 128)}


@pytest.fixture(scope="module")
def runs(image_folder, tmp_path_factory):
    """run(name) -> (run folder, console output, argv, tensorboard stand-in), each run made once, on a
    terminal stand-in with a progress line after every step."""
    made = {}

    def run(name):
        if name not in made:
            script, extra, _ = RUNS[name]
            out = tmp_path_factory.mktemp(name)
            argv = ["--dataset", str(image_folder), "--max-images", "64", "--image-size", "32", "--batch-size", "32", "--epochs", "1",
                    "--eval-every", "1", "--tensorboard", "--export-features", "--device", "cpu", "--threads", "1",
                    "--out-dir", str(out), "--data-root", str(out / "data"), "--run-name", "run", *extra]
            writers, stream, threads = [], Stream(tty=True), torch.get_num_threads()
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(common, "tensorboard", lambda: lambda folder: writers.append(Recorder(folder)) or writers[-1])
                mp.setattr(common.Run, "delay", 0.0)
                mp.setattr(common.Run, "refresh", 0.0)
                mp.setattr(sys, "stdout", stream)
                mp.setattr(sys, "argv", [f"{script}.py", *argv])
                mp.setenv("COLUMNS", "200")
                try:
                    importlib.import_module(script).main(argv)
                finally:
                    torch.set_num_threads(threads)
            made[name] = (out / "run", stream.getvalue(), argv, writers[0])
        return made[name]

    yield run
    for folder, *_ in made.values():  # ResNet checkpoints of ~250 MB: not left in the temp folder
        shutil.rmtree(folder.parent, ignore_errors=True)


@pytest.mark.parametrize("name", ["cc", "vtcc", "vitic", "pici", "dcsc"])
def test_run_shows_live_progress(runs, name):
    _, out, _, _ = runs(name)
    assert "\repoch 1/1 step 1/2 | loss " in out and "\repoch 1/1 step 2/2 | loss " in out
    assert "\r\x1b[Kepoch 1/1 | loss " in out  # the epoch line replaces the live line


@pytest.mark.parametrize("name", ["cc", "vtcc", "vitic", "pici", "dcsc"])
def test_run_sends_every_logged_number_to_tensorboard(runs, name):
    run, _, _, writer = runs(name)
    assert writer.folder == str(run / "tensorboard") and writer.closed
    record = json.loads((run / "log.jsonl").read_text())
    expected = {(common.scalar_tag(k), v, 1) for k, v in record.items() if k != "epoch" and isinstance(v, (int, float))}
    assert {"loss/total", "train/lr", "train/img_per_s", "train/seconds"} <= {tag for tag, _, _ in expected}
    assert expected <= set(writer.scalars)
    final = json.loads((run / "final.json").read_text())
    for key, group in (("nmi", "eval"), ("acc", "eval"), ("ari", "eval"), ("entropy", "health"), ("empty", "health")):
        assert (f"{group}/{key}", final[key], 1) in writer.scalars, key  # the final evaluation ends the curves


@pytest.mark.parametrize("name", ["cc", "vtcc", "vitic", "pici", "dcsc"])
def test_run_result_files_name_classes_and_how_the_run_was_made(runs, name, image_folder):
    run, _, argv, _ = runs(name)
    final = check_run_files(run, 64, 1)
    folders = sorted(p.name for p in image_folder.iterdir())
    assert final["classes"] == folders
    assert final["command"] == shlex.join(["python", f"{RUNS[name][0]}.py", *argv])
    assert (final["python"], final["torch"], final["torchvision"]) == (sys.version.split()[0], torch.__version__, torchvision.__version__)
    assert "git_commit" in final and "git_dirty" in final
    with open(run / "assignments.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(r["class"] == folders[int(r["label"])] == r["file"].split("/")[0] for r in rows)  # the class of the image's folder
    image = Image.open(run / "clusters.png")
    clusters = {r["cluster"] for r in rows}
    assert image.width == 150 + 10 * 66 + 2 and image.height >= len(clusters) * 66 + 2


@pytest.mark.parametrize("name", list(RUNS))
def test_run_exports_features(runs, name):
    run, _, _, _ = runs(name)
    features = np.load(run / "features.npy")
    assert features.dtype == np.float16 and features.shape == (64, RUNS[name][2]) and np.isfinite(features).all()


def test_cc_features_are_the_backbone_output_in_dataset_order(runs, image_folder):
    import cc

    run, _, _, _ = runs("cc")
    ds = data.load_dataset(str(image_folder), root=run.parent / "data", image_size=32, max_images=64, seed=1)
    model = cc.Network(ds.num_classes, 32)
    model.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=True)["model"])
    some = torch.tensor([63, 0, 17])
    with torch.no_grad():
        expected = model.eval().backbone(data.Augmentation(cc.recipe("paper", ds.name)["views"], 32).eval(ds.images[some]))
    torch.testing.assert_close(torch.from_numpy(np.load(run / "features.npy")[some.numpy()]).float(), expected, rtol=1e-2, atol=1e-2)


def test_real_tensorboard_event_files(tmp_path, image_folder):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    import cc

    threads = torch.get_num_threads()
    try:
        cc.main(["--dataset", str(image_folder), "--max-images", "64", "--image-size", "32", "--batch-size", "32", "--epochs", "2",
                 "--eval-every", "1", "--tensorboard", "--device", "cpu", "--threads", "1", "--out-dir", str(tmp_path),
                 "--data-root", str(tmp_path / "data"), "--run-name", "run"])
    finally:
        torch.set_num_threads(threads)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("loss/total")] == pytest.approx([r["loss"] for r in log])
    assert [e.step for e in events.Scalars("eval/nmi")] == [1, 2]  # epoch 1's evaluation, then the final one
    assert {"train/lr", "train/img_per_s", "health/entropy", "eval/acc", "eval/ari"} <= set(events.Tags()["scalars"])
