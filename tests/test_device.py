"""The CUDA paths of common.py and data.batches, checked on the CPU: a patched torch.cuda stands in for
a GPU (device choice, memory, bf16 support), fake CUDA tensors (FakeTensorMode) for placement and copies."""
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import common
import data
from conftest import make_run

# FakeTensorMode makes CUDA tensors without a GPU only from torch 2.10 on (before: "no NVIDIA driver"):
# a limit of these tests, not of the code they test
FAKE_CUDA = pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 10),
                               reason="FakeTensorMode CUDA tensors need torch 2.10")


@pytest.fixture
def gpu(monkeypatch):
    """A patched torch.cuda: `gpu(count=, current=, capability=, free=)` makes CUDA look present.
    Returns the devices passed to set_device. Global flags an Env sets are put back afterwards."""
    calls = []

    def make(count=1, current=0, capability=(9, 0), free=80 << 30):
        native = capability >= (8, 0)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (free, 2 * free))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
        return calls

    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
             torch.backends.cuda.cudnn_sdp_enabled(), torch.get_num_threads())
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield make
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark) = flags[:3]
    torch.use_deterministic_algorithms(flags[3], warn_only=flags[4])
    torch.backends.cuda.enable_flash_sdp(flags[5])
    torch.backends.cuda.enable_mem_efficient_sdp(flags[6])
    torch.backends.cuda.enable_cudnn_sdp(flags[7])
    torch.set_num_threads(flags[8])


def args(**kw):
    base = dict(batch_size=8, epochs=1, num_clusters=None, image_size=32, device="auto", precision="auto", threads=0,
                deterministic=False, seed=1, eval_only=None, resume=None, out_dir="runs", run_name=None, dataset="digits",
                tensorboard=False)
    return SimpleNamespace(**{**base, **kw})


def fails(capsys, fn, *a, **kw):
    """fn(...) ends with one `error:` line (exit code 2); returns that line."""
    with pytest.raises(SystemExit) as e:
        fn(*a, **kw)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


# --- device ------------------------------------------------------------------------------------------
def test_auto_and_cuda_resolve_to_an_indexed_device(gpu, capsys):
    calls = gpu(count=2, current=1)
    assert common.pick_device("auto") == torch.device("cuda", 1)  # the current device, with its index
    assert common.pick_device("cuda") == torch.device("cuda", 1)
    assert common.pick_device("cuda", local_rank=0) == torch.device("cuda", 0)  # LOCAL_RANK's under torchrun
    assert common.pick_device("cuda:0") == torch.device("cuda", 0)
    assert all(d.index is not None for d in calls)  # set_device needs an index
    assert "cuda:5 does not exist" in fails(capsys, common.pick_device, "cuda:5")


def test_no_cuda_is_one_error_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.pick_device("auto") == torch.device("cpu")
    assert "use --device cpu" in fails(capsys, common.pick_device, "cuda")
    assert "unknown --device" in fails(capsys, common.pick_device, "gpu0")


@FAKE_CUDA
def test_batches_of_a_dataset_on_the_gpu_are_not_pinned(monkeypatch):
    """The dataset kept on cuda:0 with the device given as `cuda`: the same device, nothing to pin;
    a CPU dataset for the GPU is pinned, then copied without blocking."""
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self.device) or self)
    with FakeTensorMode(allow_non_fake_inputs=True):
        on_gpu = torch.zeros(8, 3, 4, 4, dtype=torch.uint8, device="cuda")
        for device in ("cuda", torch.device("cuda", 0)):
            got = list(data.batches(on_gpu, None, 4, generator=torch.Generator().manual_seed(0), device=device))
            assert len(got) == 2 and all(x.device == torch.device("cuda", 0) and i.device.type == "cpu" for x, _, i in got)
        assert pinned == []
        on_cpu = torch.zeros(8, 3, 4, 4, dtype=torch.uint8)
        got = list(data.batches(on_cpu, None, 4, generator=torch.Generator().manual_seed(0), device=torch.device("cuda", 0)))
        assert pinned == [torch.device("cpu")] * 2 and got[0][0].device.type == "cuda"


@FAKE_CUDA
def test_place_images_keeps_the_dataset_on_the_gpu_when_it_fits(gpu):
    env = SimpleNamespace(device=torch.device("cuda", 0))
    with FakeTensorMode(allow_non_fake_inputs=True):
        images = torch.zeros(64, 3, 8, 8, dtype=torch.uint8)
        gpu(free=100 * images.numel())
        assert data.place_images(images, "auto", env).device == torch.device("cuda", 0)
        assert data.place_images(images, "no", env) is images
        gpu(free=2 * images.numel())  # more than a quarter of the free memory: stays on the CPU
        assert data.place_images(images, "auto", env) is images
        assert data.place_images(images, "yes", env).device.type == "cuda"


