"""Runs that never lose work, in the five scripts: a stop at any moment (Ctrl-C, SIGTERM, kill -9)
and `--resume auto` end as the uninterrupted run; --eval-only evaluates with the checkpoint's
arguments; a failed start leaves nothing; unwritable folders fail in one line; one writer per
run folder; log.jsonl holds each epoch once; --help is tidy; a file that is not a checkpoint is
named as such. CPU, 32 px, a few dozen images."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import cc
import common
import dcsc
import pici
import vitic
import vtcc
from conftest import ROOT, make_image_folder, make_run, run_script

SCRIPTS = {"cc": cc, "vtcc": vtcc, "vitic": vitic, "pici": pici, "dcsc": dcsc}
TIMING = ("img_per_s", "seconds")  # the only numbers of a log that may differ between two runs


def command(script, *args):
    return [sys.executable, str(ROOT / script), *map(str, args), "--device", "cpu", "--threads", "1"]


def start(script, *args):
    """Start a script in the background; SIGINT restored to its default, so Python turns it into
    KeyboardInterrupt even where the shell that started the tests ignores it."""
    return subprocess.Popen(command(script, *args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def read_log(path):
    """The records of log.jsonl; a line being written is skipped."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def stop_in_epoch(proc, log, epoch, sig):
    """Wait until `epoch - 1` is logged, then send `sig` about a third into `epoch` (its length
    judged by the epoch before). Returns stdout and stderr."""
    deadline = time.time() + 600
    while not any(r["epoch"] == epoch - 1 for r in read_log(log)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.3 * read_log(log)[-1]["seconds"])
    proc.send_signal(sig)
    return proc.communicate(timeout=600)


def without_timing(log):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in log]


# ---------------------------------------------------------------------------------------------
# 1. A stop at any moment, then --resume auto: the same log and final metrics as one straight run
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script,first,second", [("cc.py", signal.SIGINT, signal.SIGTERM), ("vitic.py", signal.SIGTERM, signal.SIGINT)],
                         ids=["cc-sigint-sigterm-kill", "vitic-sigterm-sigint-kill"])
