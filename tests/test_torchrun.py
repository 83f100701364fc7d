"""A real script under torchrun's environment: two CPU processes (gloo), as `torchrun --nproc-per-node 2
cc.py ...` starts them. Every epoch shows each image exactly once over the processes (so never twice
in a global batch), each process augments with its own stream, and a SIGTERM in the second epoch
then --resume auto under two processes ends exactly as the uninterrupted two-process run."""
import json
import os
import signal
import socket
import sys

import torch
import torch.multiprocessing as mp

import cc
import data


def process(rank, port, record, argv, stop_at):
    """One process of the run, forked from a server that has imported torch and cc once: cc.main with
    data.batches wrapped to record every training batch's indices (with the epoch's call number)
    and, at training step `stop_at`, to send itself SIGTERM, as a cluster scheduler pre-empting the
    job would (both processes at the same step, so no collective is left open)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_WORLD_SIZE="2")
    sys.stdout = sys.stderr = open(f"{record}.out{rank}", "w", buffering=1)
    real, calls, steps = data.batches, [0], [0]
    log = open(f"{record}.rank{rank}", "a", buffering=1)

    def batches(images, labels, batch_size, shuffle=True, *a, **kw):
        call = calls[0]
        calls[0] += 1
        for x, y, idx in real(images, labels, batch_size, shuffle, *a, **kw):
            if shuffle:
                if steps[0] == stop_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                steps[0] += 1
                log.write(json.dumps([call, idx.tolist()]) + "\n")
            yield x, y, idx

    data.batches = batches
    try:
        cc.main(argv)
    finally:
        sys.stdout.flush()


IMAGES, BATCH, EPOCHS = 64, 16, 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp_path, image_folder, name, *extra, stop_at=-1, tag=""):
    """Start the two processes of one run; returns them and the index log's stem."""
    port, record = free_port(), tmp_path / f"{name}{tag}.idx"
    argv = ["--dataset", image_folder, "--max-images", IMAGES, "--image-size", 32, "--batch-size", BATCH, "--epochs", EPOCHS,
            "--backbone", "resnet18", "--eval-every", 0, "--save-every", 10, "--run-name", name, "--out-dir", tmp_path,
            "--data-root", tmp_path / "data", "--device", "cpu", "--threads", 1, *extra]
    # Not forked from this process: autograd cannot be forked once it has run (other tests may have).
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["cc", "data", "test_torchrun"])
    procs = [ctx.Process(target=process, args=(rank, port, record, [str(v) for v in argv], stop_at)) for rank in range(2)]
    for p in procs:
        p.start()
    return procs, record


def finish(procs, record, codes=(0, 0)):
    for p in procs:
        p.join(timeout=300)
    outs = [open(f"{record}.out{rank}").read() for rank in range(2)]
    assert tuple(p.exitcode for p in procs) == codes, "\n".join(o[-3000:] for o in outs)
    return outs[0]


def batches(record):
    """{rank: [(epoch call, indices), ...]} from the processes' index logs."""
    return {r: [json.loads(line) for line in open(f"{record}.rank{r}")] for r in range(2)}


def losses(run):
    return [{k: v for k, v in json.loads(line).items() if k == "epoch" or k.startswith("loss")}
            for line in (run / "log.jsonl").read_text().splitlines()]


def test_two_processes_share_each_epoch_and_resume_exactly(tmp_path, image_folder):
    full, full_record = start(tmp_path, image_folder, "full")
    part, part_record = start(tmp_path, image_folder, "part", stop_at=IMAGES // BATCH + 1)  # step 2 of epoch 2
    out = finish(full, full_record)
    assert "world 2" in out
    stopped = finish(part, part_record, codes=(143, 143))
    assert "stopped by SIGTERM in epoch 2/2" in stopped and "holds epoch 1" in stopped

    seen = batches(full_record)
    steps = IMAGES // BATCH
    assert len(seen[0]) == len(seen[1]) == EPOCHS * steps
    for epoch in range(EPOCHS):
        shown = sorted(i for r in range(2) for call, idx in seen[r] if call == epoch for i in idx)
        assert shown == list(range(IMAGES))  # every image once per epoch, none twice in a global batch
        assert all(len(idx) == BATCH // 2 for r in range(2) for _, idx in seen[r])

    state = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and not [k for k in state if "gen" in k or "rng" in k]  # streams per epoch: none kept

    resumed, record = start(tmp_path, image_folder, "part", "--resume", "auto", tag="-resumed")
    assert "resumed from epoch 1" in finish(resumed, record)
    assert losses(tmp_path / "part") == losses(tmp_path / "full") and len(losses(tmp_path / "full")) == EPOCHS
    a, b = (json.loads((tmp_path / n / "final.json").read_text()) for n in ("full", "part"))
    assert all(a[k] == b[k] for k in ("nmi", "acc", "ari"))
    assert (tmp_path / "full" / "assignments.csv").read_text() == (tmp_path / "part" / "assignments.csv").read_text()
    again = batches(record)  # the resumed epoch 2 shows the images in the uninterrupted run's order
    assert [idx for r in range(2) for _, idx in again[r]] == [idx for r in range(2) for _, idx in seen[r][steps:]]
