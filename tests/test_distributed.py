"""Several processes (torchrun / DDP): the contrastive losses see the global batch.

Two CPU processes on the gloo backend each take half of a batch, gather the features with
gradients (common.gather) and compute every method's losses; after backward, DDP's averaged
gradients and the loss must equal one process computing the same losses on the whole batch.
"""
import importlib
import os
import socket
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import common

B, D, K, KS = 8, 6, 3, 5


class Tiny(nn.Module):
    """A stand-in network with every kind of head the five methods use."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(D, 16), nn.ReLU())
        self.instance_head = nn.Linear(16, 4)
        self.cluster_head = nn.Sequential(nn.Linear(16, K), nn.Softmax(dim=1))
        self.semantic_head = nn.Linear(16, KS)
        self.predictor = nn.Linear(KS, KS)
        self.decoder = nn.Linear(16, 12)

    def forward(self, x):
        h = self.backbone(x)
        s = self.semantic_head(h)
        return {"z": self.instance_head(h), "p": self.cluster_head(h), "q": s.softmax(1),
                "pred": self.predictor(s).softmax(1), "rec": self.decoder(h).view(len(x), 3, 4)}


def method_losses(name, a, b, extra, env):
    """One method's losses on the two views' outputs, each gathered over the processes."""
    m = importlib.import_module(name)
    if name in ("cc", "vtcc", "vitic"):
        z_a, z_b, p_a, p_b = common.gather(a["z"], b["z"], a["p"], b["p"])
        return [m.instance_loss(z_a, z_b, 0.5), m.cluster_loss(p_a, p_b, 1.0)]
    if name == "dcsc":
        z_a, z_b, c_a, c_b, q_a, q_b, p_a, p_b = common.gather(a["z"], b["z"], a["p"], b["p"], a["q"], b["q"], a["pred"], b["pred"])
        return [m.flc_loss(z_a, z_b, 0.2), m.clc_loss(c_a, c_b, 1.0), m.slc_loss(p_a, q_a, p_b, q_b, 1.0), m.cr_loss(c_a, c_b)]
    if name == "pici":
        z_a, z_b, p_a, p_b, rec_a, rec_b = common.gather(a["z"], b["z"], a["p"], b["p"], a["rec"], b["rec"])
        targets, patches, mask = extra
        return [m.instance_loss(z_a, z_b, 0.5), m.cluster_loss(p_a, p_b, 1.0), m.cli_loss(p_a, p_b, targets, targets.roll(1)),
                m.reconstruction_loss(rec_a, patches, mask) + m.reconstruction_loss(rec_b, patches, mask)]
    raise ValueError(name)


METHODS = os.environ.get("DIST_METHODS", "cc vtcc vitic dcsc pici").split()


def batch():
    g = torch.Generator().manual_seed(1)
    x_a, x_b = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    targets = torch.randint(0, K, (B,), generator=g)
    patches = torch.randn(B, 3, 4, generator=g)
    mask = (torch.rand(B, 3, generator=g) > 0.5).float()
    mask[:, 0] = 1
    return x_a, x_b, (targets, patches, mask)


def step(net, model, name, rows, env):
    x_a, x_b, extra = batch()
    losses = method_losses(name, net(x_a[rows]), net(x_b[rows]), extra, env)
    for p in model.parameters():
        p.grad = None
    sum(losses).backward()
    grads = {k: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for k, p in model.named_parameters()}
    return [l.item() for l in losses], grads


def worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = Tiny()
    net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    env = SimpleNamespace(distributed=True)
    share = B // world
    with warnings.catch_warnings(record=True) as caught:  # torch.distributed.nn's all_gather warns at every call
        warnings.simplefilter("always")
        results = {name: step(net, model, name, slice(rank * share, (rank + 1) * share), env) for name in METHODS}
    results["warnings"] = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    if rank == 0:
        torch.save(results, out)
    del net
    dist.barrier()
    dist.destroy_process_group()
    # About one run in 50, PyTorch's own C++ teardown at interpreter exit aborts the process
    # ("terminate called without an active exception", after everything above has finished).
    # Leave without that teardown, so the test reports only what it checks.
    os._exit(0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    two = torch.load(out, weights_only=False)
    assert two["warnings"] == []  # the gather uses no deprecated API
    model = Tiny()
    for name in METHODS:
        losses, grads = step(model, model, name, slice(0, B), SimpleNamespace(distributed=False))
        assert two[name][0] == pytest.approx(losses, abs=1e-5), name
        assert grads["backbone.0.weight"].abs().sum() > 0, name
        for k, g in grads.items():
            torch.testing.assert_close(two[name][1][k], g, atol=1e-5, rtol=1e-5, msg=f"{name}: gradient of {k}")