def test_stops_mid_epoch_then_resume_end_as_an_uninterrupted_run(tmp_path, image_folder, script, first, second):
    """Four epochs straight, and the same four stopped in the middle of epoch 2 (`first`), of epoch
    3 (`second`) and of epoch 4 (kill -9), each time resumed with --resume auto. The default
    --save-every (10) leaves every intermediate checkpoint to the stops. The kill -9 leaves
    log.jsonl one epoch ahead of the checkpoint and a stale lock; the resumed run trims the log
    and is not blocked."""
    args = ["--dataset", image_folder, "--max-images", 96, "--image-size", 32, "--batch-size", 32, "--epochs", 4, "--eval-every", 1]
    straight = run_script(script, *args, out_dir=tmp_path / "straight", data_root=tmp_path / "data", threads=1)
    method = script[:-3]
    run = tmp_path / "stopped" / f"{method}-shapes-seed1"
    log, ckpt = run / "log.jsonl", run / "checkpoint.pt"
    resume = [*args, "--out-dir", tmp_path / "stopped", "--data-root", tmp_path / "data", "--resume", "auto"]
    names = {signal.SIGINT: ("Ctrl-C", 130), signal.SIGTERM: ("SIGTERM", 143)}
    for epoch, sig in ((2, first), (3, second)):
        proc = start(script, *resume)
        out, err = stop_in_epoch(proc, log, epoch, sig)
        word, code = names[sig]
        assert proc.returncode == code, (out, err)
        assert f"stopped by {word}" in out and f"in epoch {epoch}/4: {ckpt} holds epoch {epoch - 1}" in out, out
        assert f"epoch {epoch} is repeated" in out
        assert torch.load(ckpt, weights_only=True)["epoch"] == epoch - 1
        assert [r["epoch"] for r in read_log(log)] == list(range(1, epoch))

    proc = start(script, *resume)
    stop_in_epoch(proc, log, 4, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert [r["epoch"] for r in read_log(log)] == [1, 2, 3] and torch.load(ckpt, weights_only=True)["epoch"] == 2

    resumed = subprocess.run(command(script, *resume), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "resumed from epoch 2" in resumed.stdout, resumed
    full = tmp_path / "straight" / f"{method}-shapes-seed1"
    assert [r["epoch"] for r in read_log(log)] == [1, 2, 3, 4]  # each epoch once
    assert without_timing(read_log(log)) == without_timing(read_log(full / "log.jsonl"))
    a, b = (json.loads((p / "final.json").read_text()) for p in (full, run))
    assert all(a[k] == b[k] for k in ("nmi", "acc", "ari", "epochs", "entropy", "empty")), (a, b)
    assert (run / "assignments.csv").read_text() == (full / "assignments.csv").read_text()
    assert "final: NMI" in straight and "final: NMI" in resumed.stdout


class Clock:
    """A stand-in for a run's state: one tensor that training changes in place."""

    def __init__(self):
        self.w = torch.zeros(3)

    def state(self, epoch):
        return {"epoch": epoch, "w": self.w}


def test_checkpoint_keeps_finished_epochs_only_and_never_goes_back(tmp_path, capsys):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    run, clock = make_run(tmp_path, save_every=10, epochs=20), Clock()
    run.state, path = clock.state, tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir()
    torch.save({"epoch": 5, "w": torch.full((3,), 5.0)}, path)
    run.epoch = run.saved = 5  # resumed from it
    with pytest.raises(SystemExit) as stop, run:
        raise KeyboardInterrupt  # in epoch 6, nothing finished since the checkpoint: keep it
    assert stop.value.code == 130 and torch.load(path, weights_only=True)["epoch"] == 5
    assert f"in epoch 6/20: {path} holds epoch 5" in capsys.readouterr().out

    clock.w += 6  # epoch 6 trains and finishes
    run.snapshot(6)
    assert torch.load(path, weights_only=True)["epoch"] == 5  # not a --save-every epoch: kept in memory
    clock.w += 100  # half of epoch 7 changes the weights in place
    with pytest.raises(SystemExit) as stop, run:
        raise common.Terminated()
    state = torch.load(path, weights_only=True)
    assert stop.value.code == 143 and state["epoch"] == 6 and torch.equal(state["w"], torch.full((3,), 6.0))  # not epoch 7's half

    clock.w -= 100
    run.snapshot(7)
    with pytest.raises(RuntimeError, match="boom"), run:
        raise RuntimeError("boom")  # an error writes the last finished epoch too, then goes on up
    assert torch.load(path, weights_only=True)["epoch"] == 7
    assert "stopped by an error in epoch 8/20" in capsys.readouterr().out
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # put back
    assert sorted(p.name for p in path.parent.iterdir()) == [".lock", "args.json", "checkpoint.pt"]  # no temporary left


def test_a_stop_while_the_finished_epoch_is_copied_keeps_that_epoch(tmp_path, capsys):
    """The signal arrives while the finished epoch's state is taken (as a Ctrl-C sent just after an
    epoch's log line can): it is held back until the copy is whole, so the stop writes that epoch."""
    clock = Clock()

    def state_while_signalled(epoch):
        os.kill(os.getpid(), sig)
        return clock.state(epoch)

    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        run = make_run(tmp_path / sig.name, save_every=10, epochs=20)
        run.state = state_while_signalled
        with pytest.raises(SystemExit) as stop, run:
            run.snapshot(1)
            raise AssertionError("the signal was not delivered after the copy")
        path = run.path / "checkpoint.pt"
        assert stop.value.code == code and torch.load(path, weights_only=True)["epoch"] == 1
        assert f"in epoch 2/20: {path} holds epoch 1" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---------------------------------------------------------------------------------------------
# 2. --eval-only CHECKPOINT alone evaluates as the run did; flags given override the checkpoint's
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script,model_flags", [("cc.py", ["--backbone", "resnet18"]), ("vtcc.py", ["--vit", "tiny", "--stem", "patchify"]),
                                                ("vitic.py", ["--feature-dim", 32]), ("pici.py", ["--vit", "tiny", "--feature-dim", 32]),
                                                ("dcsc.py", ["--overcluster", 12])])
