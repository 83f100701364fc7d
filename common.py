"""Shared parts of the five method scripts: clustering metrics, the ViT and MAE building blocks, and
the plumbing every script needs alike (arguments, device and precision, seeding, distributed
training, checkpoints, the run folder and its files).

No method logic lives here: losses, heads and training loops are in the method files.
"""
import argparse
import atexit
import contextlib
import csv
import dataclasses
import datetime
import errno
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
import warnings
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


# ---------------------------------------------------------------------------------------------
# The torch range: the floor (requirements.txt's torch>=), checked at import, and the one shim for
# an API newer than it. Every other torch call here exists, with its keywords, from the floor on.
# ---------------------------------------------------------------------------------------------
TORCH_FLOOR = (2, 4, 1)


def check_torch(version=None):
    """One error line, not an AttributeError mid-run, when the installed torch is older than the floor."""
    version = version or torch.__version__
    got = tuple(int(p) for p in re.findall(r"\d+", version)[:3])  # 2.4.1+cu121 -> (2, 4, 1)
    floor = ".".join(map(str, TORCH_FLOOR))
    check(got >= TORCH_FLOOR, f"torch {version} is installed, these scripts need torch>={floor}: "
          "pip install -r requirements.txt (or a newer torch)")


def all_gather_rows(out, x):
    """Every process's x into out, rank by rank: all_gather_single from torch 2.13, before it the
    same collective under its old name (which 2.13 on deprecates)."""
    (getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor)(out, x)


# ---------------------------------------------------------------------------------------------
# Clustering metrics, as all five papers report them: transductive (the training images are the ones
# clustered), NMI with arithmetic normalisation, ACC by Hungarian matching, ARI
# ---------------------------------------------------------------------------------------------
def contingency(y_true, y_pred):
    """Counts of (predicted cluster, true class) pairs; label ids may be arbitrary integers."""
    _, t = np.unique(np.asarray(y_true), return_inverse=True)
    _, p = np.unique(np.asarray(y_pred), return_inverse=True)
    table = np.zeros((p.max() + 1, t.max() + 1), dtype=np.int64)
    np.add.at(table, (p, t), 1)
    return table  # (clusters, classes)


def cluster_acc(y_true, y_pred):
    """Best one-to-one match of clusters to classes (Hungarian); unmatched clusters count as errors.

    Empty clusters, non-contiguous ids and more clusters than classes are all fine: only the ids
    that occur are matched (the authors' code shifts ids when cluster 0 is empty; not here).
    """
    table = contingency(y_true, y_pred)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


def cluster_metrics(y_true, y_pred):
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return {
        "nmi": float(normalized_mutual_info_score(y_true, y_pred)),  # arithmetic normalisation
        "acc": cluster_acc(y_true, y_pred),
        "ari": float(adjusted_rand_score(y_true, y_pred)),
    }


def cluster_health(y_pred, num_clusters):
    """Is the model collapsing? Entropy of the assignment (nats; log K is uniform), smallest and
    largest cluster share, and how many of the K clusters are empty."""
    share = np.bincount(np.asarray(y_pred), minlength=num_clusters) / len(y_pred)
    nz = share[share > 0]
    return {
        "entropy": float(-(nz * np.log(nz)).sum()),
        "min_share": float(share.min()),
        "max_share": float(share.max()),
        "empty": int((share == 0).sum()),
    }


def kmeans(features, num_clusters, seed, n_init=10, normalize=True):
    """k-means on the features (sklearn), L2-normalised first unless normalize=False. Returns labels
    and a confidence per sample: the softmax over negative squared distances to the centroids,
    taken at the assigned one."""
    from sklearn.cluster import KMeans

    x = torch.as_tensor(features).float()
    x = (F.normalize(x, dim=1) if normalize else x).numpy()
    km = KMeans(num_clusters, n_init=n_init, random_state=seed).fit(x)
    d2 = torch.as_tensor(km.transform(x)) ** 2
    conf = torch.softmax(-d2, dim=1).max(dim=1).values
    return torch.as_tensor(km.labels_, dtype=torch.long), conf.float()


