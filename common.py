"""Shared by the five method scripts: clustering metrics, ViT and MAE blocks, and the run plumbing
(arguments, device and precision, the run folder and its files). Losses, heads and training loops
are in the method files."""
import argparse
import atexit
import csv
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import unicodedata
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

try:
    import fcntl  # run-folder locks; POSIX only
except ImportError:
    fcntl = None


# The torch floor (requirements.txt's torch>=), checked at import; every torch call here exists from it on
TORCH_FLOOR = (2, 4, 1)


def check_torch(version=None):
    version = version or torch.__version__
    got = tuple(int(p) for p in re.findall(r"\d+", version)[:3])  # 2.4.1+cu121 -> (2, 4, 1)
    floor = ".".join(map(str, TORCH_FLOOR))
    check(got >= TORCH_FLOOR, f"torch {version} is installed, these scripts need torch>={floor}: "
          "pip install -r requirements.txt (or a newer torch)")


def all_gather_rows(out, x):
    """all_gather_single from torch 2.13, before it the same collective under its old name."""
    (getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor)(out, x)


# --- Clustering metrics, as all five papers report them: transductive (the training images are the ones
# clustered), NMI with arithmetic normalisation, ACC by Hungarian matching, ARI
def cluster_acc(y_true, y_pred):
    """Unmatched clusters count as errors; the ids that occur are matched (the authors' code shifts them)."""
    from sklearn.metrics.cluster import contingency_matrix

    table = contingency_matrix(y_pred, y_true)  # (clusters, classes)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


def cluster_metrics(y_true, y_pred):
    return {"nmi": float(normalized_mutual_info_score(y_true, y_pred)), "acc": cluster_acc(y_true, y_pred),
            "ari": float(adjusted_rand_score(y_true, y_pred))}


def cluster_health(y_pred, num_clusters):
    """Entropy of the assignment (nats; log K is uniform), smallest and largest share, empty clusters."""
    share = np.bincount(np.asarray(y_pred), minlength=num_clusters) / len(y_pred)
    nz = share[share > 0]
    return {"entropy": float(-(nz * np.log(nz)).sum()), "min_share": float(share.min()),
            "max_share": float(share.max()), "empty": int((share == 0).sum())}


def kmeans(features, num_clusters, seed, n_init=10, normalize=True):
    """sklearn's k-means of the (L2-normalised) features; confidence: softmax(-squared distance), at the label."""
    from sklearn.cluster import KMeans

    x = torch.as_tensor(features).float()
    x = (F.normalize(x, dim=1) if normalize else x).numpy()
    km = KMeans(num_clusters, n_init=n_init, random_state=seed).fit(x)
    conf = torch.softmax(-torch.as_tensor(km.transform(x)) ** 2, dim=1).max(dim=1).values
    return torch.as_tensor(km.labels_, dtype=torch.long), conf.float()


# --- ViT: 2-D sin-cos positions, pre-norm blocks, MAE's random masking
def add_positions(module, dim, grid_size, positions):
    """pos_embed (1, 1 + grid_size**2, dim): 2-D sin-cos, CLS row zero, MAE's convention (columns in the first
    half of the width, rows in the second); a buffer ("fixed") or a parameter ("learnable")."""
    if dim % 4:
        raise ValueError(f"the sin-cos table needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    g = torch.arange(grid_size, dtype=torch.float64)
    angles = [pos[:, None] * omega for pos in (g.repeat(grid_size), g.repeat_interleave(grid_size))]  # columns, rows
    table = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1).float()  # (L, dim)
    table = torch.cat([torch.zeros(1, dim), table])[None]  # and the CLS row
    if positions == "learnable":
        module.pos_embed = nn.Parameter(table)
    else:
        module.register_buffer("pos_embed", table, persistent=False)


class Block(nn.Module):
    """Pre-norm: x + MHSA(LN(x)), then x + MLP(LN(x)); LN eps 1e-6, GELU, no dropout."""

    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.norm1 = heads, nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(dim, dim * 3), "proj": nn.Linear(dim, dim)})  # MAE's names
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.norm2(x))


def random_masking(x, mask_ratio, generator=None, noise=None):
    """MAE's masking by sorting per-sample noise: the kept tokens, the mask (1 = removed) and ids_restore.
    noise (B, L) on x's device replaces a draw from generator (a training step sends data.Augmentation's)."""
    B, L, D = x.shape
    keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(B, L, generator=generator).to(x.device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, D))
    return kept, (ids_restore >= keep).float(), ids_restore