def test_eval_only_uses_the_checkpoints_arguments(tmp_path, image_folder, script, model_flags):
    method = script[:-3]
    run_script(script, "--dataset", image_folder, "--max-images", 64, "--image-size", 32, "--batch-size", 32, "--epochs", 1,
               "--eval-every", 0, "--run-name", "trained", *model_flags, out_dir=tmp_path / "runs", data_root=tmp_path / "data", threads=1)
    trained = tmp_path / "runs" / "trained"
    eval_dir = tmp_path / "eval"
    # nothing but the checkpoint: dataset, data root, 32 px, K and the model flags come from it
    proc = subprocess.run(command(script, "--eval-only", trained / "checkpoint.pt", "--out-dir", eval_dir),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = eval_dir / f"{method}-shapes-seed1-eval"
    assert "evaluating the checkpoint of epoch 1" in proc.stdout and f"files in {out}" in proc.stdout
    a, b = (json.loads((p / "final.json").read_text()) for p in (trained, out))
    assert all(a[k] == b[k] for k in ("nmi", "acc", "ari", "epochs")), (a, b)
    assert (out / "assignments.csv").read_text() == (trained / "assignments.csv").read_text()
    assert not (out / "checkpoint.pt").exists() and not (out / "log.jsonl").exists()

    # a new flat folder of 12 unlabelled images (fewer than --batch-size: no check for evaluation),
    # assigned to the checkpoint's 8 clusters
    new = make_image_folder(tmp_path / "new", classes=3, per_class=4, flat=True, seed=7)
    proc = subprocess.run(command(script, "--eval-only", trained / "checkpoint.pt", "--out-dir", eval_dir, "--dataset", new,
                                  "--run-name", "new"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((eval_dir / "new" / "assignments.csv").open()))
    assert len(rows) == 12 and all(0 <= int(r["cluster"]) < 8 for r in rows)
    assert (eval_dir / "new" / "clusters.png").read_bytes()[:4] == b"\x89PNG"
    used = json.loads((eval_dir / "new" / "args.json").read_text())
    assert used["dataset"] == str(new) and used["image_size"] == 32 and used["num_clusters"] == 8 and used["max_images"] is None
    assert json.loads((eval_dir / "new" / "final.json").read_text())["nmi"] is None


# ---------------------------------------------------------------------------------------------
# 3. A start that fails leaves nothing behind; --resume auto picks the newest folder with a checkpoint
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(SCRIPTS))
def test_a_failed_start_leaves_nothing(tmp_path, capsys, method):
    with pytest.raises(SystemExit) as stop:  # fails in loading the data, after the arguments were fine
        SCRIPTS[method].main(["--dataset", str(tmp_path / "no" / "such" / "folder"), "--out-dir", str(tmp_path / "runs"),
                              "--device", "cpu", "--image-size", "32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: folder"), err
    assert not (tmp_path / "runs").exists()


def test_run_folders_are_numbered_and_resume_auto_tries_the_newest_first(tmp_path):
    out = tmp_path / "runs"
    for name, has_checkpoint in [("cc-shapes-seed1", True), ("cc-shapes-seed1-2", False), ("cc-shapes-seed1-3", True),
                                 ("cc-shapes-seed1-5", False), ("cc-shapes-seed1-x", True)]:
        (out / name).mkdir(parents=True)
        if has_checkpoint:
            (out / name / "checkpoint.pt").write_bytes(b"")
    args = lambda **kw: cc.Args(dataset="some/shapes", out_dir=str(out), **kw)  # noqa: E731
    # oldest first: parse_args tries their checkpoints newest first for --resume auto
    assert common.run_folders(args(), "cc")[1] == [out / n for n in ("cc-shapes-seed1", "cc-shapes-seed1-2",
                                                                     "cc-shapes-seed1-3", "cc-shapes-seed1-5")]
    assert common.run_dir(args(), "cc") == out / "cc-shapes-seed1-6"  # a new run: after the highest number
    assert common.run_dir(args(eval_only="c.pt"), "cc") == out / "cc-shapes-seed1-eval"
    assert common.run_dir(args(resume="auto", seed=2), "cc") == out / "cc-shapes-seed2"  # none yet: a fresh start
    mine = out / "cc-shapes-seed1" / "checkpoint.pt"
    assert common.run_dir(args(resume=str(mine), run_name="cc-shapes-seed1"), "cc") == mine.parent  # its own: fine
    (out / "old.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as stop:
        common.run_dir(args(resume=str(out / "old.pt"), run_name="cc-shapes-seed1"), "cc")  # would overwrite its checkpoint
    assert stop.value.code == 2


# ---------------------------------------------------------------------------------------------
# 4. Unwritable --out-dir, --data-root or cache: one line naming the fix; --cache-dir elsewhere
# ---------------------------------------------------------------------------------------------
def test_unwritable_folders_fail_in_one_line_and_cache_dir_moves_the_cache(tmp_path, capsys, image_folder):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    base = ["--dataset", str(image_folder), "--max-images", "16", "--image-size", "32", "--batch-size", "8", "--epochs", "1",
            "--device", "cpu", "--threads", "1", "--vit", "tiny"]

    def fails(*flags):
        with pytest.raises(SystemExit) as stop:
            vtcc.main([*base, *map(str, flags)])
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
        return err[0]

    assert "pass --out-dir a folder you can write to" in fails("--out-dir", blocker / "runs", "--data-root", tmp_path / "data")
    # the default cache lives in --data-root; here it cannot be made
    assert "pass --cache-dir a folder you can write to" in fails("--out-dir", tmp_path / "runs", "--data-root", blocker / "data")
    assert "pass --cache-dir" in fails("--out-dir", tmp_path / "runs", "--cache-dir", blocker / "cache")
    assert not (tmp_path / "runs").exists()  # nothing was started
    vtcc.main([*base, "--out-dir", str(tmp_path / "runs"), "--data-root", str(blocker / "data"), "--cache-dir", str(tmp_path / "cache")])
    assert len(list((tmp_path / "cache").glob("shapes-*.pt"))) == 1
    assert json.loads((tmp_path / "runs" / "vtcc-shapes-seed1" / "final.json").read_text())["epochs"] == 1


# ---------------------------------------------------------------------------------------------
# 5. One writer per run folder; log.jsonl never holds an epoch twice (also the kill -9 above)
# ---------------------------------------------------------------------------------------------
def test_a_second_process_on_a_run_folder_fails_at_once_and_a_killed_ones_lock_does_not_block(tmp_path, image_folder):
    tiny = ["--dataset", image_folder, "--max-images", 16, "--image-size", 32, "--batch-size", 8, "--vit", "tiny", "--eval-every", 0,
            "--run-name", "one"]
    args = [*tiny, "--out-dir", tmp_path, "--data-root", tmp_path / "data"]
    first = start("vtcc.py", *args, "--epochs", 1000, "--save-every", 1000)
    deadline = time.time() + 300
    while common.lock_holder(tmp_path / "one") != str(first.pid):
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.05)
    second = subprocess.run(command("vtcc.py", *args, "--epochs", 1000, "--resume", "auto"), cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 2 and second.stdout == "", second
    assert second.stderr == f"error: {tmp_path / 'one'} is in use by another process (pid {first.pid}): wait for it to end, or pass another --run-name\n"
    while not read_log(tmp_path / "one" / "log.jsonl"):  # an epoch logged, none saved
        assert first.poll() is None, first.communicate()
        time.sleep(0.05)
    first.kill()
    first.communicate()
    assert not (tmp_path / "one" / "checkpoint.pt").exists() and (tmp_path / "one" / ".lock").exists()
    third = run_script("vtcc.py", *tiny, "--epochs", 1, "--resume", "auto", out_dir=tmp_path, data_root=tmp_path / "data", threads=1)
    assert "no checkpoint in" in third and "final: NMI" in third
    assert [r["epoch"] for r in read_log(tmp_path / "one" / "log.jsonl")] == [1]  # the killed run's epochs are gone


def test_a_started_run_locks_the_folder_and_trims_the_log_to_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("".join(json.dumps({"epoch": e, "loss": e / 10}) + "\n" for e in (1, 2, 3)) + '{"epoch": 4, "lo')
    started = make_run(tmp_path)
    started.epoch = 2  # resumed from a checkpoint of epoch 2
    with started:
        pass
    assert [r["epoch"] for r in read_log(run / "log.jsonl")] == [1, 2]  # epoch 3 and the half line from a kill are gone
    assert json.loads((run / "args.json").read_text())["run_name"] == "run"
    holder = subprocess.run([sys.executable, "-c", "import sys, common; print(common.lock_holder(sys.argv[1]))", str(run)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert holder.stdout.strip() == str(os.getpid()), holder  # another process sees this one's lock


# ---------------------------------------------------------------------------------------------
# 6. --help: each default once, choices once, on/off defaults shown; no abbreviations; not-a-checkpoint
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(SCRIPTS))
def test_help_is_tidy(capsys, method):
    with pytest.raises(SystemExit) as stop:
        SCRIPTS[method].main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    options = re.split(r"\n  (?=--)", text.split("\noptions:\n")[1])[1:]  # one block per flag
    assert "(default: None)" not in text
    for block in options:
        assert block.count("(default:") <= 1, block
        flag = block.split()[0].rstrip(",")
        if block.startswith(f"{flag}, --no-"):
            assert re.search(r"\(default: (on|off)\)", " ".join(block.split())), block  # help text wraps anywhere
    blocks = {block.split()[0].rstrip(","): " ".join(block.split()) for block in options}
    assert "(default: 1)" in blocks["--seed"] and "(default: runs)" in blocks["--out-dir"]
    for block in blocks.values():  # no choice listed twice in a metavar
        metavar = block.split()[1]
        if "|" in metavar:
            assert len(metavar.split("|")) == len(set(metavar.split("|")))
    if method == "pici":
        assert blocks["--ablate"].startswith("--ablate none|pisd|cli|pisd,cli ")


@pytest.mark.parametrize("method", list(SCRIPTS))
def test_abbreviated_flags_are_rejected(tmp_path, capsys, method):
    with pytest.raises(SystemExit) as stop:
        SCRIPTS[method].main(["--epoch", "2", "--out-dir", str(tmp_path)])
    assert stop.value.code == 2 and "unrecognized arguments: --epoch 2" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("content", [b"", b"just some bytes\n", "list"])
def test_a_file_that_is_not_a_checkpoint_gets_a_plain_message(tmp_path, capsys, content):
    path = tmp_path / "checkpoint.pt"
    if content == "list":
        torch.save([torch.ones(2)], path)  # a torch file, but not one of ours
    else:
        path.write_bytes(content)
    for flags in (["--eval-only", str(path)], ["--resume", str(path), "--dataset", "digits", "--image-size", "32", "--backbone", "resnet18"]):
        with pytest.raises(SystemExit) as stop:
            cc.main([*flags, "--out-dir", str(tmp_path / "runs"), "--device", "cpu"])
        err = [line for line in capsys.readouterr().err.strip().splitlines()
               if not line.startswith("warning: digits:")]  # 8 px digits at 32 px: the up-sampling note
        assert stop.value.code == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: not a checkpoint of this project: {path}"), err
        assert "weights_only" not in err[0] and "pickle" not in err[0].lower()
    assert not (tmp_path / "runs").exists()