# ---------------------------------------------------------------------------------------------
# ViT building blocks: pre-norm blocks, the conv stem (VTCC, ViT-IC), the patchify stem (PICI, VTCC
# Table V), 2-D sine-cosine positions
# ---------------------------------------------------------------------------------------------
def sincos_2d(dim, grid_size, cls_token=True):
    """Fixed 2-D sine-cosine position table, (1 + grid_size**2, dim), CLS row zero.

    Convention (MAE's): the first dim/2 channels encode the column (x) coordinate, the last dim/2
    the row (y); within each half, the first quarter is sin(pos * w_k), the second cos(pos * w_k),
    with w_k = 1 / 10000**(k / (dim/4)), k = 0 .. dim/4-1. Token t = row * grid_size + col.
    """
    if dim % 4:
        raise ValueError(f"the sin-cos table needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")

    def embed(pos):  # (L,) -> (L, dim/2)
        angle = pos.flatten().double()[:, None] * omega[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    table = torch.cat([embed(cols), embed(rows)], dim=1).float()
    if cls_token:
        table = torch.cat([torch.zeros(1, dim), table])
    return table


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, D/heads)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """Pre-norm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)); LN eps 1e-6, GELU, no dropout."""

    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ConvStem(nn.Sequential):
    """Four 3x3 stride-2 convs (no bias) with BN and ReLU, widths dim/8, dim/4, dim/2, dim, then a
    1x1 conv with bias: a 16x down-sampling like a 16x16 patchify, with a convolutional early stage
    (Xiao et al. 2021, used by VTCC and ViT-IC)."""

    def __init__(self, dim, in_chans=3):
        layers, c_in = [], in_chans
        for c_out in (dim // 8, dim // 4, dim // 2, dim):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        layers.append(nn.Conv2d(dim, dim, 1))
        super().__init__(*layers)


class PatchifyStem(nn.Conv2d):
    """The plain ViT stem: non-overlapping 16x16 patches, linearly embedded."""

    def __init__(self, dim, in_chans=3, patch_size=16):
        super().__init__(in_chans, dim, patch_size, stride=patch_size)


def random_masking(x, mask_ratio, generator=None, noise=None):
    """MAE masking by sorting per-sample noise: keep the first L*(1-mask_ratio) tokens of a random
    permutation. Returns the kept tokens (B, L_keep, D), the mask (B, L; 1 = removed) in the
    original order, and ids_restore, the inverse permutation that puts the tokens back. noise (B, L)
    on x's device, when given, is used instead of a draw from `generator` (CPU) and its copy: a
    training step sends it with the augmentation's parameters (data.Augmentation.views' extra)."""
    B, L, D = x.shape
    keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(B, L, generator=generator).to(x.device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, D))
    mask = torch.ones(B, L, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return kept, mask, ids_restore


class ViT(nn.Module):
    """A ViT returning the CLS token after the final LayerNorm.

    stem: "conv" (VTCC, ViT-IC) or "patchify" (16x16, PICI's MAE and VTCC's Table V ablation).
    positions: "fixed" 2-D sin-cos buffer (VTCC, ViT-IC, PICI's code) or "learnable" parameters
    initialised from it (the PICI paper). The image size sets the token grid, (image_size / 16)**2
    tokens plus CLS. init: the authors' code's (the papers are silent), see init_vit_weights:
    "mocov3" (VTCC's and ViT-IC's code, both built on MoCo v3's ViT) or "mae" (PICI's code, MAE's).
    """

    def __init__(self, image_size=224, dim=384, depth=8, heads=12, mlp_ratio=4.0, stem="conv", positions="fixed", init="mocov3"):
        super().__init__()
        if image_size % 16 or image_size < 16:
            raise ValueError(f"image size {image_size} is not a multiple of 16: the ViT's stem down-samples by 16; use e.g. 32, 64, 128 or 224")
        if stem not in ("conv", "patchify") or positions not in ("fixed", "learnable") or init not in ("mocov3", "mae"):
            raise ValueError(f"stem must be conv|patchify, positions fixed|learnable and init mocov3|mae, got {stem}, {positions}, {init}")
        self.image_size, self.dim = image_size, dim
        self.num_patches = (image_size // 16) ** 2
        self.stem = ConvStem(dim) if stem == "conv" else PatchifyStem(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        table = sincos_2d(dim, image_size // 16)[None]  # (1, 1 + L, dim)
        if positions == "learnable":
            self.pos_embed = nn.Parameter(table)
        else:
            self.register_buffer("pos_embed", table, persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        init_vit_weights(self, split_qkv=init == "mocov3")
        if init == "mocov3":
            nn.init.normal_(self.cls_token, std=1e-6)  # MoCo v3's vits.py; the stem keeps torch's default (VTCC's, ViT-IC's code)
        else:  # MAE's initialize_weights: CLS std .02; the 16x16 patch embedding as a Linear over the flattened kernel
            nn.init.normal_(self.cls_token, std=0.02)
            if stem == "patchify":
                nn.init.xavier_uniform_(self.stem.weight.view(dim, -1))  # bias: torch's default, as MAE

    def forward_features(self, x, mask_ratio=0.0, generator=None, noise=None):
        """All tokens after the final norm, (B, 1 + L_kept, dim), and the MAE mask and ids_restore
        (None without masking); the mask from generator's draw, or from noise (see random_masking)."""
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(f"this ViT was built for {self.image_size} px input, got {tuple(x.shape[-2:])}")
        t = self.stem(x).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]  # (B, L, dim)
        mask = ids_restore = None
        if mask_ratio > 0:
            t, mask, ids_restore = random_masking(t, mask_ratio, generator, noise)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(t.shape[0], -1, -1)
        t = torch.cat([cls, t], dim=1)
        for block in self.blocks:
            t = block(t)
        return self.norm(t), mask, ids_restore

    def forward(self, x):
        return self.forward_features(x)[0][:, 0]


def init_vit_weights(module, split_qkv=False):
    """Linear layers Xavier-uniform with zero bias, LayerNorm (1, 0), convolutions left to torch (the
    ViT code the authors build on: MAE's, MoCo v3's). split_qkv: MoCo v3's rule for the fused qkv
    Linear, each of Q, K and V Xavier over its own (dim, dim) block, so bound sqrt(6 / 2 dim), about
    1.4x the fused matrix's sqrt(6 / 4 dim); without it (MAE) one Xavier over the fused (3 dim, dim)."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            if split_qkv and name.endswith("qkv"):
                bound = math.sqrt(6 / (m.out_features // 3 + m.in_features))  # Xavier of one (dim, dim) block
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# MAE parts (He et al. 2022): patchify, decoder with mask tokens, masked per-patch-normalised MSE
# ---------------------------------------------------------------------------------------------
def patchify(images, patch_size=16):
    """(B, C, H, W) -> (B, L, p*p*C), patches in row-major order, pixels (p, p, C) inside a patch."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(patches, patch_size=16, channels=3):
    """(B, L, p*p*C) -> (B, C, H, W), the inverse of patchify for a square grid."""
    B, L, _ = patches.shape
    p, g = patch_size, math.isqrt(L)
    x = patches.reshape(B, g, g, p, p, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, channels, g * p, g * p)


class MAEDecoder(nn.Module):
    """Embeds the encoder's visible tokens, puts learned mask tokens in the removed places
    (ids_restore), adds its own position table and predicts the p*p*3 pixels of every patch."""

    def __init__(self, num_patches, encoder_dim=384, dim=512, depth=8, heads=16, patch_size=16, positions="learnable"):
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        table = sincos_2d(dim, math.isqrt(num_patches))[None]
        if positions == "learnable":
            self.pos_embed = nn.Parameter(table)
        else:
            self.register_buffer("pos_embed", table, persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_size * patch_size * 3)
        init_vit_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent, ids_restore):
        x = self.embed(latent)  # (B, 1 + L_keep, dim)
        B, L = ids_restore.shape
        masked = self.mask_token.expand(B, L + 1 - x.shape[1], -1)
        t = torch.cat([x[:, 1:], masked], dim=1)  # visible first, then mask tokens: the shuffled order
        t = torch.gather(t, 1, ids_restore[:, :, None].expand(-1, -1, t.shape[2]))  # original order
        t = torch.cat([x[:, :1], t], dim=1) + self.pos_embed
        for block in self.blocks:
            t = block(t)
        return self.pred(self.norm(t))[:, 1:]  # (B, L, p*p*3), CLS dropped


def masked_patch_mse(pred, target, mask, eps=1e-6):
    """MSE between predicted and true patches over the masked patches only; each target patch is
    normalised by its own mean and variance first (MAE's norm_pix_loss). pred, target (B, L, P);
    mask (B, L), 1 = masked."""
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + eps) ** 0.5
    per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum()


# ---------------------------------------------------------------------------------------------
# Arguments: each script declares a dataclass `Args` whose fields carry their help text.
# ---------------------------------------------------------------------------------------------
def arg(default, help, **kwargs):
    """A field of a script's Args: default, help line (citing the paper), and optional argparse
    keywords such as choices= or type= (needed where the default is None)."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


# What an --eval-only run does not take from its checkpoint: where this run writes and what it runs on.
RUN_ONLY = ("eval_only", "resume", "out_dir", "run_name", "device", "precision", "compile", "deterministic",
            "data_on_device", "threads")
# What a --resume may change: how long and how often, where it writes, what it runs on. Nothing here
# changes what is trained (model, data, recipe), so the resumed run is the run that was started, only
# longer. PICI's stage lengths are its --epochs (pici.py checks that the checkpoint's epoch keeps its
# stage). --precision: the weights and Adam's state are fp32 under any autocast; fp16 after bf16 or
# fp32 starts a fresh loss scale (restore).
RESUME_SAFE = RUN_ONLY + ("epochs", "pretrain_epochs", "train_epochs", "boost_epochs", "eval_every", "save_every",
                          "tensorboard", "export_features", "data_root", "cache_dir")


def parse_args(cls, argv=None, description=None, method=None):
    """The command line as a `cls`. --eval-only and --resume take the arguments the checkpoint was
    trained with (dataset, data root, image size, K, the method's settings). With --eval-only the
    flags given override them; with --resume only RESUME_SAFE flags may differ from them, and any
    other given flag is an error naming both values."""
    args = vars(parser(cls, description).parse_args(argv))
    check(not (args["eval_only"] and args["resume"]), "give --eval-only or --resume, not both")
    if not (args["eval_only"] or args["resume"]):
        return cls(**args)
    given = vars(parser(cls, description, given_only=True).parse_args(argv))
    if args["eval_only"]:
        trained = read_checkpoint(args["eval_only"], method)["args"]
        if given.get("dataset", trained.get("dataset")) != trained.get("dataset"):
            trained.pop("max_images", None)  # a subset of the training data says nothing about another dataset
        args.update({k: v for k, v in trained.items() if k in args and k not in RUN_ONLY}, **given)
        return cls(**args)
    path = args["resume"] if args["resume"] != "auto" else resume_auto(cls(**args), method, given)
    if path is None:  # --resume auto with no checkpoint yet: a fresh start with this command line
        return cls(**args)
    if args["resume"] == "auto":
        args["run_name"] = path.parent.name  # the folder found, not merely the newest (run_dir)
    state = read_checkpoint(path, method, mmap=True)
    trained = state["args"]
    differ = conflicts(trained, given)
    check(not differ, f"--resume continues the run as it was started, and {path} was trained with {flags(differ, 1)}, "
                      f"not {flags(differ, 2)}: leave these flags out (the run's own are used), or leave out --resume to start a new run")
    check(given.get("epochs") is None or given["epochs"] >= state["epoch"],
          f"--epochs {given.get('epochs')} is fewer than the {state['epoch']} epochs {path} has done: give more to extend the run")
    args.update({k: v for k, v in trained.items() if k in args and k not in ("eval_only", "resume", "out_dir", "run_name")}, **given)
    return cls(**args)


def conflicts(trained, given):
    """[(flag name, the checkpoint's value, the given value)] of the given flags a --resume may not change."""
    return [(k, trained[k], v) for k, v in given.items() if k in trained and k not in RESUME_SAFE and not same(k, trained[k], v)]


def same(key, a, b):
    """Equal values, or the same folder of images written two ways (relative, absolute, a link)."""
    if a == b:
        return True
    return key == "dataset" and os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)


def flags(differ, which):
    return " ".join(f"--{d[0].replace('_', '-')} {d[which]}" for d in differ)


def resume_auto(args, method, given):
    """The checkpoint `--resume auto` continues, or None (a fresh start): --run-name's, or the newest
    run of this method, dataset and seed whose checkpoint was trained with the flags given. A given
    flag none of them was trained with is an error: it would start a new run where one was meant to go on."""
    out = Path(args.out_dir)
    if args.run_name:
        folders = [out / args.run_name]
    else:
        folders = run_folders(out, f"{method}-{Path(args.dataset).name or 'data'}-seed{args.seed}")[::-1]
    checkpoints = [p / "checkpoint.pt" for p in folders if (p / "checkpoint.pt").is_file()]
    newest = None
    for path in checkpoints:
        differ = conflicts(read_checkpoint(path, method, mmap=True)["args"], given)
        if not differ:
            return path
        newest = newest or (path, differ)
    if newest is None:
        return None
    path, differ = newest
    others = " (nor was any other run of it)" if len(checkpoints) > 1 else ""
    fail(f"--resume auto continues the run as it was started, and {path} was trained with {flags(differ, 1)}, "
         f"not {flags(differ, 2)}{others}: leave these flags out to continue it, or pass a new --run-name "
         f"(or leave out --resume) to start a new run")


def parser(cls, description=None, given_only=False):
    """argparse for the fields of `cls`; given_only: a flag not given is left out of the result."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # `--epoch 2` must not quietly set --epochs
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        help_ = meta.pop("help")
        flag = "--" + f.name.replace("_", "-")
        default = argparse.SUPPRESS if given_only else f.default
        if isinstance(f.default, bool):
            action = p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
            action.help = f"{help_} (default: {'on' if f.default else 'off'})"  # set here: some Pythons add their own
        else:
            meta.setdefault("type", type(f.default) if f.default is not None else str)
            if meta["type"] in (int, float):
                meta.setdefault("metavar", "N" if meta["type"] is int else "X")
            if "choices" in meta:  # a|b|c: argparse's {a,b,c} garbles a choice such as "pisd,cli"
                meta.setdefault("metavar", "|".join(map(str, meta["choices"])))
            shown = "" if f.default is None else f" (default: {f.default})"  # None: the help says what happens
            p.add_argument(flag, default=default, help=help_ + shown, **meta)
    return p


def fail(message):
    """Bad input: one clear line on stderr, exit code 2, before any work."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check(condition, message):
    if not condition:
        fail(message)


check_torch()  # at import: before any script uses an API newer than the floor


# ---------------------------------------------------------------------------------------------
# Device, precision, seeding, distributed training (speed issue: nanoGPT-style, CPU-safe)
# ---------------------------------------------------------------------------------------------
class Env:
    """What a run runs on: device, autocast dtype, distributed rank, and where its files go."""

    def __init__(self, args, method):
        check(args.batch_size >= 2, f"--batch-size must be at least 2 (contrastive losses need negatives), got {args.batch_size}")
        check(args.epochs >= 1, f"--epochs must be at least 1, got {args.epochs}")
        check(args.num_clusters is None or args.num_clusters >= 2, f"--num-clusters must be at least 2, got {args.num_clusters}")
        check(args.image_size >= 8, f"--image-size must be at least 8, got {args.image_size}")
        self.method = method
        self.eval_only = bool(getattr(args, "eval_only", None))
        # torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain run never touches torch.distributed.
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.distributed = self.world_size > 1
        self.is_main = self.rank == 0
        check(args.batch_size % self.world_size == 0, f"--batch-size {args.batch_size} (the global batch) must divide by the {self.world_size} processes")
        if args.deterministic:  # cuBLAS reads it when CUDA starts, so before the device is chosen
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.device = pick_device(args.device, self.local_rank if self.distributed else None)
        if self.distributed and not torch.distributed.is_initialized():
            # Rank 0 alone evaluates, runs k-means, makes PICI's pseudo-labels and writes checkpoints
            # while the others wait in their next collective: the timeout must outlast that work
            # on a large dataset (NCCL's default is 10 minutes).
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
            atexit.register(torch.distributed.destroy_process_group)
        if args.precision is None:  # the flag left out: the authors trained in fp32, so their recipe does (kept on --resume)
            args.precision = "fp32" if getattr(args, "recipe", None) == "authors" else "auto"
        self.dtype = pick_precision(args.precision, self.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not args.deterministic
            # TF32 rounds matmul inputs to 10 mantissa bits: fine under bf16/fp16 autocast, not for fp32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.dtype is not None
            if args.deterministic:  # flash and memory-efficient attention have non-deterministic backward passes
                for backend in ("flash", "mem_efficient", "cudnn"):
                    getattr(torch.backends.cuda, f"enable_{backend}_sdp")(False)
        if args.deterministic:  # strict on CUDA (an op without such a kernel stops the run, see stop_safely)
            torch.use_deterministic_algorithms(True, warn_only=self.device.type != "cuda")
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def autocast(self):
        """bf16/fp16 autocast for the model's forward; losses are computed in fp32 by the scripts."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def precision(self):
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def step(self, loss, optimizer):
        """Backward and optimiser step, through the GradScaler when fp16 needs one."""
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()


COLLECTIVE_TIMEOUT = datetime.timedelta(hours=3)


def pick_device(name, local_rank=None):
    """The device as an indexed torch.device (cuda:N, never a bare cuda): `auto` and `cuda` mean the
    current CUDA device, or LOCAL_RANK's under torchrun, so devices compare equal when they are one."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        check(torch.cuda.is_available(), f"--device {name} asked for CUDA but none is available: use --device cpu")
        if local_rank is not None:
            device = torch.device("cuda", local_rank)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        count = torch.cuda.device_count()
        check(device.index < count, f"--device {device} does not exist: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        fail(f"unsupported --device {name!r}: use auto, cpu, cuda or cuda:N")
    return device


def native_bf16(device):
    """bf16 in hardware (compute capability 8.0, Ampere, on); older GPUs only emulate it, slowly."""
    return torch.cuda.is_bf16_supported(including_emulation=False)  # of the current device, which pick_device set


def pick_precision(name, device):
    """auto: bf16 autocast on a CUDA GPU with native bf16, fp16 (with the GradScaler) on an older
    one, fp32 on the CPU (exact and reproducible). Returns the autocast dtype, None for fp32."""
    check(name in ("auto", "fp32", "bf16", "fp16"), f"unknown --precision {name!r}: use auto, fp32, bf16 or fp16")
    if name == "auto":
        name = "fp32" if device.type != "cuda" else "bf16" if native_bf16(device) else "fp16"
    check(not (name == "fp16" and device.type != "cuda"), "--precision fp16 needs CUDA: use fp32 or bf16 on the CPU")
    if name == "bf16" and device.type == "cuda" and not native_bf16(device):
        fail(f"--precision bf16: {device} only emulates bf16 (compute capability {torch.cuda.get_device_capability(device)}, "
             "native from 8.0): use fp16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def prepare(model, env, channels_last=False, compile=False, find_unused=False):
    """Model to the device; SyncBatchNorm + DistributedDataParallel under torchrun; torch.compile
    on request. Returns (model, net): `model` for state dicts and evaluation, `net` to train."""
    model = model.to(env.device)
    if channels_last and env.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    net = model
    if env.distributed:
        if env.device.type == "cuda":  # BatchNorm statistics over the global batch, as in one process
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif env.is_main:  # PyTorch's SyncBatchNorm is CUDA-only
            print("note: several CPU processes: BatchNorm statistics stay per process (SyncBatchNorm needs CUDA)")
        ids = [env.device.index] if env.device.type == "cuda" else None
        # CPU: no buffer broadcast before each forward (torch 2.4's in-place one breaks the backward of a
        # step's first view); rank 0's statistics, the checkpoint's, are the same either way.
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused,
                                                  broadcast_buffers=env.device.type == "cuda")
    if compile:
        net = torch.compile(net)
    return model, net


def gather(*tensors, env):
    """Concatenate every process's rows, keeping gradients (all_gather's backward sums the
    gradients from all processes); with DDP's gradient averaging this gives exactly the gradient of
    the loss over the global batch. One process: the tensors unchanged."""
    if not env.distributed:
        return tensors if len(tensors) > 1 else tensors[0]
    out = tuple(Gather.apply(t) for t in tensors)
    return out if len(out) > 1 else out[0]


class Gather(torch.autograd.Function):
    """all_gather_single with a backward pass (torch.distributed.nn's all_gather is deprecated):
    every process computes the loss of the global batch, so the gradient of a process's rows is the
    sum of the processes' gradients for them."""

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


def adam(params, lr, env):
    """Adam with weight decay 0 and a constant rate, as all five papers train; the fused CUDA kernel where it exists."""
    return torch.optim.Adam(params, lr=lr, fused=env.device.type == "cuda")


def host_memory():
    """Bytes of host memory available now (Linux: MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def store_memory(args, env, share=0.25):
    """Bytes the uint8 dataset may take when --storage-size is not given (data.storage_side): half the
    host's available memory (the other half for the model, evaluation, the decoding threads and the
    cache file's pages), and under --data-on-device yes on a GPU also place_images' share of its free
    memory (the rest for the model, activations and optimiser). Under auto a dataset too large for
    the GPU stays on the host at its native size, as the authors' loaders keep it, and batches cross."""
    host = host_memory()
    limits = [host // 2] if host else []
    if args.data_on_device == "yes" and getattr(env, "device", torch.device("cpu")).type == "cuda":
        limits.append(int(share * torch.cuda.mem_get_info(env.device)[0]))
    return min(limits, default=None)


def place_images(images, choice, env, share=0.25):
    """Keep the uint8 dataset on the GPU when it fits in `share` of the free memory (auto), so
    batches are indexed and augmented there with no host transfer."""
    check(choice in ("auto", "yes", "no"), f"--data-on-device must be auto, yes or no, got {choice!r}")
    if env.device.type != "cuda" or choice == "no":
        return images
    if choice == "auto" and images.numel() > share * torch.cuda.mem_get_info(env.device)[0]:
        return images
    return images.to(env.device)


# ---------------------------------------------------------------------------------------------
# Evaluation helper: run a function over the whole dataset in large inference batches
# ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def predict(fn, images, transform, env, batch_size=512):
    """fn(x) -> dict of (B, ...) tensors; returns the dict of concatenated CPU fp32 tensors, in
    dataset order. `transform` turns a uint8 batch on the device into the model's input."""
    out = {}
    for start in range(0, len(images), batch_size):  # images already on the device are not copied
        x = transform(images[start:start + batch_size].to(env.device, non_blocking=True))
        with env.autocast():
            for key, value in fn(x).items():
                out.setdefault(key, []).append(value.float())  # kept on the device: no wait per batch
    return {key: torch.cat(values).cpu() for key, values in out.items()}


# ---------------------------------------------------------------------------------------------
# Run folder, logging, checkpoints, final files
# ---------------------------------------------------------------------------------------------
def writable(path):
    """Could this process make files in `path`? Asks the nearest folder that exists; makes nothing."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def run_dir(args, method):
    """<out-dir>/<run-name>, chosen but not made: the folder appears when training starts (open_run),
    so a start that fails leaves nothing behind. Default name <method>-<dataset>-seed<seed> (-eval
    for --eval-only), numbered -2, -3, ... for new runs, so no earlier run is overwritten; `--resume
    auto` continues the newest one that holds a checkpoint."""
    out = Path(args.out_dir)
    check(writable(out), f"cannot write in --out-dir {out}: pass --out-dir a folder you can write to")
    if args.run_name:
        path = out / args.run_name
        held = path / "checkpoint.pt"
        check(args.resume is not None or args.eval_only or not held.exists(),
              f"{path} already holds a run: pass --resume auto to continue it, or another --run-name")
        check(args.resume in (None, "auto") or not held.exists() or (Path(args.resume).exists() and os.path.samefile(args.resume, held)),
              f"{path} holds a checkpoint of its own, which a run resumed from {args.resume} would overwrite: pass another --run-name")
    else:
        base = f"{method}-{Path(args.dataset).name or 'data'}-seed{args.seed}" + ("-eval" if args.eval_only else "")
        runs = run_folders(out, base)
        resumable = [p for p in runs if (p / "checkpoint.pt").exists()]
        if args.resume == "auto" and resumable:
            path = resumable[-1]
        else:
            path = out / f"{base}-{int(runs[-1].name[len(base) + 1:] or 1) + 1}" if runs else out / base  # after the highest number
    check(writable(path), f"cannot write in {path}: pass --out-dir (or --run-name) a folder you can write to")
    holder = lock_holder(path)
    check(holder is None, f"{path} is in use by another process (pid {holder}): wait for it to end, or pass another --run-name")
    return path


def run_folders(out, base):
    """The run folders <base>, <base>-2, <base>-3, ... in `out`, oldest (lowest number) first."""
    number = {p: int(p.name[len(base) + 1:]) for p in out.glob(base + "-*") if p.name[len(base) + 1:].isdigit()}
    if (out / base).exists():
        number[out / base] = 1
    return sorted(number, key=number.get)


# Run folders this process writes, with their open lock files. A flock lock lasts until its file is
# closed, or the process ends in any way (kill -9 included), so a stale lock never blocks a restart.
_LOCKS = {}


def lock_holder(path):
    """The pid in another process's live lock on the run folder, else None."""
    lock = Path(path) / ".lock"
    if fcntl is None or Path(path).resolve() in _LOCKS or not lock.exists():
        return None
    with open(lock) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "unknown"
    return None


def open_run(path, args, env, epoch):
    """Make the run folder now that the start has passed every check: take its lock (one writer per
    folder), write args.json, and cut log.jsonl back to the `epoch` the run starts from, so that no
    epoch is ever logged twice (a resumed run repeats what followed its checkpoint)."""
    if not env.is_main:
        return
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if fcntl is not None and path.resolve() not in _LOCKS:
        f = open(path / ".lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            fail(f"{path} is in use by another process (pid {f.read().strip() or 'unknown'}): wait for it to end, or pass another --run-name")
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        _LOCKS[path.resolve()] = f
        atexit.register(f.close)
    write_json(path / "args.json", vars(args))
    log = path / "log.jsonl"
    if log.exists():
        lines = log.read_text().splitlines()
        kept = [line for line in lines if logged_epoch(line) <= epoch]
        if kept != lines:
            tmp = log.with_name(log.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, log)


def logged_epoch(line):
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line cut short by a kill: dropped


def write_json(path, obj):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def checkpoint_state(method, model, optimizer, env, epoch, generator, args, **extra):
    """The checkpoint dict. Under torchrun every process calls it (a collective): each process's
    random streams are saved, as `generators` and `torch_rngs` in rank order."""
    streams = {}
    if getattr(env, "distributed", False):
        states = [None] * env.world_size
        torch.distributed.all_gather_object(states, (generator.get_state(), torch.get_rng_state()))
        streams = {"generators": [g for g, _ in states], "torch_rngs": [t for _, t in states]}
    return {
        "method": method,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": env.scaler.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "world_size": getattr(env, "world_size", 1),
        **streams,
        "args": dataclasses.asdict(args),
        **extra,
    }


def read_checkpoint(path, method, mmap=False):
    """Read a checkpoint (weights_only: plain tensors and dicts) and check it is this method's.
    mmap: map the tensors rather than read them (fast, for a look at the arguments only)."""
    path = Path(path)
    check(path.is_file(), f"no checkpoint at {path}: give the path of a run's checkpoint.pt")
    not_ours = f"not a checkpoint of this project: {path}"
    check(path.stat().st_size > 0, f"{not_ours} is empty; give the path of a run's checkpoint.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception:  # a foreign or truncated file; torch's own message is advice about pickles
        fail(f"{not_ours} cannot be read as one (a truncated copy, or another kind of file); give the path of a run's checkpoint.pt")
    check(isinstance(state, dict) and "method" in state, f"{not_ours} holds something else; give the path of a run's checkpoint.pt")
    check(state["method"] == method, f"{path} is a checkpoint of {state['method']!r}, not {method!r}: use {state['method']}.py")
    check(all(k in state for k in ("epoch", "model", "args")), f"{not_ours} lacks the model, epoch or args")
    return state


def load_checkpoint(args, method, run_path, logger):
    """The state to start from: --eval-only's or --resume's checkpoint, or None for a fresh start.
    `--resume auto` with no checkpoint yet starts afresh, so a scheduler can repeat one command."""
    path = args.eval_only or args.resume
    if path == "auto":
        path = Path(run_path) / "checkpoint.pt"
        if not path.exists():
            logger.print(f"--resume auto: no checkpoint in {run_path} yet, starting from epoch 0")
            return None
    return read_checkpoint(path, method) if path else None


def restore(state, model, optimizer, env, generator):
    """Load what checkpoint_state wrote (strict: a missing or extra weight is an error) and return
    its epoch; None (a fresh start) returns 0."""
    if state is None:
        return 0
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # e.g. another --num-clusters or --image-size than the checkpoint's
        detail = str(e).strip().splitlines()[1:2] or [str(e)]
        fail(f"the checkpoint's weights do not fit the model these flags build ({detail[0].strip()}): pass the values it was trained with")
    load_optimizer(optimizer, state["optimizer"])
    if env.scaler.is_enabled() and state["scaler"]:  # fp16 after a bf16 or fp32 run: a fresh scale
        env.scaler.load_state_dict(state["scaler"])
    world, here = state.get("world_size", 1), getattr(env, "world_size", 1)
    if world == here:  # each process its own streams (torchrun), in rank order
        rank = getattr(env, "rank", 0)
        generator.set_state(state["generators"][rank] if world > 1 else state["generator"])
        torch.set_rng_state(state["torch_rngs"][rank] if world > 1 else state["torch_rng"])
    else:  # the random streams are per process: another number of processes cannot continue them
        check(getattr(env, "eval_only", False),
              f"the checkpoint was trained by {world} process(es), this run has {here}: resume it with as many "
              f"(torchrun --nproc-per-node {world}, or plain python for 1); --eval-only takes it with any number")
    return state["epoch"]


def load_optimizer(optimizer, saved):
    """Adam's state from a checkpoint written on any device: the implementation stays the one built
    for this device (fused only on CUDA; a CPU run resuming a CUDA checkpoint must not turn fused on),
    and each moment takes its parameter's memory layout (channels_last on CUDA, contiguous on the CPU:
    a fused kernel pairs the raw memory of the two)."""
    own = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, kept in zip(optimizer.param_groups, own):
        group.update(kept)
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                if k == "step":  # fused and capturable Adam count steps on the device, the others on the CPU
                    optimizer.state[p][k] = v.to(device=p.device if on_device else "cpu", dtype=torch.float32, copy=True)
                elif torch.is_tensor(v) and v.shape == p.shape:
                    optimizer.state[p][k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def cpu_copy(obj, buffers=None, key=()):
    """A copy of a state that later training steps cannot change. CPU tensors are cloned; with
    `buffers` (a dict kept from call to call) a tensor on the GPU is copied without waiting into a
    host buffer of its own, pinned and reused, queued behind the GPU's work: wait for that work (a
    CUDA event) before reading the copy."""
    if torch.is_tensor(obj):
        if obj.device.type == "cpu" or buffers is None:
            return obj.detach().to("cpu", copy=True)
        buf = buffers.get(key)
        if buf is None or buf.shape != obj.shape or buf.stride() != obj.stride() or buf.dtype != obj.dtype:
            # its layout (channels_last or not) as the source's: the copy is one plain memcpy
            buf = buffers[key] = torch.empty_like(obj, device="cpu", pin_memory=obj.device.type == "cuda")
        return buf.copy_(obj.detach(), non_blocking=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v, buffers, key + (k,)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v, buffers, key + (i,)) for i, v in enumerate(obj))
    return obj


@contextlib.contextmanager
def signals_deferred():
    """Ctrl-C and SIGTERM received inside the block are delivered when it ends (the first of them)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread handles signals
        yield
        return
    caught = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])


class Checkpointer:
    """checkpoint.pt holds finished epochs only, so a resumed run ends exactly as an uninterrupted
    one (on the CPU). It is written every --save-every epochs and after the last; in between, the
    last finished epoch is kept in memory and written when Ctrl-C, SIGTERM or an error stops the
    run (stop_safely). A stop thus costs the epoch in progress, which the resumed run repeats; a
    kill -9 costs the epochs since the last write. An epoch is never written over a later one."""

    def __init__(self, path, env, args, epoch, state):
        self.path, self.env, self.args, self.state = Path(path), env, args, state  # state(epoch) -> the checkpoint dict
        self.epoch = epoch  # finished epochs
        self.saved = epoch if self.path.exists() else None  # the epoch checkpoint.pt holds
        self.last = None  # the last finished epoch's state, while it is not on disk
        self.buffers, self.copied = {}, None  # pinned host buffers of a GPU state; the CUDA event of their copy

    def epoch_done(self, epoch):
        # A Ctrl-C or SIGTERM that arrives while the finished epoch is copied (a fraction of a second
        # for a ResNet with its Adam state) is held back until the copy is whole; delivered in the
        # middle of it, the stop would find the epoch counted but no state to write, and lose it.
        with signals_deferred():
            self.epoch = epoch
            state = self.state(epoch)  # every process: under torchrun it gathers their random streams
            if self.env.is_main:
                # taken first, a stop during the write still has it. A GPU state is copied behind the
                # queued steps (no stall); the copy is waited for only when it is written.
                self.last = cpu_copy(state, self.buffers)
                if self.buffers and torch.cuda.is_available():
                    self.copied = torch.cuda.Event()
                    self.copied.record()
                if epoch % self.args.save_every == 0 or epoch == self.args.epochs:
                    self.write()

    def write(self):
        if self.last is not None and (self.saved is None or self.last["epoch"] > self.saved):
            if self.copied is not None:
                self.copied.synchronize()
            atomic_save(self.last, self.path)
            self.saved, self.last = self.last["epoch"], None

    def stop(self, why, logger):
        """Write the last finished epoch unless it is on disk, and say where the run stands."""
        if not self.env.is_main:
            return
        ignored = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}  # a second Ctrl-C must not cut the write short
        try:
            self.write()
        finally:
            for s, handler in ignored.items():
                signal.signal(s, handler)
        where = f"{why} in epoch {self.epoch + 1}/{self.args.epochs}"
        if self.saved is None:
            logger.print(f"{where}: no epoch had finished, so there is no checkpoint (--resume auto starts afresh)")
        else:
            logger.print(f"{where}: {self.path} holds epoch {self.saved}; --resume auto continues from there "
                         f"(epoch {self.saved + 1} is repeated)")


class Terminated(BaseException):
    """SIGTERM, raised in the main thread as KeyboardInterrupt is for Ctrl-C."""


@contextlib.contextmanager
def stop_safely(checkpointer, logger):
    """Around the training loop: Ctrl-C, SIGTERM (how cluster schedulers pre-empt a job) and errors
    end the run with its last finished epoch on disk, and a line saying where it stands."""
    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except KeyboardInterrupt:
        checkpointer.stop("stopped by Ctrl-C (SIGINT)", logger)
        raise SystemExit(130)
    except Terminated:
        checkpointer.stop("stopped by SIGTERM", logger)
        raise SystemExit(143)
    except Exception as e:
        checkpointer.stop("stopped by an error", logger)
        if "does not have a deterministic implementation" in str(e):  # strict --deterministic on CUDA
            op = str(e).split(" does not have")[0].strip()
            fail(f"--deterministic: {op} has no deterministic CUDA kernel in this PyTorch; run without --deterministic")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


class Logger:
    """One line per epoch on the console and one JSON object per epoch in log.jsonl (rank 0); with
    tensorboard=True every number of those records also goes to <run>/tensorboard/. The folder is
    made by open_run, when training starts."""

    def __init__(self, path, env, tensorboard=False, stream=None):
        self.path, self.env = Path(path), env
        self.stream = stream or sys.stdout
        self.live_line = False  # a progress line is on the terminal, not yet ended by a newline
        self.writer = None
        self.tensorboard = env.is_main and tensorboard  # the writer is made with the first record: the run folder exists then
        if self.tensorboard and not tensorboard_installed():
            self.print("note: --tensorboard needs the tensorboard package: pip install tensorboard (this run writes no curves)")
            self.tensorboard = False

    def print(self, *msg):
        if self.env.is_main:
            self.clear_line()
            print(*msg, file=self.stream, flush=True)

    def live(self, line):
        """Rewrite the terminal's last line in place; cut to the terminal's width, as a wrapped line
        could not be rewritten."""
        width = shutil.get_terminal_size().columns - 1
        self.stream.write("\r" + line[:width] + "\x1b[K")
        self.stream.flush()
        self.live_line = True

    def clear_line(self):
        if self.live_line:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.live_line = False

    def log(self, record):
        if self.env.is_main:
            with open(self.path / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            self.scalars(record, record["epoch"])
            if record.get("collapse"):  # evaluation_record's: said aloud, as it happens
                self.print(collapse_warning(record, self.path, f"epoch {record['epoch']}"))

    def scalars(self, record, step):
        """Every number of `record` to TensorBoard at `step` (the epoch); strings and None are skipped."""
        if not self.tensorboard:
            return
        if self.writer is None:
            self.writer = tensorboard_writer(self.path / "tensorboard")
            atexit.register(self.close)  # an interrupted run keeps its last curves
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(scalar_tag(key), value, step)
        self.writer.flush()  # once per epoch: the curves are current while the run goes on

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.tensorboard = False


def tensorboard_installed():
    """Whether torch.utils.tensorboard imports: it needs the tensorboard package, an optional extra
    not in requirements.txt."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def tensorboard_writer(folder):
    """torch.utils.tensorboard's SummaryWriter on `folder` (tensorboard_installed() must be true)."""
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(str(folder))


def scalar_tag(key):
    """TensorBoard tag of a log.jsonl key, grouped as TensorBoard shows them: one panel per group."""
    if key.startswith("loss"):
        return "loss/" + (key[len("loss_"):] or "total")
    if key in ("nmi", "acc", "ari"):
        return "eval/" + key
    if key in ("entropy", "min_share", "max_share", "empty"):
        return "health/" + key
    return "train/" + key


def duration(seconds):
    """H:MM:SS, with days in front past a day (a 1000-epoch run can take weeks)."""
    days, rest = divmod(max(0, round(seconds)), 86400)
    hours, rest = divmod(rest, 3600)
    text = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


class Progress:
    """Where a run is between its epoch lines: step / steps, img/s, time left in the epoch and the run.

    On a terminal, one line rewritten in place every `refresh` seconds; when the output is a file (a
    cluster job's log), a plain line at most every `every` seconds. Nothing in the first `delay`
    seconds of an epoch (on a terminal; `every` in a file), so short epochs print only their epoch
    line. The loop's loss sums stay on the device and are read only when a line is printed: no
    per-step sync. `clock` is injectable for tests.
    """
    delay, refresh, every = 2.0, 0.5, 60.0  # seconds

    def __init__(self, epochs, batch_size, logger, clock=time.monotonic):
        self.epochs, self.batch_size, self.logger, self.clock = epochs, batch_size, logger, clock
        self.tty = logger.stream.isatty() if hasattr(logger.stream, "isatty") else False
        self.wait, self.interval = (self.delay, self.refresh) if self.tty else (self.every, self.every)
        self.epoch = None
        self.epochs_timed = 0

    def __call__(self, batches, epoch, steps, totals=None, weights=None):
        """Yield from `batches`, counting the steps of (0-based) `epoch`, `steps` in all, however many
        loops make it up. `totals`: the device tensor the loop adds its loss terms to, each step;
        `weights`: the terms' weights in the loss (default 1 each)."""
        if not self.logger.env.is_main:
            yield from batches
            return
        now = self.clock()
        if epoch != self.epoch:  # a new epoch: the time from the run's first epoch to here sets the pace
            if self.epoch is None:
                self.first_start = now
            else:
                self.epochs_timed += 1
            self.epoch, self.start, self.last, self.step, self.loss_steps = epoch, now, now, 0, 0
        self.steps = steps
        try:
            for batch in batches:
                yield batch
                self.step += 1
                if totals is not None:
                    self.loss_steps += 1
                now = self.clock()
                if now - self.start >= self.wait and now - self.last >= self.interval:
                    self.last = now
                    self.show(self.line(now, totals, weights))
        finally:
            self.logger.clear_line()

    def line(self, now, totals, weights):
        elapsed = now - self.start
        per_step = elapsed / self.step
        epoch_left = max(self.steps - self.step, 0) * per_step
        # whole epochs as timed so far (evaluation and checkpoints included), else this one's pace
        per_epoch = (self.start - self.first_start) / self.epochs_timed if self.epochs_timed else per_step * self.steps
        run_left = epoch_left + (self.epochs - self.epoch - 1) * per_epoch
        parts = [f"epoch {self.epoch + 1}/{self.epochs} step {self.step}/{self.steps}"]
        if totals is not None and self.loss_steps:
            sums = totals.tolist()  # the one device sync, per printed line
            weights = weights or [1.0] * len(sums)
            parts.append(f"loss {sum(w * s for w, s in zip(weights, sums)) / self.loss_steps:.4f}")
        parts += [f"{self.step * self.batch_size / max(elapsed, 1e-9):.0f} img/s", f"left {duration(epoch_left)}, run {duration(run_left)}"]
        return " | ".join(parts)  # short: it must fit an 80-column terminal to be rewritten in place

    def show(self, line):
        if self.tty:
            self.logger.live(line)
        else:
            self.logger.print(line)


def epoch_line(record, epochs, seconds_left):
    parts = [f"epoch {record['epoch']}/{epochs}"]
    parts += [f"{k} {v:.4f}" for k, v in record.items() if k.startswith("loss")]
    parts += [f"{k} {record[k]:.3f}" for k in ("nmi", "acc", "ari") if record.get(k) is not None]
    parts.append(f"{record['img_per_s']:.0f} img/s")
    parts.append(f"left {duration(seconds_left)}")
    return " | ".join(parts)


def peak_memory_mb(env):
    if env.device.type == "cuda":
        return torch.cuda.max_memory_allocated(env.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def evaluation_record(labels, pred, num_clusters):
    """Metrics (None for unlabelled data) and cluster health for one set of assignments."""
    record = {"nmi": None, "acc": None, "ari": None}
    if labels is not None:
        record.update(cluster_metrics(labels.numpy(), pred.numpy()))
    record.update(cluster_health(pred.numpy(), num_clusters))
    seen = collapse(pred, num_clusters, labels)
    if seen:  # only then: a healthy run's records keep their keys
        record["collapse"] = seen
    return record


def collapse(pred, num_clusters, labels=None):
    """What looks like a collapse in these assignments, in words, or None: fewer than half of the K
    clusters used (or one only), or more than half of the images in one cluster when K > 2 (and more
    than the largest class holds, when the labels are known)."""
    counts = torch.bincount(pred, minlength=num_clusters)
    used, top, share = int((counts > 0).sum()), int(counts.argmax()), float(counts.max()) / len(pred)
    largest = float(torch.bincount(labels).max()) / len(labels) if labels is not None else 0.0
    seen = []
    if used < num_clusters / 2 or used == 1:
        seen.append(f"use {used} of the {num_clusters} clusters")
    if num_clusters > 2 and share > max(0.5, largest) and used > 1:
        seen.append(f"put {share:.0%} of the images in cluster {top}")
    return "the predictions " + " and ".join(seen) if seen else None


def collapse_warning(record, run_path, when):
    return (f"warning: {when}, {record['collapse']}: the model may have collapsed; the cluster health of every evaluation "
            f"(empty, max_share, entropy) is in {Path(run_path) / 'log.jsonl'}")


def write_results(path, ds, pred, conf, record, extra):
    """final.json (metrics, run statistics, class names, how the run was made), assignments.csv
    (one row per image, with its class name) and clusters.png (see save_cluster_grid)."""
    path = Path(path)
    write_json(path / "final.json", {**{k: record.get(k) for k in ("nmi", "acc", "ari")}, **extra, "classes": list(ds.classes),
                                     **provenance()})
    with open(path / "assignments.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "file", "label", "class", "cluster", "confidence"])
        labels = ds.labels.tolist() if ds.labels is not None else [""] * len(pred)
        for i, (name, y, c, p) in enumerate(zip(ds.files, labels, pred.tolist(), conf.tolist())):
            w.writerow([i, name, y, ds.classes[y] if y != "" else "", c, f"{p:.4f}"])
    save_cluster_grid(path / "clusters.png", ds.images, pred, conf, ds.labels, ds.classes, ds.num_classes)


def provenance():
    """How this run was made: the command line, the library versions and the git commit of the
    scripts (None when they are not in a git checkout or git is missing)."""
    return {"command": shlex.join(["python", *sys.argv]), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": _version("torchvision"), **git_state(Path(__file__).resolve().parent)}


def _version(module):
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def git_state(folder):
    """{"git_commit": HEAD's hash or None, "git_dirty": uncommitted changes to tracked files, or None}."""
    def git(*cmd):
        return subprocess.run(["git", "-C", str(folder), *cmd], capture_output=True, text=True, timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, a refused repository
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": dirty}


def grid_plan(pred, num_clusters, labels=None, classes=(), max_rows=50):
    """What clusters.png shows: the rows, largest cluster first, each (cluster id, member indices,
    label lines), at most `max_rows` of them; and the lines under them (clusters left out, empty
    clusters). The label: cluster id, size and, with labels, its majority class and that class's share
    (a tie: "tie: a, b" and the share of each)."""
    num_clusters = max(num_clusters, int(pred.max()) + 1)
    sizes = torch.bincount(pred, minlength=num_clusters)
    order = [c for c in sizes.argsort(descending=True, stable=True).tolist() if sizes[c] > 0]
    rows = []
    for c in order[:max_rows]:
        members = (pred == c).nonzero().flatten()
        lines = [f"cluster {c}", f"{len(members)} image{'s' if len(members) > 1 else ''}"]
        if labels is not None:
            counts = torch.bincount(labels[members])
            tops = (counts == counts.max()).nonzero().flatten().tolist()  # a tie names every class in it
            names = ", ".join(classes[t] if t < len(classes) else f"class {t}" for t in tops)
            share = f"{counts[tops[0]] / len(members):.0%} of the cluster"
            lines += [f"tie: {names}", f"{share} each"] if len(tops) > 1 else [names, share]
        rows.append((c, members, lines))
    notes = []
    if len(order) > max_rows:
        notes.append(f"showing the {max_rows} largest of {len(order)} clusters; the other {len(order) - max_rows} "
                     f"are in assignments.csv")
    empty = [c for c in range(num_clusters) if sizes[c] == 0]
    if empty:
        notes.append(f"empty clusters ({len(empty)} of {num_clusters}): " + ", ".join(map(str, empty)))
    return rows, notes


def save_cluster_grid(path, images, pred, conf, labels=None, classes=(), num_clusters=0, per_row=10, size=64, max_rows=50,
                      panel=150, pad=2):
    """clusters.png: one row per cluster, largest first: a label panel (grid_plan's lines), then its
    `per_row` most confident images; the notes underneath. Thumbnails by torchvision's make_grid,
    text by PIL's ImageDraw in PIL's default font."""
    from PIL import Image, ImageDraw
    from torchvision.transforms.functional import to_pil_image
    from torchvision.utils import make_grid

    rows, notes = grid_plan(pred, num_clusters, labels, classes, max_rows)
    font = default_font()
    box = font.getbbox("Ag")
    line_height = box[3] - box[1] + 2  # four lines fit beside a 64 px thumbnail
    width = panel + per_row * (size + pad) + pad
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    notes = [part for note in notes for part in wrap(note, width - 4 * pad, measure, font)]
    height = len(rows) * (size + pad) + pad + (len(notes) * line_height + 2 * pad if notes else 0)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (c, members, lines) in enumerate(rows):
        top = pad + i * (size + pad)
        draw.rectangle([pad, top, panel - 1, top + size - 1], fill=(232, 232, 232))
        for j, text in enumerate(lines):
            text = fit(drawable(text, font), panel - 3 * pad - 4, draw, font)
            draw.text((2 * pad + 2, top + 1 + j * line_height), text, fill="black", font=font)
        members = members[conf[members].argsort(descending=True)][:per_row]  # most confident first
        thumbs = F.interpolate(images[members.cpu()].float() / 255, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        strip = make_grid(thumbs, nrow=per_row, padding=pad, pad_value=1.0)  # (3, size + 2 pad, n (size + pad) + pad)
        canvas.paste(to_pil_image(strip), (panel, top - pad))
    for j, text in enumerate(notes):
        draw.text((2 * pad, len(rows) * (size + pad) + 2 * pad + j * line_height), drawable(text, font), fill="black", font=font)
    canvas.save(path)


def default_font(size=12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


# Letters that Unicode's decomposition (NFKD) leaves as they are, spelled in ASCII
ASCII_LETTERS = {"ß": "ss", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ø": "o", "Ø": "O", "ł": "l", "Ł": "L", "đ": "d",
                 "Đ": "D", "ı": "i", "þ": "th", "Þ": "Th", "ð": "d", "Ð": "D"}


def drawable(text, font):
    """`text` as `font` can draw it: a character the font lacks becomes its ASCII letters (é -> e,
    ß -> ss), else "?", rather than the font's empty box. Pillow's own scalable default font (Aileron)
    has the ASCII characters only; class names are folder names, often accented."""
    missing = glyph(font, "\ue000")  # a private-use character: no font draws it, so this is the missing-glyph box
    out = []
    for ch in text:
        if " " <= ch <= "~" or glyph(font, ch) != missing:
            out.append(ch)
        else:
            plain = ASCII_LETTERS.get(ch) or "".join(c for c in unicodedata.normalize("NFKD", ch) if " " <= c <= "~")
            out.append(plain or "?")
    return "".join(out)


def glyph(font, ch):
    """What `font` draws for `ch` (size and pixels), None when it cannot (a bitmap font outside Latin-1)."""
    try:
        mask = font.getmask(ch)
    except Exception:
        return None
    return mask.size, bytes(mask)


def fit(text, width, draw, font):
    """`text`, cut with "..." to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def wrap(text, width, draw, font):
    """`text` in lines of at most `width` pixels, broken at spaces."""
    lines = [""]
    for word in text.split(" "):
        candidate = f"{lines[-1]} {word}" if lines[-1] else word
        if draw.textlength(candidate, font=font) <= width or not lines[-1]:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


@torch.inference_mode()
def export_features(run_path, fn, model, images, transform, env):
    """features.npy: fn(x) of every image (the representation the method clusters), float16 (N, D),
    in dataset order (the rows of assignments.csv), on the deterministic evaluation view."""
    model.eval()
    features = predict(lambda x: {"f": fn(x)}, images, transform, env)["f"]
    model.train()
    np.save(Path(run_path) / "features.npy", features.numpy().astype(np.float16))


def load_data(args, env, with_unlabeled=False):
    """data.load_dataset with its errors turned into one clear line (exit 2). Under torchrun
    rank 0 decodes and caches first; the others then read the cache."""
    import data

    cache = Path(args.cache_dir or Path(args.data_root) / ".cache").absolute()
    memory = store_memory(args, env)  # measured by every process before rank 0 decodes, so all choose one S

    def load():
        return data.load_dataset(args.dataset, root=args.data_root, image_size=args.image_size, max_images=args.max_images,
                                 seed=args.seed, num_clusters=args.num_clusters, with_unlabeled=with_unlabeled,
                                 storage_size=args.storage_size, cache_dir=str(cache),
                                 need=None if args.eval_only else args.batch_size,  # evaluation has no batch to fill
                                 memory=memory)

    try:
        with warnings.catch_warnings(record=True) as caught:  # data.py's warnings, each as one plain line
            warnings.simplefilter("always")
            if env.distributed and not env.is_main:
                torch.distributed.barrier()
            ds = load()
            if env.distributed and env.is_main:
                torch.distributed.barrier()
        if env.is_main:
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr, flush=True)
    except data.DataError as e:
        fail(str(e))
    except OSError as e:  # the decoded-image cache cannot be written, e.g. a read-only --data-root
        where = Path(str(e.filename or "")).absolute()
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST) or not (
                where == cache or cache in where.parents or where in cache.parents):
            raise
        fail(f"cannot write the image cache in {cache} ({e.strerror}): pass --cache-dir a folder you can write to")
    args.num_clusters = ds.num_classes  # recorded with the run: --eval-only on another folder keeps the model's K
    return ds


def header(logger, method, ds, env, model, run_path):
    params = sum(p.numel() for p in model.parameters())
    logger.print(f"{method} | dataset {ds.name} | {len(ds.images)} images | K {ds.num_classes} | device {env.device} "
                 f"| precision {env.precision} | {params / 1e6:.2f}M parameters | world {env.world_size} | run {run_path}")


def fail_nonfinite(epoch, run_path):
    """A diverged run stops before its bad state can overwrite the last good checkpoint."""
    good = Path(run_path) / "checkpoint.pt"
    where = f"the last good checkpoint is {good}" if good.exists() else "no checkpoint was written yet"
    print(f"error: the loss became NaN or infinite in epoch {epoch}; {where} (try a lower --lr or --precision fp32)", file=sys.stderr)
    sys.exit(1)


def finish(run_path, ds, pred, conf, env, logger, **stats):
    """Final evaluation record, result files and the closing lines on the console (rank 0)."""
    record = evaluation_record(ds.labels, pred, ds.num_classes)
    stats.update(device=str(env.device), precision=env.precision, peak_memory_mb=round(peak_memory_mb(env), 1), world_size=env.world_size)
    health = {k: record.get(k) for k in ("entropy", "min_share", "max_share", "empty", "collapse")}  # collapse: None when healthy
    write_results(run_path, ds, pred, conf, record, {**stats, **health})
    logger.scalars(record, stats["epochs"])  # the final evaluation ends the curves
    logger.close()
    if record["nmi"] is None:
        logger.print("final: unlabelled data, no metrics")
    else:
        logger.print(f"final: NMI {record['nmi']:.4f} | ACC {record['acc']:.4f} | ARI {record['ari']:.4f}")
    logger.print(f"{stats['img_per_s']:.1f} img/s | wall {stats['wall_seconds']:.1f} s | {stats['epochs']} epochs | files in {run_path}")
    if record.get("collapse"):
        logger.print(collapse_warning(record, run_path, "final evaluation"))
    return record
