"""Deep Clustering model based on Semantic Consistency (DCSC).

Zhang, Li, Hua, Dong, Lim. "Improved deep clustering model based on semantic consistency for image
clustering". Knowledge-Based Systems 253, 2022.
A ResNet34 embeds two augmented views of each image; four heads read its feature: an instance head
(Fproj) trained with NT-Xent on the rows of the feature matrix (FLC), a cluster head (Cproj) trained
with NT-Xent on the columns of its soft assignments (CLC) plus an entropy regulariser (CR), and an
asymmetric semantic branch, a projector (Sproj) and a predictor (Spred) over K_s over-clusters,
contrasted across views (SLC). The cluster head's argmax is the clustering.

Paper versus the authors' code, in one place: the DCSC authors published no code, so everything here
is read from the paper. Where it is silent or ambiguous:
- Augmentations: "the same augmentation strategy ... used in [21, 35]" (Sec. 4.2), i.e. CC's, whose
  public code fixes the strengths; `--recipe paper` and `--recipe authors` are that one recipe.
- s(p, q) of Eq. (3.4) is "the Jensen-Shannon divergence or KL divergence" (Sec. 3.1): used as a
  similarity, s = -JS(p, q) (default) or s = -KL(p || q); cosine is kept as an option.
- STL-10: the unlabeled 100k images train Fproj (FLC) in a pass of their own, as CC does; the paper
  does not say so, but its 120 GPU-hours for STL-10 against 55 for CIFAR-10 imply them.
- CR's printed sign (Eq. 3.6) would minimise the entropy; this script maximises it (see cr_loss).
- Images (both recipes): CC's code (the recipe taken) crops each view from the original image; here it is stored
  whole at its native size (squashed to S x S, the crop box drawn in the original's frame and
  read from the same part of the store, so a crop matches torchvision's of the original to about
  0.001 of the range on average; antialiased bilinear in torch, not PIL's). Only where the store
  would not fit in memory is S lowered, with a line saying so (`--storage-size`).
- Precision: the paper does not say; `--recipe authors` trains in fp32, as CC's code whose recipe
  it takes, and `--recipe paper` in bf16 autocast on a GPU for speed (`--precision fp32` to match).

Usage: python dcsc.py --dataset cifar10 --epochs 1000
       python dcsc.py --dataset cifar10 --ablate slc      (Table 2: k-means on Fproj's features)
       python dcsc.py --image-size 32 --epochs 10 --batch-size 128   (quick look on digits, CPU)
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common
import data
from common import arg

# ---------------------------------------------------------------------------------------------
# Augmentation recipe, as data. DCSC paper, Sec. 4.2: "the same augmentation strategy and backbone
# encoder used in [21, 35]" (CC and SimCLR): ResizedCrop, HorizontalFlip, ColorJitter, Grayscale
# or GaussianBlur. That is CC's recipe (CC paper, Sec. 3.1 and 4.1.2), with the strengths of CC's
# public code: colour strength s per dataset, no blur on the small-image datasets.
# ---------------------------------------------------------------------------------------------
NO_BLUR = ("digits", "cifar10", "cifar100", "stl10", "tiny-imagenet")  # up-scaled images are blurred already
HALF_STRENGTH = ("cifar10", "cifar100", "tiny-imagenet")  # CC's s = 0.5


def recipe(name, dataset):
    """The two views of `--recipe name` for `dataset` (a dataset name, or a folder's name). DCSC has
    no public code: "paper" and "authors" are one recipe, CC's."""
    s = 0.5 if dataset in HALF_STRENGTH else 1.0
    view = data.View(crop=(0.08, 1.0), flip=0.5, jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), p_jitter=0.8, p_grey=0.2,
                     p_blur=0.0 if dataset in NO_BLUR else 0.5, sigma=(0.1, 2.0), p_solarize=0.0,
                     norm=None)  # inputs stay in [0, 1], as CC's
    return {"views": (view, view)}


