"""Contrastive Clustering (CC).

Li, Hu, Liu, Peng, Zhou, Peng. "Contrastive Clustering". AAAI 2021.
A ResNet34 embeds two augmented views of each image; an instance head is trained with NT-Xent on
the rows of the feature matrix and a cluster head with NT-Xent on its columns (soft cluster
assignments), plus an entropy term against collapse. The cluster head's argmax is the clustering.

Paper versus the authors' code (github.com/Yunfan-Li/Contrastive-Clustering), in one place:
- Augmentations: the paper names the five operations and defers their settings to SimCLR (Sec. 3.1)
  and drops the blur on the small-image datasets (Sec. 4.1.2); the code fixes the rest (colour
  strength s = 0.5 on CIFAR and Tiny-ImageNet, 1.0 elsewhere; blur p 0.5, kernel 23). The code is
  the paper's setting, so `--recipe paper` and `--recipe authors` are the same recipe.
- STL-10: the 100k unlabeled images train the instance head only, in a pass of their own before
  each epoch (paper, Sec. 4.1.1; the code's separate STL-10 training script).
- Not reproduced: the code's ACC shifts cluster ids when cluster 0 is empty (a bug).
- Images (both recipes): the code crops each view from the original image; here it is stored
  whole at its native size (squashed to S x S, the crop box drawn in the original's frame and
  read from the same part of the store, so a crop matches torchvision's of the original to about
  0.001 of the range on average; antialiased bilinear in torch, not PIL's). Only where the store
  would not fit in memory is S lowered, with a line saying so (`--storage-size`).
- Precision: the code trains in fp32, as `--recipe authors` does here; `--recipe paper` (the same
  augmentations) uses bf16 autocast on a GPU for speed (`--precision fp32` to match the code).

Usage: python cc.py --dataset cifar10 --epochs 1000
       python cc.py --dataset cifar10 --views aug-raw     (Table 3)      --heads instance   (Table 4)
       python cc.py --image-size 32 --epochs 10 --batch-size 128   (quick look on digits, CPU)
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common
import data
from common import arg

# ---------------------------------------------------------------------------------------------
# Augmentation recipe, as data. CC paper, Sec. 3.1: ResizedCrop, ColorJitter, Grayscale,
# HorizontalFlip and GaussianBlur, "each augmentation is applied independently with a certain
# probability following the setting in SimCLR"; both views are i.i.d. draws of the same family.
# Sec. 4.1.2: no GaussianBlur on the small-image collections (up-scaling already blurs them).
# The strengths are SimCLR's with colour strength s, which the authors' code sets per dataset.
# ---------------------------------------------------------------------------------------------
NO_BLUR = ("digits", "cifar10", "cifar100", "stl10", "tiny-imagenet")  # Sec. 4.1.2 (digits: 8 px, up-scaled too)
HALF_STRENGTH = ("cifar10", "cifar100", "tiny-imagenet")  # s = 0.5 in the authors' code (SimCLR's CIFAR value)


def recipe(name, dataset):
    """The two views of `--recipe name` for `dataset` (a dataset name, or a folder's name). CC's
    public code is its paper's setting: "paper" and "authors" are one recipe."""
    s = 0.5 if dataset in HALF_STRENGTH else 1.0
    view = data.View(crop=(0.08, 1.0), flip=0.5, jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), p_jitter=0.8, p_grey=0.2,
                     p_blur=0.0 if dataset in NO_BLUR else 0.5, sigma=(0.1, 2.0), p_solarize=0.0,
                     norm=None)  # inputs stay in [0, 1]: the code normalises nothing
    return {"views": (view, view)}


