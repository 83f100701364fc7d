"""--recipe authors trains in fp32, the authors' precision, unless --precision is given; the paper
recipe keeps auto (bf16 on a GPU with native bf16). Checked on the CPU with a patched torch.cuda."""
import dataclasses
import importlib

import pytest
import torch

import common

SCRIPTS = ["cc", "vtcc", "vitic", "pici", "dcsc"]


@pytest.fixture
def h100(monkeypatch):
    """torch.cuda patched to look like one GPU with native bf16; the global flags a Run sets put back."""
    for name, value in [("is_available", lambda: True), ("device_count", lambda: 1), ("current_device", lambda: 0),
                        ("set_device", lambda d: None), ("get_device_capability", lambda d=None: (9, 0)),
                        ("is_bf16_supported", lambda including_emulation=True: True)]:
        monkeypatch.setattr(torch.cuda, name, value)
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = flags


def env_for(script, argv):
    args = common.parse_args(importlib.import_module(script).Args, ["--epochs", "3", *argv], method=script)  # pici: no default
    return common.Run(args, script), args


@pytest.mark.parametrize("script", SCRIPTS)
def test_authors_recipe_trains_in_fp32_unless_precision_is_given(h100, script):
    env, args = env_for(script, ["--recipe", "authors"])
    assert env.device.type == "cuda" and env.dtype is None and env.precision == "fp32" and args.precision == "fp32"
    assert not torch.backends.cuda.matmul.allow_tf32  # fp32 as the authors ran it: no TF32 rounding either
    env, args = env_for(script, [])  # the paper recipe: auto, bf16 on this GPU
    assert env.dtype is torch.bfloat16 and args.precision == "auto"
    for given, dtype in [("bf16", torch.bfloat16), ("auto", torch.bfloat16), ("fp16", torch.float16)]:
        assert env_for(script, ["--recipe", "authors", "--precision", given])[0].dtype is dtype


def test_a_resumed_authors_run_keeps_fp32(h100, tmp_path):
    import vitic
    trained = vitic.Args(recipe="authors", epochs=1)
    common.Run(trained, "vitic")  # what a run records: the precision it chose
    assert trained.precision == "fp32"
    path = tmp_path / "checkpoint.pt"
    torch.save({"method": "vitic", "epoch": 1, "model": {}, "args": dataclasses.asdict(trained)}, path)
    env, args = env_for("vitic", ["--resume", str(path), "--epochs", "2"])
    assert args.recipe == "authors" and env.precision == "fp32"
    assert env_for("vitic", ["--resume", str(path), "--epochs", "2", "--precision", "bf16"])[0].precision == "bf16"