class ViT(nn.Module):
    """Returns the final-normed CLS token. stem: "conv" (VTCC, ViT-IC) or "patchify" (PICI, VTCC Table V);
    positions: "fixed" sin-cos (VTCC, ViT-IC, PICI's code) or "learnable" (the PICI paper); init (papers
    silent): "mocov3" (VTCC's and ViT-IC's code) or "mae" (PICI's code)."""

    def __init__(self, image_size=224, dim=384, depth=8, heads=12, mlp_ratio=4.0, stem="conv", positions="fixed",
                 init="mocov3"):
        super().__init__()
        if image_size % 16 or image_size < 16:
            raise ValueError(f"image size {image_size} is not a multiple of 16, the stem's stride: use e.g. 32 or 224")
        if stem not in ("conv", "patchify") or positions not in ("fixed", "learnable") or init not in ("mocov3", "mae"):
            raise ValueError(f"got stem {stem}, positions {positions}, init {init}: stem is conv or patchify, "
                             "positions fixed or learnable, init mocov3 or mae")
        self.image_size, self.dim, self.num_patches = image_size, dim, (image_size // 16) ** 2
        if stem == "conv":  # a convolutional early stage (Xiao et al. 2021): 3x3 stride-2 convs, BN, ReLU; a 1x1
            c = [3, dim // 8, dim // 4, dim // 2, dim]
            self.stem = nn.Sequential(*[m for a, b in zip(c, c[1:]) for m in (nn.Conv2d(a, b, 3, 2, 1, bias=False),
                                      nn.BatchNorm2d(b), nn.ReLU(True))], nn.Conv2d(dim, dim, 1))
        else:
            self.stem = nn.Conv2d(3, dim, 16, stride=16)  # 16x16 patches, embedded
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        add_positions(self, dim, image_size // 16, positions)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        init_vit_weights(self, split_qkv=init == "mocov3")
        # CLS: MoCo v3's vits.py std 1e-6, MAE's initialize_weights .02; MAE's patch embedding: Xavier as a Linear
        nn.init.normal_(self.cls_token, std=1e-6 if init == "mocov3" else 0.02)
        if init == "mae" and stem == "patchify":
            nn.init.xavier_uniform_(self.stem.weight.view(dim, -1))

    def forward_features(self, x, mask_ratio=0.0, generator=None, noise=None):
        """All tokens after the final norm, and the MAE mask and ids_restore (None without masking)."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"this ViT was built for {self.image_size} px input, got {tuple(x.shape[-2:])}")
        t = self.stem(x).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]  # (B, L, dim)
        mask = ids_restore = None
        if mask_ratio > 0:
            t, mask, ids_restore = random_masking(t, mask_ratio, generator, noise)
        t = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(len(t), -1, -1), t], dim=1)
        for block in self.blocks:
            t = block(t)
        return self.norm(t), mask, ids_restore

    def forward(self, x):
        return self.forward_features(x)[0][:, 0]


def init_vit_weights(module, split_qkv=False):
    """Linear Xavier-uniform, zero bias; LayerNorm (1, 0) and convolutions torch's default (MAE's, MoCo v3's code).
    split_qkv: MoCo v3's rule, Xavier over each (dim, dim) block of Q, K, V (MAE: over the fused one)."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            if split_qkv and name.endswith("qkv"):
                bound = math.sqrt(6 / (m.out_features // 3 + m.in_features))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


# --- MAE parts (He et al. 2022): patchify, decoder with mask tokens, masked per-patch-normalised MSE
def patchify(images, p=16):
    """(B, C, H, W) -> (B, L, p*p*C), row-major patches of (p, p, C) pixels."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


class MAEDecoder(nn.Module):
    """The visible tokens embedded, mask tokens in the removed places, the p*p*3 pixels of every patch."""

    def __init__(self, num_patches, encoder_dim=384, dim=512, depth=8, heads=16, patch_size=16, positions="learnable"):
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        add_positions(self, dim, math.isqrt(num_patches), positions)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_size * patch_size * 3)
        init_vit_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent, ids_restore):
        x = self.embed(latent)  # (B, 1 + L_keep, dim)
        t = torch.cat([x[:, 1:], self.mask_token.expand(len(x), ids_restore.shape[1] + 1 - x.shape[1], -1)], dim=1)
        t = torch.gather(t, 1, ids_restore[:, :, None].expand(-1, -1, t.shape[2]))  # unshuffled
        t = torch.cat([x[:, :1], t], dim=1) + self.pos_embed
        for block in self.blocks:
            t = block(t)
        return self.pred(self.norm(t))[:, 1:]  # (B, L, p*p*3), CLS dropped


def masked_patch_mse(pred, target, mask, eps=1e-6):
    """MSE over the masked patches (mask 1), each target patch normalised first (MAE's norm_pix_loss)."""
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + eps) ** 0.5
    per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum()


# --- Arguments: each script's dataclass `Args`, a field per flag with its help text
def arg(default, help, **kwargs):
    """A field of Args: default, help line (citing the paper), argparse keywords (choices=, type=)."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


# What --eval-only does not take from its checkpoint (--resume: the first four); what --resume may change
RUN_ONLY = ("eval_only", "resume", "out_dir", "run_name", "device", "precision", "compile", "deterministic",
            "data_on_device", "threads")
RESUME_SAFE = RUN_ONLY + ("epochs", "pretrain_epochs", "train_epochs", "boost_epochs", "eval_every", "save_every",
                          "tensorboard", "export_features", "data_root", "cache_dir")  # pici.py checks its stages


def parse_args(cls, argv=None, description=None, method=None):
    """The command line as a `cls`. --eval-only and --resume take the checkpoint's arguments, flags given
    override them (--resume: RESUME_SAFE ones only). `--resume auto`: the newest run folder (run_folders)
    whose checkpoint fits the flags given; none: a fresh start."""
    args, given = (vars(parser(cls, description, only).parse_args(argv)) for only in (False, True))
    check(not (args["eval_only"] and args["resume"]), "give --eval-only or --resume, not both")
    if args["eval_only"]:
        trained = read_checkpoint(args["eval_only"], method)["args"]
        if given.get("dataset", trained["dataset"]) != trained["dataset"]:
            del trained["max_images"]  # a subset of the training data says nothing about another dataset
        return cls(**{**args, **{k: v for k, v in trained.items() if k in args and k not in RUN_ONLY}, **given})
    auto, refused = args["resume"] == "auto", None
    paths = [p / "checkpoint.pt" for p in run_folders(cls(**args), method)[1][::-1] if (p / "checkpoint.pt").is_file()] \
        if auto else [Path(args["resume"])] if args["resume"] else []
    for path in paths:
        state = read_checkpoint(path, method, mmap=True)
        trained = state["args"]  # (a folder of images may be named two ways: relative, absolute, a link)
        differ = [(k, t, v) for k, v in given.items() if k in trained and k not in RESUME_SAFE and (t := trained[k]) != v
                  and not (k == "dataset" and os.path.isdir(v) and os.path.isdir(t) and os.path.samefile(v, t))]
        if differ:
            refused = refused or (path, differ)
            continue
        check(given.get("epochs", state["epoch"]) >= state["epoch"], f"--epochs {given.get('epochs')} is fewer than "
              f"the {state['epoch']} epochs {path} has done: give more to extend the run")
        found = {"run_name": path.parent.name} if auto else {}  # the folder found, not merely the newest
        return cls(**{**args, **{k: v for k, v in trained.items() if k in args and k not in RUN_ONLY[:4]}, **given, **found})
    if refused:
        path, differ = refused
        was, now = (" ".join(f"--{d[0].replace('_', '-')} {d[i]}" for d in differ) for i in (1, 2))
        fail(f"--resume{' auto' if auto else ''} continues the run as it was started, and {path} was trained with {was}, "
             f"not {now}{' (nor was any other run of it)' if len(paths) > 1 else ''}: leave these flags out " + (
                 "to continue it, or pass a new --run-name (or leave out --resume) to start a new run" if auto else
                 "(the run's own are used), or leave out --resume to start a new run"))
    return cls(**args)


def parser(cls, description=None, given_only=False):
    """argparse for the fields of `cls`; given_only: a flag not given is left out of the result."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # `--epoch 2` must not quietly set --epochs
    for f in dataclasses.fields(cls):
        kw, flag = dict(f.metadata), "--" + f.name.replace("_", "-")
        help_, default = kw.pop("help"), argparse.SUPPRESS if given_only else f.default
        if isinstance(f.default, bool):  # help set afterwards: some Pythons add their own default
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default).help = \
                f"{help_} (default: {'on' if f.default else 'off'})"
            continue
        kw.setdefault("type", str if f.default is None else type(f.default))
        kw.setdefault("metavar", {int: "N", float: "X"}.get(kw["type"]))
        if "choices" in kw:  # a|b|c: argparse's {a,b,c} garbles a choice such as "pisd,cli"
            kw["metavar"] = kw["metavar"] or "|".join(map(str, kw["choices"]))
        p.add_argument(flag, default=default, help=help_ + ("" if f.default is None else f" (default: {f.default})"), **kw)
    return p


def fail(message, code=2):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def check(condition, message):
    if not condition:
        fail(message)


check_torch()  # at import: before any script uses an API newer than the floor


# --- Device, precision, several processes (torchrun), evaluation in large batches
def pick_device(name, local_rank=None):
    """cuda:N for `auto` and `cuda`: the current CUDA device, LOCAL_RANK's under torchrun."""
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError:
        device = torch.device("meta")  # refused below
    check(device.type in ("cpu", "cuda"), f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        check(torch.cuda.is_available(), f"--device {name} asked for CUDA but none is available: use --device cpu")
        index, count = device.index if device.index is not None else local_rank, torch.cuda.device_count()
        device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
        check(device.index < count, f"--device {device} does not exist: this machine has {count} CUDA device(s)")
        torch.cuda.set_device(device)
    return device


def pick_precision(name, device):
    """The autocast dtype (None: fp32); auto: bf16 on a GPU with native bf16, else fp16; fp32 on the CPU."""
    check(name in ("auto", "fp32", "bf16", "fp16"), f"unknown --precision {name!r}: use auto, fp32, bf16 or fp16")
    cuda = device.type == "cuda"
    native = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    name = ("bf16" if native else "fp16" if cuda else "fp32") if name == "auto" else name
    check(name != "fp16" or cuda, "--precision fp16 needs CUDA: use fp32 or bf16 on the CPU")
    if name == "bf16" and cuda and not native:
        fail(f"--precision bf16: {device} only emulates bf16 (compute capability "
             f"{torch.cuda.get_device_capability(device)}, native from 8.0): use fp16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def prepare(model, run, channels_last=False, compile=False, find_unused=False):
    """(model on the device, for state dicts and evaluation; the net to train: DDP, SyncBatchNorm, compiled)."""
    cuda = run.device.type == "cuda"
    model = net = model.to(run.device, memory_format=torch.channels_last if channels_last and cuda else torch.preserve_format)
    if run.distributed:
        if cuda:  # BatchNorm statistics over the global batch, as in one process
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            run.print("note: several CPU processes: BatchNorm statistics stay per process (SyncBatchNorm needs CUDA)")
        # CPU: no buffer broadcast (torch 2.4's, in place, breaks the backward of a step's first view); it
        # would not change rank 0's statistics, the checkpoint's
        net = nn.parallel.DistributedDataParallel(model, device_ids=[run.device.index] if cuda else None,
                                                  find_unused_parameters=find_unused, broadcast_buffers=cuda)
    return model, torch.compile(net) if compile else net


def gather(*tensors):
    """Every process's rows, with gradients: a loss (and DDP's averaged gradient) over the global batch."""
    out = tuple(Gather.apply(t) for t in tensors) if torch.distributed.is_initialized() else tensors
    return out if len(out) > 1 else out[0]


class Gather(torch.autograd.Function):
    """all_gather whose backward sums the processes' gradients (torch.distributed.nn's is deprecated)."""

    @staticmethod
    def forward(ctx, x):
        out = x.new_empty((torch.distributed.get_world_size() * len(x), *x.shape[1:]))
        all_gather_rows(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # all_reduce works in place
        torch.distributed.all_reduce(grad)
        return grad.chunk(torch.distributed.get_world_size())[torch.distributed.get_rank()]


@torch.inference_mode()
def predict(fn, images, transform, run, batch_size=512):
    """fn(transform(uint8 batch on the device)) -> dict of (B, ...) tensors, concatenated on the CPU in fp32."""
    out = {}
    for i in range(0, len(images), batch_size):
        with run.autocast():
            for key, value in fn(transform(images[i:i + batch_size].to(run.device, non_blocking=True))).items():
                out.setdefault(key, []).append(value.float())  # kept on the device: no wait per batch
    return {key: torch.cat(values).cpu() for key, values in out.items()}


def export_features(run, fn, model, images, transform):
    """features.npy: fn(x) of every image (what the method clusters), float16, in dataset order, on the eval view."""
    model.eval()
    np.save(run.path / "features.npy", predict(lambda x: {"f": fn(x)}, images, transform, run)["f"].numpy().astype(np.float16))
    model.train()


# --- The run folder and its checkpoint
def writable(path):
    """Could this process make files in `path`? Asks the nearest folder that exists."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def run_folders(args, method):
    """(base, folders): --run-name's, or <method>-<dataset>-seed<seed>[-eval] and its -2, -3, ... oldest first."""
    out = Path(args.out_dir)
    if args.run_name:
        return None, [out / args.run_name]
    base = f"{method}-{Path(args.dataset).name or 'data'}-seed{args.seed}" + ("-eval" if args.eval_only else "")
    number = {p: int(p.name[len(base) + 1:]) for p in out.glob(base + "-*") if p.name[len(base) + 1:].isdigit()}
    return base, sorted([out / base] * (out / base).exists() + list(number), key=lambda p: number.get(p, 1))


def run_dir(args, method):
    """The run folder, made when training starts: --run-name's (parse_args sets it for `--resume auto`), or
    a new one numbered after the highest."""
    check(writable(args.out_dir), f"cannot write in --out-dir {args.out_dir}: pass --out-dir a folder you can write to")
    base, runs = run_folders(args, method)
    if args.run_name:
        path, held = runs[0], (runs[0] / "checkpoint.pt").exists()
        check(args.resume or args.eval_only or not held,
              f"{path} already holds a run: pass --resume auto to continue it, or another --run-name")
        check(args.resume in (None, "auto") or not held or os.path.exists(args.resume) and os.path.samefile(
            args.resume, path / "checkpoint.pt"), f"{path} holds a checkpoint of its own, which a run resumed from "
              f"{args.resume} would overwrite: pass another --run-name")
    else:
        path = Path(args.out_dir) / (f"{base}-{int(runs[-1].name[len(base) + 1:] or 1) + 1}" if runs else base)
    check(writable(path), f"cannot write in {path}: pass --out-dir (or --run-name) a folder you can write to")
    claim(path)
    return path


_LOCKS = {}  # this process's run folders and their lock files (a flock ends with its process, kill -9 included)


def lock_holder(path, take=False):
    """The pid in another process's live lock on the folder, else None; take: the lock is then this process's."""
    lock = Path(path) / ".lock"
    if fcntl is None or lock.parent.resolve() in _LOCKS or not (take or lock.exists()):
        return None
    f = open(lock, "a+" if take else "r")
    try:
        fcntl.flock(f, (fcntl.LOCK_EX if take else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        with f:
            return f.read().strip() or "unknown"
    if take:
        _LOCKS[lock.parent.resolve()] = f
        atexit.register(f.close)
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
    else:
        f.close()


def claim(path, take=False):
    holder = lock_holder(path, take)
    check(holder is None, f"{path} is in use by another process (pid {holder}): wait for it to end, or pass another --run-name")


def read_checkpoint(path, method, mmap=False):
    """A checkpoint (weights_only), checked to be this method's; mmap: for a look at the arguments only."""
    path, give = Path(path), "give the path of a run's checkpoint.pt"
    not_ours = f"not a checkpoint of this project: {path}"
    check(path.is_file(), f"no checkpoint at {path}: {give}")
    check(path.stat().st_size > 0, f"{not_ours} is empty; {give}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception:  # a foreign or truncated file; torch's own message is advice about pickles
        fail(f"{not_ours} cannot be read as one (a truncated copy, or another kind of file); {give}")
    check(isinstance(state, dict) and "method" in state, f"{not_ours} holds something else; {give}")
    check(state["method"] == method, f"{path} is a checkpoint of {state['method']!r}, not {method!r}: use {state['method']}.py")
    check(all(k in state for k in ("epoch", "model", "args")), f"{not_ours} lacks the model, epoch or args")
    return state


def restore(run, state):
    """A checkpoint into run.model (strictly), .optimizer and .scaler; returns its epoch."""
    try:
        run.model.load_state_dict(state["model"])
    except RuntimeError as e:  # e.g. another --num-clusters or --image-size than the checkpoint's
        detail = (str(e).strip().splitlines()[1:2] or [str(e)])[0].strip()
        fail(f"the checkpoint's weights do not fit the model these flags build ({detail}): pass the values it was trained with")
    # Adam's state from any device: fused or not as this device runs it, each moment in its weight's memory layout
    saved, opt = state["optimizer"], run.optimizer
    opt.load_state_dict({**saved, "param_groups": [{**g, **{k: own[k] for k in ("fused", "foreach", "capturable") if k in own}}
                                                   for g, own in zip(saved["param_groups"], opt.param_groups)]})
    for p, moments in opt.state.items():  # copies, never the checkpoint's tensors
        moments.update({k: v.clone() if k == "step" else torch.empty_like(p, dtype=v.dtype).copy_(v) for k, v in moments.items()})
    if run.scaler.is_enabled() and state["scaler"]:  # fp16 after a bf16 or fp32 run: a fresh scale
        run.scaler.load_state_dict(state["scaler"])
    return state["epoch"]


def cpu_copy(obj):
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map(cpu_copy, obj))
    return obj.detach().to("cpu", copy=True) if torch.is_tensor(obj) else obj


class Terminated(BaseException):
    """SIGTERM, raised in the main thread as KeyboardInterrupt is for Ctrl-C."""


def on_signals(handler):
    main = threading.current_thread() is threading.main_thread()
    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}


def tensorboard():
    """torch.utils.tensorboard's SummaryWriter; None without the tensorboard package (not in requirements.txt)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def duration(seconds):
    """H:MM:SS, with days in front past a day (a 1000-epoch run can take weeks)."""
    days, rest = divmod(max(0, round(seconds)), 86400)
    return (f"{days}d " if days else "") + f"{rest // 3600}:{rest // 60 % 60:02d}:{rest % 60:02d}"


def weighted(weights, values):
    return sum(w * v for w, v in zip(weights or [1] * len(values), values))


def generator(*keys):
    """A random stream seeded from (seed, epoch, rank): each epoch's own, so a checkpoint needs no random state."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(keys).generate_state(1)[0]))


class Run:
    """One run: what it runs on (device, autocast dtype, rank) and its folder (lock, log, progress line,
    checkpoint, result files). `with run:` around the epoch loop makes the folder; a Ctrl-C, SIGTERM or
    error there writes the last finished epoch (a kill -9 loses the epochs since the last write)."""
    delay, refresh, every = 2.0, 0.5, 60.0  # progress: from 2 s into an epoch every 0.5 s; in a file every 60 s
    clock = time.monotonic

    def __init__(self, args, method):
        check(args.batch_size >= 2, f"--batch-size must be at least 2 (contrastive losses need negatives), got {args.batch_size}")
        check(args.epochs >= 1, f"--epochs must be at least 1, got {args.epochs}")
        check(args.num_clusters is None or args.num_clusters >= 2, f"--num-clusters must be at least 2, got {args.num_clusters}")
        check(args.image_size >= 8, f"--image-size must be at least 8, got {args.image_size}")
        self.args, self.method, self.eval_only = args, method, bool(args.eval_only)
        self.rank, self.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun's
        self.distributed, self.is_main = self.world_size > 1, self.rank == 0
        check(args.batch_size % self.world_size == 0,
              f"--batch-size {args.batch_size} (the global batch) must divide by the {self.world_size} processes")
        if args.deterministic:  # cuBLAS reads it when CUDA starts
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.device = pick_device(args.device, int(os.environ.get("LOCAL_RANK", 0)) if self.distributed else None)
        cuda = self.device.type == "cuda"
        if self.distributed and not torch.distributed.is_initialized():  # rank 0 evaluates alone while the others
            torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=3))  # wait
            atexit.register(torch.distributed.destroy_process_group)
        if args.precision is None:  # left out: fp32 under --recipe authors, as the authors trained (kept on --resume)
            args.precision = "fp32" if getattr(args, "recipe", None) == "authors" else "auto"
        self.dtype = pick_precision(args.precision, self.device)
        self.precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        if args.threads:
            torch.set_num_threads(args.threads)
        if cuda:  # TF32 rounds matmul inputs to 10 mantissa bits: fine under autocast, not for fp32
            torch.backends.cudnn.benchmark = not args.deterministic
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.dtype is not None
            for backend in ("flash", "mem_efficient", "cudnn") if args.deterministic else ():  # non-deterministic backward
                getattr(torch.backends.cuda, f"enable_{backend}_sdp")(False)
        if args.deterministic:  # strict on CUDA: an op without such a kernel stops the run
            torch.use_deterministic_algorithms(True, warn_only=not cuda)
        torch.manual_seed(args.seed)  # the model's initialisation
        self.path = run_dir(args, method)
        self.stream, self.live_line, self.writer, self.shown, self.tensorboard = sys.stdout, False, None, None, None
        if self.is_main and args.tensorboard:
            self.tensorboard = tensorboard()
            if not self.tensorboard:
                self.print("note: --tensorboard needs the tensorboard package: pip install tensorboard (this run writes no curves)")
        self.epoch, self.saved, self.last, self.seen, self.train_seconds = 0, None, None, 0, 0.0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def print(self, *msg):
        if self.is_main:
            self.live(None)
            print(*msg, file=self.stream, flush=True)

    def live(self, line):
        """The terminal's last line rewritten, cut to its width (a wrapped line cannot be); None: cleared."""
        if line is not None or self.live_line:
            self.stream.write("\r" + (line or "")[:shutil.get_terminal_size().columns - 1] + "\x1b[K")
            self.stream.flush()
            self.live_line = line is not None

    def start(self, title, ds, model, optimizer, scaler, same=(), extra=lambda epoch: {}):
        """The header line; --eval-only's or --resume's checkpoint (trained with the same `same` args) loaded.
        (first epoch, checkpoint or None); extra(epoch): the method's own checkpoint entries."""
        self.ds, self.model, self.optimizer, self.scaler, self.extra = ds, model, optimizer, scaler, extra
        self.print(f"{title} | dataset {ds.name} | {len(ds.images)} images | K {ds.num_classes} | device {self.device} "
                   f"| precision {self.precision} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
                   f"| world {self.world_size} | run {self.path}")
        path, own = self.args.eval_only or self.args.resume, self.path / "checkpoint.pt"
        if path == "auto" and not own.exists():  # a scheduler may repeat one command
            self.print(f"--resume auto: no checkpoint in {self.path} yet, starting from epoch 0")
        if not path or path == "auto" and not own.exists():
            return 0, None
        state = read_checkpoint(own if path == "auto" else path, self.method)
        check(all(state["args"][k] == getattr(self.args, k) for k in same),
              f"the checkpoint was trained with other {'/'.join('--' + k for k in same)}: pass the values it was trained with")
        self.epoch = restore(self, state)
        self.saved = self.epoch if own.exists() else None  # what a stop before the next epoch keeps
        stage = f" (stage {state['stage']})" if "stage" in state else ""
        self.print(f"{'evaluating the checkpoint of' if self.eval_only else 'resumed from'} epoch {self.epoch}{stage}")
        return self.epoch, state

    def state(self, epoch):
        return {"method": self.method, "epoch": epoch, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "args": dataclasses.asdict(self.args), **self.extra(epoch)}

    def __enter__(self):
        """The folder, its lock and args.json; log.jsonl cut back to the checkpoint's epoch (a resumed run
        repeats what followed it; a line cut short by a kill goes)."""
        self.started = self.wall = time.perf_counter()
        self.sigterm = signal.signal(signal.SIGTERM, self.terminate)
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            claim(self.path, take=True)
            (self.path / "args.json").write_text(json.dumps(vars(self.args), indent=2) + "\n")
            log = self.path / "log.jsonl"
            lines = log.read_text().splitlines() if log.exists() else []
            kept = [line for line in lines if line.endswith("}") and json.loads(line)["epoch"] <= self.epoch]
            if kept != lines:
                (self.path / "log.tmp").write_text("".join(line + "\n" for line in kept))
                os.replace(self.path / "log.tmp", log)
        return self

    @staticmethod
    def terminate(signum, frame):
        raise Terminated()

    def __exit__(self, kind, error, trace):
        signal.signal(signal.SIGTERM, self.sigterm)
        if kind is None or not issubclass(kind, (Exception, KeyboardInterrupt, Terminated)):
            return False
        if self.is_main:
            ignored = on_signals(signal.SIG_IGN)  # a second Ctrl-C must not cut the write short
            self.write()
            for s, handler in ignored.items():
                signal.signal(s, handler)
            why = {KeyboardInterrupt: "Ctrl-C (SIGINT)", Terminated: "SIGTERM"}.get(kind, "an error")
            self.print(f"stopped by {why} in epoch {self.epoch + 1}/{self.args.epochs}: " + (
                "no epoch had finished, so there is no checkpoint (--resume auto starts afresh)" if self.saved is None
                else f"{self.path / 'checkpoint.pt'} holds epoch {self.saved}; --resume auto continues from there "
                f"(epoch {self.saved + 1} is repeated)"))
        if kind in (KeyboardInterrupt, Terminated):
            raise SystemExit(130 if kind is KeyboardInterrupt else 143)
        if "does not have a deterministic implementation" in str(error):  # strict --deterministic on CUDA
            fail(f"--deterministic: {str(error).split(' does not have')[0].strip()} has no deterministic CUDA kernel in "
                 "this PyTorch; run without --deterministic")
        return False

    def snapshot(self, epoch):
        """Rank 0: epoch `epoch` finished, its state copied to host memory (a stop waits for the whole copy),
        written every --save-every epochs and after the last."""
        self.epoch, caught = epoch, []
        previous = on_signals(lambda signum, frame: caught.append(signum))
        try:
            if self.is_main:
                self.last = cpu_copy(self.state(epoch))  # only once whole: an error in the copy keeps the one before
                if epoch % self.args.save_every == 0 or epoch == self.args.epochs:
                    self.write()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if caught:
                signal.raise_signal(caught[0])

    def write(self):
        """The last finished epoch to checkpoint.pt (through a temporary file), never over a later one."""
        if self.last and (self.saved is None or self.last["epoch"] > self.saved):
            torch.save(self.last, self.path / "checkpoint.tmp")
            os.replace(self.path / "checkpoint.tmp", self.path / "checkpoint.pt")
            self.saved, self.last = self.last["epoch"], None

    def progress(self, batches, epoch, steps, totals=None, weights=None):
        """Yield from `batches`, counting the steps of `epoch` (`steps` in all loops). Rank 0 shows step, loss
        (totals: the device tensor of loss sums, read only then), img/s and time left: on a terminal one line
        rewritten, in a file a line a minute."""
        now = self.clock()
        if epoch != self.shown:  # the time from the run's first epoch to here sets the pace
            self.first, self.timed = (now, 0) if self.shown is None else (self.first, self.timed + 1)
            self.shown, self.begun, self.last_line, self.step, self.steps = epoch, now, now, 0, 0
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        wait, interval = (self.delay, self.refresh) if tty else (self.every, self.every)
        try:
            for batch in batches:
                yield batch
                self.step, self.steps, now = self.step + 1, self.steps + (totals is not None), self.clock()
                if not (self.is_main and now - self.begun >= wait and now - self.last_line >= interval):
                    continue
                self.last_line, elapsed = now, now - self.begun
                left = max(steps - self.step, 0) * elapsed / self.step  # then the other epochs as timed so far
                per_epoch = (self.begun - self.first) / self.timed if self.timed else elapsed / self.step * steps
                line = f"epoch {epoch + 1}/{self.args.epochs} step {self.step}/{steps}"
                if totals is not None and self.steps:  # the one device sync, per shown line
                    line += f" | loss {weighted(weights, totals.tolist()) / self.steps:.4f}"
                (self.live if tty else self.print)(
                    f"{line} | {self.step * self.args.batch_size / max(elapsed, 1e-9):.0f} img/s | left "
                    f"{duration(left)}, run {duration(left + (self.args.epochs - epoch - 1) * per_epoch)}")
        finally:
            self.live(None)

    def epoch_done(self, epoch, totals, terms, evaluate=None, weights=None, evaluate_now=None, stage=None, **extra):
        """Epoch `epoch` (0-based) trained: a stop if it diverged; rank 0's evaluate() every --eval-every epochs
        (or if evaluate_now), log.jsonl, TensorBoard, the epoch line; the checkpoint."""
        args, seconds, means = self.args, time.perf_counter() - self.started, (totals / self.steps).tolist()
        self.train_seconds, self.seen = self.train_seconds + seconds, self.seen + self.steps * args.batch_size
        record = {"epoch": epoch + 1, **({"stage": stage} if stage else {}), "loss": weighted(weights, means),
                  **{f"loss_{t}": m for t, m in zip(terms, means)}, **extra, "lr": args.lr,
                  "img_per_s": self.steps * args.batch_size / seconds, "seconds": seconds}
        if not math.isfinite(record["loss"]):  # before the bad state can overwrite the last good checkpoint
            good = self.path / "checkpoint.pt"
            fail(f"the loss became NaN or infinite in epoch {epoch + 1}; " + (f"the last good checkpoint is {good}" if
                 good.exists() else "no checkpoint was written yet") + " (try a lower --lr or --precision fp32)", code=1)
        if evaluate_now is None:
            evaluate_now = args.eval_every and (epoch + 1) % args.eval_every == 0 and epoch + 1 < args.epochs
        if self.is_main and evaluate and evaluate_now:
            record.update(evaluation_record(self.ds.labels, evaluate()[0], self.ds.num_classes))
        if self.is_main:
            with open(self.path / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            self.show(record, epoch + 1, f"epoch {epoch + 1}")
        self.print(" | ".join([f"epoch {epoch + 1}/{args.epochs}", *(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("loss")),
                               *(f"{k} {record[k]:.3f}" for k in ("nmi", "acc", "ari") if record.get(k) is not None),
                               f"{record['img_per_s']:.0f} img/s", f"left {duration(seconds * (args.epochs - epoch - 1))}"]))
        self.snapshot(epoch + 1)
        self.started = time.perf_counter()

    def show(self, record, step, when):
        """Rank 0: every number of `record` to TensorBoard at `step` (the epoch); the collapse warning."""
        if self.tensorboard and self.writer is None:  # made with the first record: the folder exists then
            self.writer = self.tensorboard(str(self.path / "tensorboard"))
            atexit.register(self.close)  # an interrupted run keeps its last curves
        for key, value in record.items() if self.writer else ():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(scalar_tag(key), value, step)
        if self.writer:
            self.writer.flush()  # once per epoch: the curves are current while the run goes on
        if record.get("collapse"):
            self.print(f"warning: {when}, {record['collapse']}: the model may have collapsed; the cluster health of "
                       f"every evaluation (empty, max_share, entropy) is in {self.path / 'log.jsonl'}")

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = self.tensorboard = None

    def finish(self, pred, conf):
        """Rank 0, after the final evaluation: final.json, assignments.csv, clusters.png, the closing lines."""
        ds, record = self.ds, evaluation_record(self.ds.labels, pred, self.ds.num_classes)
        peak = (torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB
        stats = {"epochs": self.epoch, "img_per_s": self.seen / max(self.train_seconds, 1e-9), "wall_seconds":
                 time.perf_counter() - self.wall, "device": str(self.device), "precision": self.precision,
                 "peak_memory_mb": round(peak, 1), "world_size": self.world_size}
        final = {**record, "collapse": record.get("collapse"), **stats, "classes": list(ds.classes), **provenance()}
        (self.path / "final.json").write_text(json.dumps(final, indent=2) + "\n")
        with open(self.path / "assignments.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index", "file", "label", "class", "cluster", "confidence"])
            labels = ds.labels.tolist() if ds.labels is not None else [""] * len(pred)
            for i, (name, y, c, p) in enumerate(zip(ds.files, labels, pred.tolist(), conf.tolist())):
                w.writerow([i, name, y, ds.classes[y] if y != "" else "", c, f"{p:.4f}"])
        save_cluster_grid(self.path / "clusters.png", ds.images, pred, conf, ds.labels, ds.classes, ds.num_classes)
        self.print("final: unlabelled data, no metrics" if record["nmi"] is None else
                   f"final: NMI {record['nmi']:.4f} | ACC {record['acc']:.4f} | ARI {record['ari']:.4f}")
        self.print(f"{stats['img_per_s']:.1f} img/s | wall {stats['wall_seconds']:.1f} s | {self.epoch} epochs | files in {self.path}")
        self.show(record, self.epoch, "final evaluation")  # the final evaluation ends the curves
        self.close()
        return record


def scalar_tag(key):
    """One TensorBoard panel per group."""
    group = "eval/" if key in ("nmi", "acc", "ari") else "health/" if key in ("entropy", "min_share", "max_share", "empty") else "train/"
    return "loss/" + (key[5:] or "total") if key.startswith("loss") else group + key


# --- Results: evaluation records, the collapse warning, provenance, clusters.png
def evaluation_record(labels, pred, num_clusters):
    """Metrics (None without labels), cluster health; "collapse" only when seen (healthy records keep their keys)."""
    record = dict.fromkeys(("nmi", "acc", "ari")) if labels is None else cluster_metrics(labels.numpy(), pred.numpy())
    record.update(cluster_health(pred.numpy(), num_clusters))
    seen = collapse(pred, num_clusters, labels)
    return {**record, "collapse": seen} if seen else record


def collapse(pred, num_clusters, labels=None):
    """A collapse in words, or None: under half of the K clusters used (or one), or over half of the images
    in one cluster when K > 2 (and more than the largest class holds)."""
    counts = torch.bincount(pred, minlength=num_clusters)
    used, top, share = int((counts > 0).sum()), int(counts.argmax()), float(counts.max()) / len(pred)
    largest = float(torch.bincount(labels).max()) / len(labels) if labels is not None else 0.0
    seen = [f"use {used} of the {num_clusters} clusters"] if used < num_clusters / 2 or used == 1 else []
    if num_clusters > 2 and share > max(0.5, largest) and used > 1:
        seen.append(f"put {share:.0%} of the images in cluster {top}")
    return "the predictions " + " and ".join(seen) if seen else None


def provenance():
    """The command line, library versions, the scripts' git commit and whether tracked files changed (None
    each without git, outside a checkout, in a refused repository)."""
    import torchvision  # a requirement

    git = ["git", "-C", Path(__file__).resolve().parent]
    try:
        head, status = (subprocess.run(git + cmd, capture_output=True, text=True, timeout=10, check=True).stdout
                        for cmd in (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no"]))
        state = {"git_commit": head.strip(), "git_dirty": bool(status)}
    except (OSError, subprocess.SubprocessError):
        state = {"git_commit": None, "git_dirty": None}
    return {"command": shlex.join(["python", *sys.argv]), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, **state}


def grid_plan(pred, num_clusters, labels=None, classes=(), max_rows=50):
    """clusters.png's rows, largest first: (id, members, lines: id, size, majority class(es) and share), and
    the notes under them. Names in ASCII (é -> e, ß -> ss, else ?), all the default font draws."""
    letters = dict(zip("ßæÆœŒøØłŁđĐıþÞðÐ", "ss ae AE oe OE o O l L d D i th Th d D".split()))  # NFKD keeps these
    sizes = torch.bincount(pred, minlength=num_clusters)
    order = [c for c in sizes.argsort(descending=True, stable=True).tolist() if sizes[c] > 0]
    rows = []
    for c in order[:max_rows]:
        members = (pred == c).nonzero().flatten()
        lines = [f"cluster {c}", f"{len(members)} image" + "s" * (len(members) > 1)]
        if labels is not None:
            counts = torch.bincount(labels[members])
            tops = (counts == counts.max()).nonzero().flatten().tolist()
            names = ", ".join(classes[t] if t < len(classes) else f"class {t}" for t in tops)
            names = "".join(ch if " " <= ch <= "~" else letters.get(ch) or "".join(
                d for d in unicodedata.normalize("NFKD", ch) if " " <= d <= "~") or "?" for ch in names)
            tie = len(tops) > 1
            lines += ["tie: " * tie + names, f"{counts[tops[0]] / len(members):.0%} of the cluster" + " each" * tie]
        rows.append((c, members, lines))
    empty = (sizes == 0).nonzero().flatten().tolist()
    notes = [f"showing the {max_rows} largest of {len(order)} clusters; the other {len(order) - max_rows} are in "
             "assignments.csv"] * (len(order) > max_rows)
    return rows, notes + [f"empty clusters ({len(empty)} of {len(sizes)}): {', '.join(map(str, empty))}"] * bool(empty)


def save_cluster_grid(path, images, pred, conf, labels=None, classes=(), num_clusters=0, per_row=10, size=64,
                      panel=150, pad=2):
    """clusters.png: per cluster (grid_plan) a label panel and its most confident images; the notes below."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.transforms.functional import to_pil_image
    from torchvision.utils import make_grid

    rows, notes = grid_plan(pred, num_clusters, labels, classes)
    try:
        font = ImageFont.load_default(size=12)  # Pillow >= 10.1: a scalable font
    except TypeError:
        font = ImageFont.load_default()
    box, width = font.getbbox("Ag"), panel + per_row * (size + pad) + pad
    line, room = box[3] - box[1] + 2, panel - 3 * pad - 4  # four lines fit beside a thumbnail
    draw, wrapped = ImageDraw.Draw(Image.new("RGB", (1, 1))), []
    fits = lambda text, room: draw.textlength(text, font=font) <= room  # noqa: E731
    for note in notes:  # broken at spaces into lines that fit
        wrapped.append("")
        for word in note.split(" "):
            joined = f"{wrapped[-1]} {word}".lstrip(" ")
            wrapped[-1:] = [joined] if not wrapped[-1] or fits(joined, width - 4 * pad) else [wrapped[-1], word]
    height = len(rows) * (size + pad) + pad
    canvas = Image.new("RGB", (width, height + (len(wrapped) * line + 2 * pad if wrapped else 0)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (c, members, lines) in enumerate(rows):
        top = pad + i * (size + pad)
        draw.rectangle([pad, top, panel - 1, top + size - 1], fill=(232, 232, 232))
        for j, text in enumerate(lines):
            if not fits(text, room):  # cut to the panel, with "..."
                text = next(text[:k] + "..." for k in range(len(text), -1, -1) if not k or fits(text[:k] + "...", room))
            draw.text((2 * pad + 2, top + 1 + j * line), text, fill="black", font=font)
        members = members[conf[members].argsort(descending=True)][:per_row]  # most confident first
        thumbs = F.interpolate(images[members.cpu()].float() / 255, size=(size, size), mode="bilinear",
                               antialias=True, align_corners=False)
        canvas.paste(to_pil_image(make_grid(thumbs, nrow=per_row, padding=pad, pad_value=1.0)), (panel, top - pad))
    for j, text in enumerate(wrapped):
        draw.text((2 * pad, height + pad + j * line), text, fill="black", font=font)
    canvas.save(path)
