"""No host sync in a training step: each script's real step, with the meta device standing in for
CUDA, makes at most 2 host-to-device copies (the batch's indices into the dataset on the device,
and the one packed copy of the augmentation's random parameters) and no device-to-host read.

On CUDA a copy from pageable memory, an .item(), a .tolist() or a nonzero() waits for the GPU's
queue to drain; the meta device has no data, so the same code runs here on the CPU and a
TorchDispatchMode sees every copy and read the step asks for."""
import importlib
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import common
import data

aten = torch.ops.aten
# ops whose result the host must wait for: a value read back, or an output size that depends on the data
READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default, aten.nonzero.default,
         aten.masked_select.default, aten.unique_consecutive.default, aten._unique2.default, aten.unique_dim.default,
         aten.repeat_interleave.Tensor, aten.allclose.default}


class Stop(BaseException):
    """Ends main() after the steps counted (a BaseException: stop_safely lets it through untouched)."""


class Transfers(TorchDispatchMode):
    """Counts host-to-device copies and device-to-host reads of the `device` type. The meta device
    cannot hand back a value, so a read gets a stand-in (zeros) and the run goes on."""

    def __init__(self, device="meta"):
        super().__init__()
        self.device, self.copies, self.reads, self.seen = device, 0, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        on_device = any(t.device.type == self.device for t in tensors)
        if func in READS and on_device:
            self.reads += 1
            self.seen.append(f"read {func}")
            if func is aten._local_scalar_dense.default:
                return 0
            if func is aten.nonzero.default:
                return torch.zeros(0, args[0].dim(), dtype=torch.long, device=args[0].device)
            return func(*[t.to("cpu") if isinstance(t, torch.Tensor) else t for t in args], **kwargs)
        if func is aten._to_copy.default:
            source, target = args[0].device.type, torch.device(kwargs.get("device") or args[0].device).type
            if source == "cpu" and target == self.device:
                self.copies += 1
                self.seen.append(f"copy {tuple(args[0].shape)}")
            elif source == self.device and target == "cpu":
                self.reads += 1
                self.seen.append(f"read {func} {tuple(args[0].shape)}")
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        if func in (aten.copy_.default, aten._copy_from.default):
            target, source = args[0].device.type, args[1].device.type
            if source == "cpu" and target == self.device and args[1].dim() > 0:
                self.copies += 1
                self.seen.append(f"copy {tuple(args[1].shape)}")
            elif source == self.device and target == "cpu":
                self.reads += 1
                self.seen.append(f"read {func}")
                return args[0]
        return func(*args, **kwargs)


def count_steps(monkeypatch, module, argv, steps=2, device="meta"):
    """Run module.main(argv) with `device` standing in for CUDA: the dataset placed on it, and the run
    stopped when the batch after `steps` steps is asked for. Returns each step's (copies, reads, what)."""
    meta = torch.device(device)
    monkeypatch.setattr(common, "pick_device", lambda name, local_rank=None: meta)
    monkeypatch.setattr(common, "place_images", lambda images, choice, env: images.to(env.device))
    created = []  # torch.tensor(..., device=...) copies below the dispatcher's Python key: counted here
    real_tensor = torch.tensor

    def tensor(*args, device=None, **kwargs):
        if device is not None and torch.device(device).type == device_type:
            created.append(1)
        return real_tensor(*args, device=device, **kwargs)

    device_type = meta.type
    monkeypatch.setattr(torch, "tensor", tensor)
    counter = Transfers(device_type)
    marks = []
    real_batches = data.batches

    def batches(*args, **kwargs):
        it = real_batches(*args, **kwargs)
        for n in itertools.count():
            marks.append((counter.copies + len(created), counter.reads, len(counter.seen)))
            if len(marks) > steps:
                raise Stop
            yield next(it)

    monkeypatch.setattr(data, "batches", batches)
    with pytest.raises(Stop), counter:
        module.main(argv)
    return [(b[0] - a[0], b[1] - a[1], counter.seen[a[2]:b[2]]) for a, b in zip(marks, marks[1:])]


SMALL = ["--image-size", "32", "--batch-size", "8", "--max-images", "32", "--epochs", "1", "--eval-every", "0",
         "--threads", "1"]
RUNS = {
    "cc": ["--backbone", "resnet18"],
    "vtcc": ["--vit", "tiny"],
    "vitic": [],
    "dcsc": [],
    "pici-pretrain": ["--vit", "tiny", "--pretrain-epochs", "1", "--train-epochs", "0", "--boost-epochs", "0"],
    "pici-train": ["--vit", "tiny", "--pretrain-epochs", "0", "--train-epochs", "1", "--boost-epochs", "0"],
    "pici-boost": ["--vit", "tiny", "--pretrain-epochs", "0", "--train-epochs", "0", "--boost-epochs", "1"],
}


@pytest.mark.parametrize("run", list(RUNS))
def test_training_step_makes_at_most_two_copies_and_no_reads(run, monkeypatch, tmp_path, image_folder):
    name = run.split("-")[0]
    module = importlib.import_module(name)
    if run == "pici-boost":  # the pseudo-labels come from k-means on the host, at the epoch's start: not the step
        monkeypatch.setattr(module, "cli_targets", lambda model, images, *a, **k: (torch.zeros(2, len(images), dtype=torch.long), 0.0))
    argv = ["--dataset", str(image_folder), *SMALL, *RUNS[run], "--out-dir", str(tmp_path), "--data-root", str(tmp_path / "data")]
    counts = count_steps(monkeypatch, module, argv)
    assert len(counts) == 2
    for copies, reads, seen in counts:
        assert reads == 0 and copies <= 2, (copies, reads, seen)
