"""No host sync in a training step: each script's real step, with the meta device standing in for
CUDA, makes at most 2 host-to-device copies (the epoch's order of the dataset on the device, at its
first step, and the one packed copy of the augmentation's random parameters), each from pinned
memory without blocking, and no device-to-host read.

On CUDA a copy from pageable memory or one not asked to be non-blocking, an .item(), a .tolist() or
a nonzero() waits for the GPU's queue to drain; pinned memory is made here as ordinary memory and
remembered (a CPU-only torch cannot pin); the meta device has no data, so the same code runs here on the CPU and a
TorchDispatchMode sees every copy and read the step asks for. benchmarks/bench_data.py --count
prints the same counts (and the kernels per step) with count_steps."""
import contextlib
import importlib
import itertools
import re
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import common
import data
from conftest import ROOT

aten = torch.ops.aten
# ops whose result the host must wait for: a value read back, or an output size that depends on the data
READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default, aten.nonzero.default,
         aten.masked_select.default, aten.unique_consecutive.default, aten._unique2.default, aten.unique_dim.default,
         aten.repeat_interleave.Tensor, aten.allclose.default}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class Stop(BaseException):
    """Ends main() after the steps counted (a BaseException: `with run:` lets it through untouched)."""


class DeviceCounter(TorchDispatchMode):
    """Counts what the host asks of the `device` type: host-to-device copies (and which of them block:
    not non_blocking, or from memory that was not pinned), device-to-host reads, and kernels (aten ops on the device but views and allocations) by phase (set from outside). The
    meta device cannot hand back a value, so a read gets a stand-in (zeros) and the run goes on."""

    def __init__(self, device="meta"):
        super().__init__()
        self.device, self.phase = device, "setup"
        self.copies, self.reads, self.kernels, self.seen = 0, 0, Counter(), []
        self.blocking, self.batchnorms, self.pinned = 0, 0, {}  # pinned: storage address -> storage, kept alive so no address is reused

    def pin(self, t):
        self.pinned[t.untyped_storage().data_ptr()] = t.untyped_storage()
        return t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._pin_memory.default:  # Tensor.pin_memory(): a copy, in memory remembered as pinned
            return self.pin(args[0].clone())
        if func is aten.is_pinned.default:
            return args[0].untyped_storage().data_ptr() in self.pinned
        if kwargs.get("pin_memory"):  # torch.empty(..., pin_memory=True) and the like
            return self.pin(func(*args, **{**kwargs, "pin_memory": False}))
        tensors = [a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)]
        on_device = any(t.device.type == self.device for t in tensors)
        if func in READS and on_device:
            self.reads += 1
            self.seen.append(f"read {func}")
            if func is aten._local_scalar_dense.default:
                return 0
            if func is aten.nonzero.default:
                return torch.zeros(0, args[0].dim(), dtype=torch.long, device=args[0].device)
            return func(*[t.to("cpu") if isinstance(t, torch.Tensor) else t for t in args], **kwargs)
        masks = [i for i in (args[1] if func in INDEXING and len(args) > 1 else []) if isinstance(i, torch.Tensor)
                 and i.dtype in (torch.bool, torch.uint8) and i.device.type == self.device]
        if func in INDEXING and on_device and len(args) > 1:  # a CPU index moved over by the indexing op itself
            for i in args[1]:
                if isinstance(i, torch.Tensor) and i.device.type == "cpu":
                    self.copy(None, i)
        if masks:  # a boolean mask on the device: the output's size is its nonzero count
            self.reads += 1
            self.seen.append(f"read {func} (boolean mask)")
            if func is aten.index.Tensor:
                return torch.zeros(0, *args[0].shape[masks[0].dim():], dtype=args[0].dtype, device=args[0].device)
            return args[0]
        if func is aten._to_copy.default:
            source, target = args[0].device.type, torch.device(kwargs.get("device") or args[0].device).type
            if source == "cpu" and target == self.device:
                return self.copy(func(*args, **kwargs), args[0], kwargs.get("non_blocking", False))
            if source == self.device and target == "cpu":
                self.reads += 1
                self.seen.append(f"read {func} {tuple(args[0].shape)}")
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        if func in (aten.copy_.default, aten._copy_from.default) and args[0].device != args[1].device:
            if args[0].device.type == self.device and args[1].dim() > 0:
                return self.copy(func(*args, **kwargs), args[1], args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
            if args[1].device.type == self.device:
                self.reads += 1
                self.seen.append(f"read {func}")
                return args[0]
        out = func(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else [out]
        on_device = on_device or any(isinstance(t, torch.Tensor) and t.device.type == self.device for t in outs)
        if on_device and not func.is_view and not func.__name__.startswith(("empty", "_unsafe_view", "lift_fresh")):
            self.kernels[self.phase] += 1
        return out

    def copy(self, out, source, non_blocking=False):
        """A host-to-device copy; it blocks unless non-blocking from pinned memory (an index moved over by
        the indexing op itself, out=None, is neither)."""
        self.copies += 1
        pinned = source.untyped_storage().data_ptr() in self.pinned
        self.seen.append(f"copy {tuple(source.shape)} in {self.phase}" + ("" if non_blocking and pinned else
                         f", blocking ({'non_blocking' if non_blocking else 'not non_blocking'}, {'pinned' if pinned else 'pageable'})"))
        self.blocking += not (non_blocking and pinned)
        return out

    def count(self, n=1):
        """torch.tensor(..., device=...) copies below the dispatcher's Python key, counted from outside
        (they read pageable memory: blocking)."""
        self.copies += n
        self.blocking += n
        self.seen.append(f"copy torch.tensor in {self.phase}, blocking")


@contextlib.contextmanager
def patched(*changes):
    """(object, attribute, value) set for the block, then put back."""
    old = [(obj, name, getattr(obj, name)) for obj, name, _ in changes]
    for obj, name, value in changes:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in old:
            setattr(obj, name, value)


def count_steps(module, argv, steps=2, device="meta"):
    """Run module.main(argv) with `device` standing in for CUDA (the dataset placed on it) until the
    batch after `steps` steps is asked for. Returns one dict per step: copies, reads, kernels by
    phase (batch, augmentation, model, optimizer) and what was copied or read."""
    meta = torch.device(device)
    counter = DeviceCounter(meta.type)
    marks = []
    real_tensor, real_batches, real_views = torch.tensor, data.batches, data.Augmentation.views
    real_bn = torch.nn.modules.batchnorm._BatchNorm.forward
    real_steps = {cls: cls.step for cls in (torch.optim.Adam, torch.optim.SGD)}

    def tensor(*args, device=None, **kwargs):
        if device is not None and torch.device(device).type == meta.type:
            counter.count()
        return real_tensor(*args, device=device, **kwargs)

    def batches(*args, **kwargs):
        it = real_batches(*args, **kwargs)
        for _ in itertools.count():
            marks.append((counter.copies, counter.reads, counter.kernels.copy(), len(counter.seen), counter.blocking, counter.batchnorms))
            if len(marks) > steps:
                raise Stop
            counter.phase = "batch"
            x = next(it)
            counter.phase = "model"
            yield x

    def bn(self, x):  # each a SyncBatchNorm under torchrun on CUDA: a host wait (see the README)
        counter.batchnorms += 1
        return real_bn(self, x)

    def in_phase(name, fn):
        def run(*args, **kwargs):
            before, counter.phase = counter.phase, name
            try:
                return fn(*args, **kwargs)
            finally:
                counter.phase = before
        return run

    changes = [(common, "pick_device", lambda name, local_rank=None: meta),
               (data, "place_images", lambda images, choice, env: images.to(env.device)),
               (torch, "tensor", tensor), (data, "batches", batches), (torch.nn.modules.batchnorm._BatchNorm, "forward", bn),
               (data.Augmentation, "views", in_phase("augmentation", real_views)),
               *[(cls, "step", in_phase("optimizer", fn)) for cls, fn in real_steps.items()],
               *([(torch, "autocast", lambda *a, **k: contextlib.nullcontext())] if meta.type == "meta" else [])]  # no autocast on meta
    with patched(*changes), counter:
        try:
            module.main(argv)
        except Stop:
            pass
    return [dict(copies=b[0] - a[0], reads=b[1] - a[1], kernels=b[2] - a[2], seen=counter.seen[a[3]:b[3]], blocking=b[4] - a[4],
                 batchnorms=b[5] - a[5])
            for a, b in zip(marks, marks[1:])]


SMALL = ["--image-size", "32", "--batch-size", "8", "--max-images", "32", "--epochs", "1", "--eval-every", "0",
         "--threads", "1"]
RUNS = {
    "cc": [],
    "vtcc": ["--vit", "tiny"],
    "vitic": [],
    "dcsc": [],
    "pici-pretrain": ["--vit", "tiny", "--pretrain-epochs", "1", "--train-epochs", "0", "--boost-epochs", "0"],
    "pici-train": ["--vit", "tiny", "--pretrain-epochs", "0", "--train-epochs", "1", "--boost-epochs", "0"],
    "pici-boost": ["--vit", "tiny", "--pretrain-epochs", "0", "--train-epochs", "0", "--boost-epochs", "1"],
}


@pytest.mark.parametrize("run", list(RUNS))
def test_training_step_makes_at_most_two_non_blocking_copies_and_no_reads(run, monkeypatch, tmp_path, image_folder):
    name = run.split("-")[0]
    module = importlib.import_module(name)
    if run == "pici-boost":  # the pseudo-labels come from k-means on the host, at the epoch's start: not the step
        monkeypatch.setattr(module, "cli_targets", lambda model, images, *a, **k: (torch.zeros(2, len(images), dtype=torch.long), 0.0))
    argv = ["--dataset", str(image_folder), *SMALL, *RUNS[run], "--out-dir", str(tmp_path), "--data-root", str(tmp_path / "data")]
    counts = count_steps(module, argv)
    assert len(counts) == 2
    for step in counts:
        assert step["reads"] == 0 and step["copies"] <= 2, f"{step['copies']} copies, {step['reads']} reads: {step['seen']}"
        assert step["blocking"] == 0, f"a host-to-device copy that waits for the GPU: {step['seen']}"
        assert step["kernels"]["augmentation"] > 0 and step["kernels"]["model"] > 0  # the counter sees the step
        assert step["batchnorms"] == readme_batchnorms()[name], "the README's SyncBatchNorm table is out of date"


def readme_batchnorms():
    """The README's SyncBatchNorm table: BatchNorm layer calls per step (host waits under torchrun), per script."""
    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)\.py` \| (\d+) \|", text[text.index("SyncBatchNorm's cost"):], re.M)
    return {script: int(n) for script, n in rows}


def test_counter_sees_every_kind_of_sync():
    """The counter the test above relies on: each way of waiting for the device is counted."""
    x = torch.zeros(4, 3, device="meta")
    with DeviceCounter() as c:
        x.sum().item()
        x.tolist()
        x.nonzero()
        x[x > 0]  # a boolean mask on the device: nonzero underneath
        x.cpu()
    assert c.reads == 5 and c.copies == 0
    real = torch.tensor
    with DeviceCounter() as c:
        torch.ones(4).to("meta")
        x[torch.tensor([0, 2])]  # a CPU index moved over
        x.copy_(torch.ones(4, 3))
        torch.zeros(4, device="meta").add_(1)  # made on the device: neither
    assert c.copies == 3 and c.reads == 0 and c.blocking == 3 and torch.tensor is real


def test_counter_tells_a_non_blocking_copy_from_pinned_memory_from_a_blocking_one():
    """Only non_blocking from pinned memory leaves the host free; pinned memory is remembered, not made."""
    x = torch.zeros(4, 3, device="meta")
    with DeviceCounter() as c:
        pinned = torch.ones(4).pin_memory()
        buf = torch.empty(4, 3, pin_memory=True)
        assert pinned.is_pinned() and buf[1:].is_pinned() and not torch.ones(4).is_pinned()
        pinned.to("meta", non_blocking=True)
        x.copy_(buf, non_blocking=True)
        buf[1:].to("meta", non_blocking=True)  # a view of pinned memory is pinned
    assert c.copies == 3 and c.blocking == 0, c.seen
    with DeviceCounter() as c:
        torch.ones(4).to("meta", non_blocking=True)  # pageable: torch makes it synchronous
        pinned.to("meta")  # not asked to be non-blocking
        x.copy_(torch.ones(4, 3), non_blocking=True)
    assert c.copies == 3 and c.blocking == 3, c.seen


def test_views_on_the_device_in_one_copy_without_reads():
    """data.Augmentation: one copy per batch for both views (and PICI's extra draws), no read; the
    eval transform none at all, its constants made on the device."""
    import vtcc

    aug = data.Augmentation(vtcc.RECIPES["paper"], 32)
    x = torch.zeros(8, 3, 64, 64, dtype=torch.uint8, device="meta")
    sizes = torch.tensor([[64, 48]]).repeat(8, 1)
    with DeviceCounter() as c:
        a, b, (noise,) = aug.views(x, torch.Generator().manual_seed(0), sizes, extra=lambda: (torch.rand(2, 8, 4),))
    assert c.copies == 1 and c.reads == 0, c.seen
    assert a.shape == b.shape == (8, 3, 32, 32) and a.device.type == "meta" and noise.shape == (2, 8, 4)
    with DeviceCounter() as c:
        aug.eval(x)
        aug.view(x, torch.Generator(), aug.recipe[0])
    assert c.copies == 1 and c.reads == 0, c.seen