@dataclass
class Args:
    dataset: str = arg("digits", "dataset name (cifar10, stl10, imagenet10, ...; see README) or a folder of images")
    data_root: str = arg("./data", "where named datasets live and decoded images are cached")
    cache_dir: str = arg(None, "where decoded images are cached (default: <data-root>/.cache); elsewhere when --data-root is read-only")
    num_clusters: int = arg(None, "number of clusters K (default: the dataset's number of classes)", type=int)
    image_size: int = arg(224, "input size: CC paper, Sec. 4.1.2, every image resized to 224x224")
    storage_size: int = arg(None, "side S of the cached images, each stored whole, squashed to S x S (None: the native "
                            "size, as the papers crop from the original image, less only where images x 3 x S^2 bytes "
                            "would not fit in half the host's free memory, or under --data-on-device yes a quarter of the "
                            "GPU's: a line then says so)", type=int)
    epochs: int = arg(1000, "training epochs: CC paper, Sec. 4.1.2")
    batch_size: int = arg(256, "global batch size: CC paper, Sec. 4.1.2")
    lr: float = arg(3e-4, "Adam learning rate, no weight decay or schedule: CC paper, Sec. 4.1.2")
    instance_temperature: float = arg(0.5, "tau_I of the instance loss: CC paper, Sec. 4.1.2")
    cluster_temperature: float = arg(1.0, "tau_C of the cluster loss: CC paper, Sec. 4.1.2")
    feature_dim: int = arg(128, "instance head output size: CC paper, Sec. 4.1.2")
    backbone: str = arg("resnet34", "ResNet depth: CC paper uses ResNet34 (Sec. 4.1.2); Table 5 compares 18/34/50",
                        choices=["resnet18", "resnet34", "resnet50"])
    stl10_unlabeled: bool = arg(True, "STL-10 only: also train the instance head on the 100k unlabeled images (CC paper, Sec. 4.1)")
    recipe: str = arg("paper", "augmentation recipe: paper (Sec. 3.1, 4.1.2) or authors; CC's public code is its paper, "
                      "so both give the same views", choices=["paper", "authors"])
    views: str = arg("aug-aug", "the two inputs, CC paper Table 3: aug-aug = T^a(x) + T^b(x) (the method); aug-raw = "
                     "T^a(x) + x; raw-raw = x + x, where x is the raw image: the whole image resized, as at evaluation",
                     choices=["aug-aug", "aug-raw", "raw-raw"])
    heads: str = arg("both", "contrastive heads trained, CC paper Table 4: both (Eq. 7); instance only (clusters by k-means "
                     "on the instance features, Sec. 4.4.2); cluster only", choices=["both", "instance", "cluster"])
    seed: int = arg(1, "random seed (model init, shuffling, augmentation)")
    device: str = arg("auto", "auto (the current CUDA device when present, LOCAL_RANK's under torchrun), cpu, cuda or cuda:N")
    precision: str = arg(None, "auto (bf16 autocast on a GPU with native bf16, else fp16; fp32 on CPU), fp32 (TF32 off), "
                         "bf16 or fp16 (default: auto, or fp32 under --recipe authors, the authors' precision); bf16 on a "
                         "CPU without native bf16 (AVX512-BF16, AMX) is 10x or more slower than fp32",
                         choices=["auto", "fp32", "bf16", "fp16"])
    compile: bool = arg(False, "torch.compile the network")
    deterministic: bool = arg(False, "deterministic kernels, strict on CUDA: an op without one stops the run "
                                      "(slower; CPU runs are deterministic anyway)")
    data_on_device: str = arg("auto", "keep the uint8 dataset on the GPU: auto (when it fits), yes, no", choices=["auto", "yes", "no"])
    eval_every: int = arg(10, "evaluate every N epochs (0: only at the end)")
    save_every: int = arg(10, "write the checkpoint every N epochs and at the end (Ctrl-C, SIGTERM and errors write the last finished epoch)")
    resume: str = arg(None, "continue a run as it was started, with the arguments in its checkpoint: a path, or 'auto' (the "
                         "newest run folder of this method, dataset and seed whose checkpoint fits the flags given; a fresh start "
                         "when none has one). Give only run flags (--epochs to extend, --eval-every, --save-every, --device, "
                         "--threads, ...): one that changes the model, data or recipe is an error", metavar="CHECKPOINT|auto")
    eval_only: str = arg(None, "only evaluate this checkpoint, with the arguments it was trained with (flags given override "
                               "them, e.g. --dataset another/folder), and write the result files", metavar="CHECKPOINT")
    out_dir: str = arg("runs", "where run folders are written")
    run_name: str = arg(None, "run folder name (default: cc-<dataset>-seed<seed>, numbered when taken)")
    max_images: int = arg(None, "train on a class-balanced subset of this many images (quick runs)", type=int)
    threads: int = arg(0, "CPU threads for torch (0: torch's default)")
    tensorboard: bool = arg(False, "also write every logged number to <run>/tensorboard/ (needs: pip install tensorboard)")
    export_features: bool = arg(False, "write features.npy beside assignments.csv: float16, one row per image in dataset order, "
                                       "the representation the clustering reads (the backbone output; with --heads instance the instance head's)")