@dataclass
class Args:
    dataset: str = arg("digits", "dataset name (cifar10, stl10, imagenet10, ...; see README) or a folder of images")
    data_root: str = arg("./data", "where named datasets live and decoded images are cached")
    cache_dir: str = arg(None, "where decoded images are cached (default: <data-root>/.cache); elsewhere when --data-root is read-only")
    num_clusters: int = arg(None, "number of clusters K (default: the dataset's number of classes)", type=int)
    image_size: int = arg(224, "input size: DCSC paper, Sec. 4.2, every image resized to 224x224")
    storage_size: int = arg(None, "side S of the cached images, each stored whole, squashed to S x S (None: the native "
                            "size, as the papers crop from the original image, less only where images x 3 x S^2 bytes "
                            "would not fit in half the host's free memory, or under --data-on-device yes a quarter of the "
                            "GPU's: a line then says so)", type=int)
    epochs: int = arg(1000, "training epochs: DCSC paper, Sec. 4.2")
    batch_size: int = arg(256, "global batch size: DCSC paper, Sec. 4.2")
    lr: float = arg(3e-4, "Adam learning rate: DCSC paper, Sec. 4.2; no weight decay or schedule (the paper names none; CC's setting)")
    instance_temperature: float = arg(0.2, "tau_FLC of the feature-level loss: DCSC paper, Sec. 4.2")
    cluster_temperature: float = arg(1.0, "tau_CLC of the cluster-level loss: DCSC paper, Sec. 4.2")
    semantic_temperature: float = arg(1.0, "tau_SLC of the semantic-level loss: DCSC paper, Sec. 4.2")
    cr_weight: float = arg(1.0, "lambda, the weight of the clustering regulariser in Eq. (3.7): DCSC paper, Sec. 4.2")
    feature_dim: int = arg(128, "instance head (Fproj) output size: DCSC paper, Sec. 4.2")
    overcluster: int = arg(None, "K_s, the semantic head's number of over-clusters (default 70, 700 for tiny-imagenet): "
                                 "DCSC paper, Sec. 4.2", type=int)
    slc_similarity: str = arg("js", "s(p, q) in Eq. (3.4), DCSC paper, Sec. 3.1: \"the Jensen-Shannon divergence or KL "
                                    "divergence\" of the two distributions, as a similarity: js = -JS(p, q), kl = "
                                    "-KL(p || q); cosine = the cosine of the two probability vectors",
                              choices=["js", "kl", "cosine"])
    ablate: str = arg(None, "remove one part, as the rows of DCSC Tables 2-4: flc, clc (with CR), slc, predictor (Spred), "
                            "bn (BN in every head); without clc or slc, k-means on Fproj's features gives the clusters "
                            "(Sec. 4.4.1)", type=str, choices=["flc", "clc", "slc", "predictor", "bn"])
    stl10_unlabeled: bool = arg(True, "STL-10 only: also train Fproj (FLC) on the 100k unlabeled images, as CC does; the "
                                      "paper's 120 GPU-hours for STL-10 against 55 for CIFAR-10 (Sec. 4.2) imply them")
    recipe: str = arg("paper", "augmentation recipe: paper (CC's, Sec. 4.2) or authors; DCSC has no public code, so both "
                      "give the same views", choices=["paper", "authors"])
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
    run_name: str = arg(None, "run folder name (default: dcsc-<dataset>-seed<seed>, numbered when taken)")
    max_images: int = arg(None, "train on a class-balanced subset of this many images (quick runs)", type=int)
    threads: int = arg(0, "CPU threads for torch (0: torch's default)")
    tensorboard: bool = arg(False, "also write every logged number to <run>/tensorboard/ (needs: pip install tensorboard)")
    export_features: bool = arg(False, "write features.npy beside assignments.csv: float16, one row per image in dataset order, "
                                       "the representation the clustering reads (the backbone output; with --ablate clc or slc the instance head's)")