class HostReads(TorchDispatchMode):
    """Counts copies from a GPU tensor to the host."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if args and getattr(args[0], "device", None) == torch.device("cuda", 0) and kwargs.get("device") == torch.device("cpu"):
            self.reads += 1
        return func(*args, **kwargs)


@FAKE_CUDA
def test_predict_reads_the_device_once_not_per_batch():
    env = SimpleNamespace(device=torch.device("cuda", 0), autocast=lambda: torch.autocast("cpu", enabled=False))
    with FakeTensorMode(allow_non_fake_inputs=True):
        images = torch.zeros(10, 3, 4, 4, dtype=torch.uint8, device="cuda")
        with HostReads() as count:
            out = common.predict(lambda x: {"p": x.mean(dim=(2, 3))}, images, lambda x: x.float(), env, batch_size=3)
    assert out["p"].shape == (10, 3) and out["p"].device.type == "cpu"
    assert count.reads == 1  # one copy of the whole result; 4 batches read one by one before


# --- precision -----------------------------------------------------------------------------------------
def test_precision_on_native_and_emulated_bf16(gpu, capsys):
    gpu(capability=(9, 0))
    cuda = torch.device("cuda", 0)
    assert common.pick_precision("auto", cuda) is torch.bfloat16
    gpu(capability=(7, 0))  # V100, T4: bf16 only emulated
    assert common.pick_precision("auto", cuda) is torch.float16
    assert "only emulates bf16" in fails(capsys, common.pick_precision, "bf16", cuda)
    assert common.pick_precision("auto", torch.device("cpu")) is None
    assert common.pick_precision("bf16", torch.device("cpu")) is torch.bfloat16
    assert "needs CUDA" in fails(capsys, common.pick_precision, "fp16", torch.device("cpu"))


def test_env_fp32_turns_tf32_off_and_deterministic_is_strict_on_cuda(gpu):
    gpu()
    env = common.Run(args(precision="fp32", deterministic=True), "cc")
    assert env.device == torch.device("cuda", 0) and env.dtype is None
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert not (torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()
                or torch.backends.cuda.cudnn_sdp_enabled())  # the math attention: a deterministic backward
    assert not torch.backends.cudnn.benchmark
    env = common.Run(args(precision="auto"), "cc")
    assert env.precision == "bf16" and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark


def test_an_op_without_a_deterministic_kernel_is_one_error_line(tmp_path, capsys):
    run = make_run(tmp_path)
    err = RuntimeError("scatter_add_cuda_kernel does not have a deterministic implementation, but you set "
                       "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for this operation ...")
    with pytest.raises(SystemExit) as e, run:
        raise err
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and lines == ["error: --deterministic: scatter_add_cuda_kernel has no deterministic CUDA kernel "
                                           "in this PyTorch; run without --deterministic"]


def test_the_process_group_gets_a_long_timeout(monkeypatch, gpu):
    """Rank 0 evaluates and runs k-means alone while the others wait in a collective: NCCL's 10
    minutes would end a run on a large dataset."""
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    monkeypatch.setattr(common.atexit, "register", lambda fn: None)
    gpu(count=2)
    env = common.Run(args(), "cc")
    assert env.device == torch.device("cuda", 1) and seen["backend"] == "nccl"
    assert seen["timeout"].total_seconds() >= 3600


# --- checkpoints between devices --------------------------------------------------------------------------
class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def trained(channels_last, fused):
    """A model and Adam after two steps, laid out as on CUDA (channels_last, fused) or on the CPU."""
    model = Conv()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        opt.zero_grad()
        model(x.contiguous(memory_format=torch.channels_last) if channels_last else x).square().mean().backward()
        opt.step()
    return model, opt, x


def into(model, opt, scaler=None):
    """What common.restore loads a checkpoint into (a run's parts)."""
    return SimpleNamespace(model=model, optimizer=opt, scaler=scaler or torch.amp.GradScaler("cpu", enabled=False))


def resumed_step(state, channels_last, fused):
    """Resume `state` into a model and optimiser built for the device at hand; one more step."""
    model = Conv()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    common.restore(into(model, opt), state)
    return model, opt


def checkpoint(model, opt):
    return {"epoch": 3, "model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": {}}


def test_a_cuda_checkpoint_resumes_exactly_on_the_cpu():
    """Written by a CUDA run (channels_last weights and moments, fused Adam), resumed by a CPU run
    (contiguous, not fused): the next step is the one the CPU run makes from the same numbers."""
    model, opt, x = trained(channels_last=True, fused=True)
    cuda_state = checkpoint(model, opt)
    assert cuda_state["optimizer"]["param_groups"][0]["fused"]
    # the same numbers as a CPU run would have saved them: contiguous moments, no fused flag
    plain = {**cuda_state, "optimizer": {"state": {k: {n: t.contiguous() for n, t in s.items()}
                                                   for k, s in cuda_state["optimizer"]["state"].items()},
                                         "param_groups": [{**g, "fused": None} for g in cuda_state["optimizer"]["param_groups"]]}}
    results = []
    for state in (cuda_state, plain):
        m, o = resumed_step(state, channels_last=False, fused=None)
        assert not o.param_groups[0]["fused"]  # the optimiser built for the CPU
        for p in m.parameters():
            assert all(t.stride() == p.stride() for k, t in o.state[p].items() if k != "step")
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
        results.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_a_cpu_checkpoint_takes_the_gpu_layout():
    """The reverse: a CPU checkpoint into channels_last weights and a fused Adam, as a CUDA run
    builds them: moments in the weights' layout, fused kept, the step count on the weights' device."""
    model, opt, _ = trained(channels_last=False, fused=None)
    m, o = resumed_step(checkpoint(model, opt), channels_last=True, fused=True)
    assert o.param_groups[0]["fused"]
    conv = m.conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert o.state[conv]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(o.state[conv]["exp_avg"], opt.state[model.conv.weight]["exp_avg"])
    assert o.state[conv]["step"].dtype == torch.float32 and o.state[conv]["step"].device == conv.device


def test_fp16_after_a_bf16_or_fp32_run_starts_a_fresh_scaler():
    model, opt, _ = trained(channels_last=False, fused=None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)  # enabled: an fp16 run
    assert common.restore(into(Conv(), torch.optim.Adam(Conv().parameters()), scaler), checkpoint(model, opt)) == 3
    assert scaler.get_scale() == 2.0 ** 16


def test_each_epoch_and_process_draws_its_own_stream_so_a_checkpoint_needs_none():
    """common.generator(seed, epoch, rank): a resumed epoch draws what the uninterrupted run drew."""
    draw = lambda *keys: torch.rand(4, generator=common.generator(*keys))  # noqa: E731
    assert torch.equal(draw(1, 2, 0), draw(1, 2, 0))
    seen = [draw(*keys) for keys in ((1, 2, 0), (1, 2, 1), (1, 3, 0), (2, 2, 0), (1, 0, 0), (0, 1, 2))]
    assert all(not torch.equal(a, b) for i, a in enumerate(seen) for b in seen[i + 1:])
    model, opt, _ = trained(channels_last=False, fused=None)
    assert common.restore(into(Conv(), torch.optim.Adam(Conv().parameters())), checkpoint(model, opt)) == 3


# --- evaluation reads the dataset where it was placed ---------------------------------------------------------
@pytest.mark.parametrize("method", ["cc", "vitic"])
def test_evaluation_reads_the_placed_dataset(tmp_path, image_folder, monkeypatch, method):
    """On a GPU the dataset is placed once (data.place_images); evaluation must read that copy,
    not upload ds.images again. Here the placed copy is marked, and every predict call must get it."""
    import importlib

    from conftest import in_process

    placed, given = [], []
    real_place, real_predict = data.place_images, common.predict

    def place(images, choice, run):
        placed.append(real_place(images, choice, run).clone())
        return placed[-1]

    def predict(fn, images, *a, **kw):
        given.append(images)
        return real_predict(fn, images, *a, **kw)

    monkeypatch.setattr(data, "place_images", place)
    monkeypatch.setattr(common, "predict", predict)
    in_process(importlib.import_module(method), "--dataset", image_folder, "--max-images", 32, "--image-size", 32, "--batch-size", 16,
               "--epochs", 2, "--eval-every", 1, "--run-name", "run", *(["--backbone", "resnet18"] if method == "cc" else ["--feature-dim", 16]),
               out_dir=tmp_path, data_root=tmp_path / "data")
    assert len(placed) == 1 and len(given) >= 2  # mid-run and final evaluation
    assert all(g.data_ptr() == placed[0].data_ptr() and len(g) == 32 for g in given)