class Network(nn.Module):
    """ResNet backbone with the fc layer removed (CC paper, Sec. 3.1, Fig. 2), an instance head
    (two-layer MLP to the row space) and a cluster head (two-layer MLP to K, softmax). A head left
    out (Table 4) is None."""

    def __init__(self, num_clusters, image_size=224, backbone="resnet34", feature_dim=128, heads="both"):
        super().__init__()
        self.backbone = getattr(torchvision.models, backbone)(weights=None)  # random init (Sec. 4.1.2: from scratch)
        width = self.backbone.fc.in_features  # 512 for ResNet18/34, 2048 for ResNet50
        self.backbone.fc = nn.Identity()
        self.instance_head = (nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, feature_dim))
                              if heads != "cluster" else None)
        self.cluster_head = (nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_clusters), nn.Softmax(dim=1))
                             if heads != "instance" else None)

    def forward(self, x):
        h = self.backbone(x)
        z = self.instance_head(h) if self.instance_head is not None else None
        p = self.cluster_head(h) if self.cluster_head is not None else None
        return z, p  # z (B, 128), p (B, K)


def instance_loss(z_a, z_b, temperature):
    """NT-Xent over the 2N augmented samples (CC paper, Sec. 3.2, Eq. 1-3).

    Each row's positive is its other view; the denominator holds the other 2N-1 rows (self
    excluded, as the authors' code does and the CC authors confirmed)."""
    z = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)  # (2N, d): cosine similarity, Eq. (1)
    n = len(z_a)
    sim = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positive = torch.arange(2 * n, device=z.device).roll(n)  # n..2n-1, then 0..n-1: made on the device, no host copy
    return F.cross_entropy(sim, positive)  # Eq. (2) per row, Eq. (3) mean over the 2N rows


def cluster_loss(p_a, p_b, temperature, eps=1e-8):
    """Cluster-level contrastive loss (CC paper, Sec. 3.3, Eq. 4-6).

    The K columns of the (N, K) soft assignments are the cluster representations: NT-Xent over the
    2K columns (Eq. 4-5), plus log K - H(P) per view, where P is the batch's share of each cluster.
    The paper writes "- H(Y)" with H defined as sum P log P; minimising log K - H maximises the
    entropy, as the authors' code does. The clamp keeps value and gradient finite when a
    cluster gets no mass."""
    p_a, p_b = p_a.float(), p_b.float()
    contrastive = instance_loss(p_a.T, p_b.T, temperature)  # Eq. (4)-(5): same NT-Xent, on columns
    entropy = 0.0
    for p in (p_a, p_b):
        share = p.sum(dim=0) / p.sum()  # P(y_i) = sum_j Y_ji / ||Y||_1
        entropy = entropy + torch.log(torch.tensor(float(p.shape[1]))) + (share * torch.log(share.clamp_min(eps))).sum()
    return contrastive + entropy  # Eq. (6)


def evaluate(model, images, aug, run, num_clusters, seed):
    """Cluster = argmax of the cluster head on the deterministic eval view (the whole image resized);
    without a cluster head, k-means on the instance head's features (CC paper, Sec. 4.4.2)."""
    model.eval()
    if model.cluster_head is None:
        out = common.predict(lambda x: {"z": model.instance_head(model.backbone(x))}, images, aug.eval, run)
        model.train()
        return common.kmeans(out["z"], num_clusters, seed)
    out = common.predict(lambda x: {"p": model.cluster_head(model.backbone(x))}, images, aug.eval, run)
    model.train()
    conf, pred = out["p"].max(dim=1)
    return pred, conf