def mlp(d_in, d_hidden, d_out, bn=True):
    """Linear -> BN -> ReLU -> Linear, every DCSC head (paper, Fig. 1(b))."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.BatchNorm1d(d_hidden) if bn else nn.Identity(), nn.ReLU(),
                         nn.Linear(d_hidden, d_out))


class Network(nn.Module):
    """ResNet34 with the fc layer removed (DCSC paper, Sec. 4.2) and four heads on its feature h
    (Sec. 3, Fig. 1): Fproj (instance_head), Cproj (cluster_head, softmax over K), Sproj
    (semantic_head, K_s logits) and Spred (predictor, on Sproj's logits: the asymmetric branch).
    predictor=False is Table 4's "w/o Spred" (both branches are Sproj); bn=False is Table 3's "No"."""

    def __init__(self, num_clusters, image_size=224, feature_dim=128, overcluster=70, predictor=True, bn=True):
        super().__init__()
        self.backbone = torchvision.models.resnet34(weights=None)  # random init (Sec. 4.2: not pre-trained)
        width = self.backbone.fc.in_features  # 512
        self.backbone.fc = nn.Identity()
        self.instance_head = mlp(width, width, feature_dim, bn)
        self.cluster_head = nn.Sequential(mlp(width, width, num_clusters, bn), nn.Softmax(dim=1))
        self.semantic_head = mlp(width, width, overcluster, bn)
        # paper: the predictor's hidden width is not given; here: 512, the width of the other heads
        self.predictor = mlp(overcluster, width, overcluster, bn) if predictor else nn.Identity()

    def forward(self, x):
        h = self.backbone(x)
        s = self.semantic_head(h)  # (B, K_s) logits
        # z (B, 128), c (B, K), p = Spred's probabilities, q = Sproj's probabilities (B, K_s)
        return self.instance_head(h), self.cluster_head(h), self.predictor(s).softmax(dim=1), s.softmax(dim=1)


def flc_loss(z_a, z_b, temperature):
    """Feature-level contrastive loss: NT-Xent over the 2N augmented samples (DCSC paper, Eq. 3.1-3.2).

    Each row's positive is its other view. Eq. (3.1) as printed sums j over all N, the row itself
    included; the denominator here holds the other 2N-1 rows (self excluded, as in CC, whose code DCSC builds on)."""
    z = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)  # (2N, d): s = cosine similarity
    n = len(z_a)
    sim = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positive = torch.arange(2 * n, device=z.device).roll(n)  # n..2n-1, then 0..n-1: made on the device, no host copy
    return F.cross_entropy(sim, positive)  # Eq. (3.1) per row, Eq. (3.2) mean over the 2N rows


def clc_loss(c_a, c_b, temperature):
    """Cluster-level contrastive loss (DCSC paper, Eq. 3.3): the K columns of the (N, K) soft
    assignments are the cluster representations, NT-Xent over the 2K columns, each column's
    denominator its 2K-1 others, mean over the 2K columns (CC's cluster loss without its entropy
    term; the print gives the b-column term column j's denominator, a typo)."""
    return flc_loss(c_a.float().T, c_b.float().T, temperature)  # same NT-Xent, on columns


def pairwise_similarity(p, q, kind, eps=1e-8):
    """(N, K) x (M, K) probability rows -> (N, M) similarities s(p_i, q_j) of Eq. (3.4); the clamps
    keep values and gradients finite where a probability is 0."""
    if kind == "cosine":
        return F.normalize(p, dim=1) @ F.normalize(q, dim=1).T
    if kind == "kl":  # -KL(p || q) = sum_k p log q - sum_k p log p
        return p @ torch.log(q.clamp_min(eps)).T - (p * torch.log(p.clamp_min(eps))).sum(dim=1, keepdim=True)
    if kind == "js":  # -JS(p, q) = H(m) - (H(p) + H(q)) / 2 with m = (p + q) / 2
        entropy = lambda x: -(x * torch.log(x.clamp_min(eps))).sum(dim=-1)
        m = (p[:, None] + q[None]) / 2  # (N, M, K)
        return -(entropy(m) - (entropy(p)[:, None] + entropy(q)[None]) / 2)
    raise ValueError(f"unknown similarity {kind!r}: use js, kl or cosine")


def slc_loss(p_a, q_a, p_b, q_b, temperature, similarity="js"):
    """Semantic-level contrastive loss (DCSC paper, Eq. 3.4-3.5), transcribed literally.

    p = the predictor's probabilities, q = the semantic head's, per view. For instance i, view a:
    positive s(p_i^a, q_i^b); denominator sum_j [exp s(p_i^a, q_j^a) + exp s(p_j^a, q_i^b)], j over
    all N (the positive included); then the same with a and b swapped. No stop-gradient."""
    p_a, q_a, p_b, q_b = p_a.float(), q_a.float(), p_b.float(), q_b.float()
    n = len(p_a)
    target = torch.arange(n, 2 * n, device=p_a.device)  # the positive sits at j = i of the second block
    loss = 0.0
    for p, q, q_other in ((p_a, q_a, q_b), (p_b, q_b, q_a)):
        # row i: [s(p_i, q_j) for j] then [s(p_j, q_other_i) for j]; Eq. (3.4)
        logits = torch.cat([pairwise_similarity(p, q, similarity), pairwise_similarity(p, q_other, similarity).T], dim=1)
        loss = loss + F.cross_entropy(logits / temperature, target, reduction="sum")
    return loss / (2 * n)  # Eq. (3.5)


def cr_loss(c_a, c_b, eps=1e-8):
    """Clustering regulariser (DCSC paper, Eq. 3.6): per view, log K - H(P), with P the batch's
    share of each cluster. The printed sign would minimise the entropy and favour collapse, against
    its stated aim; this is the entropy term of CC's cluster loss, which maximises it. The
    log K constant only keeps the value >= 0; the clamp keeps value and gradient finite at P = 0."""
    loss = 0.0
    for c in (c_a.float(), c_b.float()):
        share = c.mean(dim=0)  # p(c^t)_j = sum_i c_ij / N
        loss = loss + math.log(c.shape[1]) + (share * torch.log(share.clamp_min(eps))).sum()  # Eq. (3.6)
    return loss


def evaluate(model, images, aug, run, kmeans_clusters=None, seed=1):
    """Cluster = argmax of the cluster head on the deterministic eval view (the whole image resized); without the
    cluster- or the semantic-level loss, k-means on the instance head's features (DCSC paper, Sec. 4.4.1)."""
    model.eval()
    head = model.cluster_head if kmeans_clusters is None else model.instance_head
    out = common.predict(lambda x: {"y": head(model.backbone(x))}, images, aug.eval, run)
    model.train()
    if kmeans_clusters is not None:
        return common.kmeans(out["y"], kmeans_clusters, seed)
    conf, pred = out["y"].max(dim=1)
    return pred, conf


def main(argv=None):
    args = common.parse_args(Args, argv, description=__doc__, method="dcsc")
    common.check(args.overcluster is None or args.overcluster >= 2, f"--overcluster must be at least 2, got {args.overcluster}")
    run = common.Run(args, "dcsc")  # device, precision, rank; the run folder, made only when training starts
    use = {part: args.ablate != part for part in ("flc", "clc", "slc")}
    ds = data.load_data(args, run, with_unlabeled=args.stl10_unlabeled and args.dataset == "stl10" and use["flc"])
    aug = data.Augmentation(recipe(args.recipe, ds.name)["views"], args.image_size)
    unlabeled = ds.unlabeled  # None but for STL-10
    overcluster = args.overcluster or (700 if ds.name == "tiny-imagenet" else 70)  # Sec. 4.2
    # Sec. 4.4.1: "K-means is performed ... in the embedding feature space ... after removing the CLC/SLC loss"
    kmeans_clusters = ds.num_classes if args.ablate in ("clc", "slc") else None
    model, net = common.prepare(Network(ds.num_classes, args.image_size, args.feature_dim, overcluster,
                                        predictor=args.ablate != "predictor", bn=args.ablate != "bn"), run,
                                channels_last=True, compile=args.compile, find_unused=not all(use.values()) or unlabeled is not None)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=run.device.type == "cuda")  # no weight decay, constant rate
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype == torch.float16)  # fp16 only
    autocast = torch.autocast(run.device.type, dtype=run.dtype, enabled=run.dtype is not None)  # bf16/fp16 forward, fp32 losses
    start_epoch, _ = run.start("DCSC" + (f" w/o {args.ablate}" if args.ablate else ""), ds, model, optimizer, scaler)
    images = data.place_images(ds.images, args.data_on_device, run)
    zero = torch.zeros((), device=run.device)
    epoch_steps = sum(len(x) // args.batch_size for x in (images, unlabeled) if x is not None)  # data.batches drops the last partial batch

    def step(loss):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    with run:  # Ctrl-C, SIGTERM, errors: the last finished epoch is on disk
        for epoch in range(start_epoch, 0 if args.eval_only else args.epochs):
            gen = common.generator(args.seed, epoch, run.rank)  # augmentation: a stream per epoch and process; rank 0's shuffles
            totals = torch.zeros(4, device=run.device)  # read once per epoch: no per-step sync
            if unlabeled is not None:  # STL-10's unlabeled split trains Fproj only, as in CC
                for x, _, _ in run.progress(data.batches(unlabeled, None, args.batch_size, generator=gen, rank=run.rank,
                                                         world_size=run.world_size, device=run.device), epoch, epoch_steps):
                    x_a, x_b = aug.views(x, gen)
                    with autocast:
                        z_a = net(x_a)[0]
                        z_b = net(x_b)[0]
                    step(flc_loss(*common.gather(z_a, z_b), args.instance_temperature))
            for x, _, idx in run.progress(data.batches(images, None, args.batch_size, generator=gen, rank=run.rank, world_size=run.world_size,
                                                       device=run.device), epoch, epoch_steps, totals, weights=[1, 1, 1, args.cr_weight]):
                x_a, x_b = aug.views(x, gen, ds.sizes[idx])
                with autocast:
                    z_a, c_a, p_a, q_a = net(x_a)  # two backbone calls, as CC's code: BatchNorm statistics per view
                    z_b, c_b, p_b, q_b = net(x_b)
                z_a, z_b, c_a, c_b, p_a, p_b, q_a, q_b = common.gather(z_a, z_b, c_a, c_b, p_a, p_b, q_a, q_b)
                loss_flc = flc_loss(z_a, z_b, args.instance_temperature) if use["flc"] else zero
                loss_clc = clc_loss(c_a, c_b, args.cluster_temperature) if use["clc"] else zero
                loss_slc = slc_loss(p_a, q_a, p_b, q_b, args.semantic_temperature, args.slc_similarity) if use["slc"] else zero
                loss_cr = cr_loss(c_a, c_b) if use["clc"] else zero  # CR regularises Cproj: it goes with CLC
                step(loss_flc + loss_clc + loss_slc + args.cr_weight * loss_cr)  # Eq. (3.7)
                totals += torch.stack([loss_flc.detach(), loss_clc.detach(), loss_slc.detach(), loss_cr.detach()])
            run.epoch_done(epoch, totals, ["flc", "clc", "slc", "cr"], lambda: evaluate(model, images, aug, run, kmeans_clusters, args.seed),
                           weights=[1, 1, 1, args.cr_weight])

    if run.is_main:
        pred, conf = evaluate(model, images, aug, run, kmeans_clusters, args.seed)
        if args.export_features:  # what evaluate clusters: the cluster head's input, or k-means' features
            features = model.backbone if kmeans_clusters is None else lambda x: model.instance_head(model.backbone(x))
            common.export_features(run, features, model, images, aug.eval)
        run.finish(pred, conf)


if __name__ == "__main__":
    main()
