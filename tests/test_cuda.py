"""The CUDA tier: the scripts on a GPU, as a user runs them. Skipped where no GPU is present (the
CPU suite checks the CUDA branches with stand-ins: tests/test_device.py). Run it on a GPU machine:

    python -m pytest -q tests/test_cuda.py

Each script trains 2 epochs at 64 px with the defaults (bf16 autocast where the GPU has it natively,
the dataset kept on the GPU); --compile for one ResNet and one ViT method; --precision fp32
--deterministic twice with identical logs; checkpoints moved between the GPU and the CPU; torchrun
on 2 GPUs where there are 2; and the pipeline benchmark at 224 px.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA tier needs a GPU")

SMALL = {"cc.py": ["--backbone", "resnet18"], "vtcc.py": [], "vitic.py": [], "pici.py": [], "dcsc.py": []}
PICI_STAGES = ["--pretrain-epochs", 0, "--train-epochs", 1, "--boost-epochs", 1]  # the boosting stage too


def run(script, *args, tmp_path, name, device=None, timeout=1200, launcher=()):
    """`python <script>` (or `torchrun ... <script>`) on the test images; returns (stdout, run folder)."""
    cmd = [sys.executable, *launcher, str(ROOT / script), "--max-images", 256, "--image-size", 64, "--batch-size", 64,
           "--run-name", name, "--out-dir", tmp_path, "--data-root", tmp_path / "data",
           *(["--device", device] if device else []), *(PICI_STAGES if script == "pici.py" and "--epochs" in args else []), *args]
    cmd = [str(c) for c in cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc.stdout, tmp_path / name


def losses(run_path):
    return [{k: v for k, v in json.loads(line).items() if k == "epoch" or k.startswith("loss")}
            for line in (run_path / "log.jsonl").read_text().splitlines()]


def final(run_path):
    return json.loads((run_path / "final.json").read_text())


@pytest.mark.parametrize("script", list(SMALL))
def test_two_epochs_with_the_defaults(tmp_path, image_folder, script):
    out, path = run(script, "--dataset", image_folder, "--epochs", 2, "--eval-every", 1, *SMALL[script], tmp_path=tmp_path, name="gpu")
    result = final(path)
    assert result["device"].startswith("cuda:")
    assert result["precision"] == ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16")
    assert all(math.isfinite(r["loss"]) for r in map(json.loads, (path / "log.jsonl").read_text().splitlines()))
    assert 0 <= result["nmi"] <= 1


@pytest.mark.parametrize("script", ["cc.py", "vtcc.py"])
def test_compile(tmp_path, image_folder, script):
    _, path = run(script, "--dataset", image_folder, "--epochs", 2, "--compile", *SMALL[script], tmp_path=tmp_path, name="compiled")
    assert final(path)["epochs"] == 2


@pytest.mark.parametrize("script", ["cc.py", "vtcc.py"])
def test_fp32_deterministic_runs_are_identical(tmp_path, image_folder, script):
    flags = ["--dataset", image_folder, "--epochs", 2, "--precision", "fp32", "--deterministic", *SMALL[script]]
    _, a = run(script, *flags, tmp_path=tmp_path, name="a")
    _, b = run(script, *flags, tmp_path=tmp_path, name="b")
    assert losses(a) == losses(b)
    assert (a / "assignments.csv").read_text() == (b / "assignments.csv").read_text()


def test_a_cuda_checkpoint_resumes_and_evaluates_on_the_cpu(tmp_path, image_folder):
    """Written on the GPU (channels_last, fused Adam), resumed on the CPU: the CPU run goes on as it
    does from the same numbers laid out as a CPU run saves them; and the reverse direction runs."""
    flags = ["--dataset", image_folder, "--backbone", "resnet18", "--eval-every", 0, "--precision", "fp32"]
    _, gpu = run("cc.py", *flags, "--epochs", 1, tmp_path=tmp_path, name="gpu", device="cuda")
    state = torch.load(gpu / "checkpoint.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["fused"]
    plain = dict(state, optimizer={"state": {k: {n: t.contiguous() for n, t in s.items()} for k, s in state["optimizer"]["state"].items()},
                                   "param_groups": [dict(g, fused=None) for g in state["optimizer"]["param_groups"]]})
    (tmp_path / "plain").mkdir()
    torch.save(plain, tmp_path / "plain" / "checkpoint.pt")
    (tmp_path / "moved").mkdir()
    torch.save(state, tmp_path / "moved" / "checkpoint.pt")
    _, moved = run("cc.py", *flags, "--epochs", 2, "--resume", tmp_path / "moved" / "checkpoint.pt", tmp_path=tmp_path, name="moved-run",
                   device="cpu")
    _, ref = run("cc.py", *flags, "--epochs", 2, "--resume", tmp_path / "plain" / "checkpoint.pt", tmp_path=tmp_path, name="plain-run",
                 device="cpu")
    assert losses(moved) == losses(ref)
    run("cc.py", "--eval-only", gpu / "checkpoint.pt", tmp_path=tmp_path, name="eval-cpu", device="cpu")
    _, cpu = run("cc.py", *flags, "--epochs", 1, tmp_path=tmp_path, name="cpu", device="cpu")
    _, back = run("cc.py", *flags, "--epochs", 2, "--resume", cpu / "checkpoint.pt", tmp_path=tmp_path, name="back", device="cuda")
    assert final(back)["epochs"] == 2


@pytest.mark.skipif(not torch.cuda.is_available() or not torch.cuda.is_bf16_supported(including_emulation=False),
                    reason="bf16 needs a GPU with native bf16 (compute capability 8.0 on)")
def test_fp16_resumes_a_bf16_checkpoint(tmp_path, image_folder):
    flags = ["--dataset", image_folder, "--backbone", "resnet18", "--eval-every", 0]
    _, first = run("cc.py", *flags, "--epochs", 1, "--precision", "bf16", tmp_path=tmp_path, name="bf16")
    assert final(first)["precision"] == "bf16"
    _, second = run("cc.py", *flags, "--epochs", 2, "--precision", "fp16", "--resume", first / "checkpoint.pt", tmp_path=tmp_path,
                    name="fp16")
    assert final(second)["precision"] == "fp16" and final(second)["epochs"] == 2
    assert all(math.isfinite(r["loss"]) for r in map(json.loads, (second / "log.jsonl").read_text().splitlines()))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="torchrun on 2 GPUs needs 2")
@pytest.mark.parametrize("script", ["cc.py", "vtcc.py"])
def test_torchrun_on_two_gpus(tmp_path, image_folder, script):
    out, path = run(script, "--dataset", image_folder, "--epochs", 2, "--eval-every", 1, *SMALL[script], tmp_path=tmp_path, name="ddp",
                    launcher=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"))
    assert "world 2" in out and final(path)["epochs"] == 2


def test_bench_pipeline_at_224_px(image_folder, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_pipeline

    rows = bench_pipeline.main(["--methods", "cc", "vtcc", "--dataset", str(image_folder), "--max-images", "256", "--epochs", "2",
                                "--device", "cuda", "--data-root", str(tmp_path)])
    out = capsys.readouterr().out
    assert "pipeline efficiency | device cuda:" in out and "| 224 px |" in out
    assert all(loop > 0 and model > 0 and math.isfinite(ratio) for _, loop, model, ratio in rows)