def main(argv=None):
    args = common.parse_args(Args, argv, description=__doc__, method="cc")
    run = common.Run(args, "cc")  # device, precision, rank; the run folder, made only when training starts
    ds = data.load_data(args, run, with_unlabeled=args.stl10_unlabeled and args.dataset == "stl10" and args.heads != "cluster")
    augmented = recipe(args.recipe, ds.name)["views"]
    raw = data.View(norm=augmented[0].norm)  # Table 3's x: nothing random, the whole image resized as at evaluation
    views = {"aug-aug": augmented, "aug-raw": (augmented[0], raw), "raw-raw": (raw, raw)}[args.views]
    terms = [t for t in ("instance", "cluster") if args.heads in ("both", t)]  # Table 4
    aug = data.Augmentation(views, args.image_size)
    unlabeled = ds.unlabeled  # None but for STL-10 (it trains the instance head: none without one)
    model, net = common.prepare(Network(ds.num_classes, args.image_size, args.backbone, args.feature_dim, args.heads), run,
                                channels_last=True, compile=args.compile, find_unused=unlabeled is not None)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=run.device.type == "cuda")  # no weight decay, constant rate (Sec. 4.1.2)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype == torch.float16)  # fp16 only
    autocast = torch.autocast(run.device.type, dtype=run.dtype, enabled=run.dtype is not None)  # bf16/fp16 forward, fp32 losses
    start_epoch, _ = run.start("CC", ds, model, optimizer, scaler)  # --eval-only's or --resume's checkpoint, if any
    images = data.place_images(ds.images, args.data_on_device, run)
    epoch_steps = sum(len(x) // args.batch_size for x in (images, unlabeled) if x is not None)  # data.batches drops the last partial batch

    def step(loss):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    with run:  # Ctrl-C, SIGTERM, errors: the last finished epoch is on disk
        for epoch in range(start_epoch, 0 if args.eval_only else args.epochs):
            gen = common.generator(args.seed, epoch, run.rank)  # augmentation: a stream per epoch and process; rank 0's shuffles
            totals = torch.zeros(len(terms), device=run.device)  # read once per epoch: no per-step sync
            if unlabeled is not None:  # STL-10's unlabeled split trains the instance head only (Sec. 4.1)
                for x, _, _ in run.progress(data.batches(unlabeled, None, args.batch_size, generator=gen, rank=run.rank,
                                                         world_size=run.world_size, device=run.device), epoch, epoch_steps):
                    x_a, x_b = aug.views(x, gen)
                    with autocast:
                        z_a, _ = net(x_a)
                        z_b, _ = net(x_b)
                    step(instance_loss(*common.gather(z_a, z_b), args.instance_temperature))
            for x, _, idx in run.progress(data.batches(images, None, args.batch_size, generator=gen, rank=run.rank,
                                                       world_size=run.world_size, device=run.device), epoch, epoch_steps, totals):
                x_a, x_b = aug.views(x, gen, ds.sizes[idx])
                with autocast:
                    z_a, p_a = net(x_a)  # two backbone calls, as the authors' code: BatchNorm statistics per view
                    z_b, p_b = net(x_b)
                losses = []
                if "instance" in terms:  # the global batch, with gradients
                    losses.append(instance_loss(*common.gather(z_a, z_b), args.instance_temperature))
                if "cluster" in terms:
                    losses.append(cluster_loss(*common.gather(p_a, p_b), args.cluster_temperature))
                losses = torch.stack(losses)
                step(losses.sum())  # Eq. (7)
                totals += losses.detach()
            run.epoch_done(epoch, totals, terms, lambda: evaluate(model, images, aug, run, ds.num_classes, args.seed))

    if run.is_main:
        pred, conf = evaluate(model, images, aug, run, ds.num_classes, args.seed)
        if args.export_features:  # what evaluate clusters: the cluster head's input, or k-means' features
            features = model.backbone if model.cluster_head is not None else lambda x: model.instance_head(model.backbone(x))
            common.export_features(run, features, model, images, aug.eval)
        run.finish(pred, conf)


if __name__ == "__main__":
    main()
