"""Vision Transformer for Contrastive Clustering (VTCC).

Ling, Zhu, Huang, Chen, Wang, Lai. "Vision Transformer for Contrastive Clustering". arXiv preprint.
A ViT-Small whose patch projection is a convolutional stem (four stride-2 3x3 convs, then a 1x1
conv) embeds two BYOL-style augmented views of each image; an instance projector is trained with
NT-Xent on the rows of the feature matrix and a cluster projector with NT-Xent on its columns
(soft cluster assignments), plus an entropy term against collapse. The cluster projector's argmax
is the clustering.

Paper versus the authors' code (github.com/JackKoLing/VTCC), in one place:
- Augmentations: the paper follows "the setting of data augmentations in BYOL" (Sec. III-A), whose
  second view blurs with p 0.1; the code blurs both views with p 1.0. `--recipe paper` is BYOL's,
  `--recipe authors` the code's (the published numbers came from the code).
- Projector hidden width: the paper says three-layer MLPs "following MoCo v3" without a width; the
  code's is 4 x the ViT width (768 tiny, 1536 small, 3072 base), used here for every --vit.
- Temperatures and the instance feature size are not in the paper; CC's values (the code's too).
- Adam without weight decay or schedule: the code (the paper: "initial learning rate of 0.0003").
- Initialisation (both recipes; the paper is silent): the code's ViT is MoCo v3's, initialised as
  MoCo v3 does: Q, K and V each Xavier over its own block of the fused qkv matrix, the other Linear
  layers Xavier, CLS token std 1e-6; the stem's convolutions at torch's default (the code has no
  patchify variant; Table V's patchify stem here keeps the same rule); the heads at torch's default.
- The code blurs with PIL's radius = sigma, here a kernel of ~10% of the image (23 at 224 px).
- Images (both recipes): the code crops each view from the original image; here it is stored
  whole at its native size (squashed to S x S, the crop box drawn in the original's frame and
  read from the same part of the store, so a crop matches torchvision's of the original to about
  0.001 of the range on average; antialiased bilinear in torch, not PIL's). Only where the store
  would not fit in memory is S lowered, with a line saying so (`--storage-size`).
- Precision: the code trains in fp32, as `--recipe authors` does here; `--recipe paper` uses bf16
  autocast on a GPU for speed (`--precision fp32` to match the code).

Usage: python vtcc.py --dataset rsod --epochs 1000
       python vtcc.py --dataset rsod --recipe authors     (the authors' augmentations)
       python vtcc.py --image-size 32 --epochs 10 --batch-size 128   (quick look on digits, CPU)
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
from common import arg

VITS = {"tiny": (192, 4), "small": (384, 8), "base": (768, 12)}  # width, blocks (VTCC paper, Table VI; 12 heads each)

# ---------------------------------------------------------------------------------------------
# Augmentation recipes, as data. VTCC paper, Sec. III-A: "we follow the setting of data
# augmentations in BYOL": two asymmetric views, RandomResizedCrop 0.08-1, ColorJitter(0.4, 0.4,
# 0.2, 0.1) p 0.8, grayscale p 0.2, Gaussian blur sigma U(0.1, 2) (p 1.0 / 0.1), solarize (p 0 /
# 0.2), flip, ImageNet normalisation. The authors' code blurs both views with p 1.0.
# ---------------------------------------------------------------------------------------------
BYOL_1 = data.View(crop=(0.08, 1.0), flip=0.5, jitter=(0.4, 0.4, 0.2, 0.1), p_jitter=0.8, p_grey=0.2, p_blur=1.0,
                   sigma=(0.1, 2.0), p_solarize=0.0, norm=data.IMAGENET)
BYOL_2 = dataclasses.replace(BYOL_1, p_blur=0.1, p_solarize=0.2)
RECIPES = {"paper": (BYOL_1, BYOL_2), "authors": (BYOL_1, dataclasses.replace(BYOL_2, p_blur=1.0))}


def recipe(name, dataset=None):
    """The two views of `--recipe name` (the same for every dataset)."""
    return {"views": RECIPES[name]}


@dataclass
class Args:
    dataset: str = arg("digits", "dataset name (rsod, ucmerced, aid, dtd, ...; see README) or a folder of images")
    data_root: str = arg("./data", "where named datasets live and decoded images are cached")
    cache_dir: str = arg(None, "where decoded images are cached (default: <data-root>/.cache); elsewhere when --data-root is read-only")
    num_clusters: int = arg(None, "number of clusters K (default: the dataset's number of classes)", type=int)
    image_size: int = arg(224, "input size, a multiple of 16 (tokens = (size/16)^2): VTCC paper, Sec. III-A, 224x224")
    storage_size: int = arg(None, "side S of the cached images, each stored whole, squashed to S x S (None: the native "
                            "size, as the papers crop from the original image, less only where images x 3 x S^2 bytes "
                            "would not fit in half the host's free memory, or under --data-on-device yes a quarter of the "
                            "GPU's: a line then says so)", type=int)
    epochs: int = arg(1000, "training epochs: VTCC paper, Sec. III-A")
    batch_size: int = arg(128, "global batch size: VTCC paper, Sec. III-A")
    lr: float = arg(3e-4, "Adam learning rate: VTCC paper, Sec. III-A (no weight decay or schedule: the authors' code)")
    instance_temperature: float = arg(0.5, "tau_I, Eq. (3)-(4): the VTCC paper gives no value; the authors' code's (CC's, whose losses VTCC adopts)")
    cluster_temperature: float = arg(1.0, "tau_C, Eq. (7)-(8): the VTCC paper gives no value; the authors' code's (CC's, whose losses VTCC adopts)")
    feature_dim: int = arg(128, "instance projector output size: not given in the VTCC paper; the authors' code's (CC's value)")
    vit: str = arg("small", "ViT size: VTCC paper uses ViT-Small, 384 wide, 8 blocks (Sec. III-A); Table VI compares "
                   "tiny (192, 4 blocks), small and base (768, 12 blocks), all 12 heads", choices=list(VITS))
    stem: str = arg("conv", "patch projection: conv stem, VTCC paper, Sec. II-B1; Table V compares the 16x16 patchify stem",
                    choices=["conv", "patchify"])
    recipe: str = arg("paper", "augmentation recipe: paper = BYOL's asymmetric views (Sec. III-A; blur p 1.0 / 0.1); "
                      "authors = the authors' code, blur p 1.0 on both views", choices=list(RECIPES))
    heads: str = arg("both", "projectors trained: both, Eq. (12); Table VII trains one only (instance: clusters by "
                     "k-means on its features)", choices=["both", "instance", "cluster"])
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
    run_name: str = arg(None, "run folder name (default: vtcc-<dataset>-seed<seed>, numbered when taken)")
    max_images: int = arg(None, "train on a class-balanced subset of this many images (quick runs)", type=int)
    threads: int = arg(0, "CPU threads for torch (0: torch's default)")
    tensorboard: bool = arg(False, "also write every logged number to <run>/tensorboard/ (needs: pip install tensorboard)")
    export_features: bool = arg(False, "write features.npy beside assignments.csv: float16, one row per image in dataset order, "
                                       "the representation the clustering reads (the backbone's CLS token; with --heads instance the instance projector's)")


def projector(width, out):
    """Three-layer MLP as in MoCo v3 (VTCC paper, Sec. III-A): Linear-BN-ReLU twice, then Linear.
    The paper gives no hidden width; the authors' network uses 4 x the ViT width (1536 for ViT-Small),
    so Table VI's tiny and base run as they were run."""
    hidden = 4 * width
    return nn.Sequential(nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out))


class Network(nn.Module):
    """ViT backbone with the convolutional stem, giving the CLS token after the final norm (VTCC paper,
    Sec. II-B, Fig. 1; its fixed 2-D sin-cos positions and MoCo v3's init: the authors' code, the
    paper names neither), an instance projector (to the row space) and a cluster projector (to K,
    softmax). A projector left out (Table VII) is None."""

    def __init__(self, num_clusters, image_size=224, vit="small", stem="conv", feature_dim=128, heads="both"):
        super().__init__()
        width, depth = VITS[vit]
        self.backbone = common.ViT(image_size, width, depth, heads=12, stem=stem, positions="fixed")
        self.instance_head = projector(width, feature_dim) if heads != "cluster" else None
        self.cluster_head = nn.Sequential(projector(width, num_clusters), nn.Softmax(dim=1)) if heads != "instance" else None

    def forward(self, x):
        h = self.backbone(x)  # (B, width)
        z = self.instance_head(h) if self.instance_head is not None else None
        p = self.cluster_head(h) if self.cluster_head is not None else None
        return z, p  # z (B, 128), p (B, K)


def instance_loss(z_a, z_b, temperature):
    """Instance-level contrastive loss over the 2N augmented samples (VTCC paper, Sec. II-C1, Eq. 1-5).

    Each row's positive is its other view. Eq. (3)-(4) as printed sum over j != i in both terms,
    which would also drop the positive from the denominator; we follow CC, the paper they cite:
    only self is excluded."""
    z = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)  # (2N, d): cosine similarity, Eq. (1)
    n = len(z_a)
    sim = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positive = torch.arange(2 * n, device=z.device).roll(n)  # n..2n-1, then 0..n-1: made on the device, no host copy
    return F.cross_entropy(sim, positive)  # Eq. (3)-(4) per row, Eq. (2) and (5): sum over both views / 2N


def cluster_loss(p_a, p_b, temperature, eps=1e-8):
    """Cluster-level contrastive loss (VTCC paper, Sec. II-C2, Eq. 6-11).

    The K columns of the (N, K) soft assignments are the cluster representations: NT-Xent over the
    2K columns (Eq. 6-8), minus the entropy of the batch's share of each cluster, per view (Eq. 9-10).
    log K is added per view so the term stays non-negative (the authors' code). Eq. (11)
    divides by the column's own L1 norm, which would make every share 1; the share is the column sum
    over the whole matrix's sum, as in CC. The clamp keeps value and gradient finite when a cluster
    gets no mass."""
    p_a, p_b = p_a.float(), p_b.float()
    contrastive = instance_loss(p_a.T, p_b.T, temperature)  # Eq. (6)-(8), and the 1/2K mean of Eq. (9)
    entropy = 0.0
    for p in (p_a, p_b):
        share = p.sum(dim=0) / p.sum()  # Eq. (11)
        entropy = entropy + torch.log(torch.tensor(float(p.shape[1]))) + (share * torch.log(share.clamp_min(eps))).sum()  # Eq. (10)
    return contrastive + entropy  # Eq. (9)


def evaluate(model, images, aug, run, num_clusters, seed):
    """Cluster = argmax of the cluster projector on the deterministic eval view (the whole image resized); without a
    cluster projector, k-means on the instance projector's features (VTCC paper, Sec. III-D3)."""
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
    args = common.parse_args(Args, argv, description=__doc__, method="vtcc")
    common.check(args.image_size % 16 == 0 and args.image_size >= 16,
                 f"--image-size {args.image_size} is not a multiple of 16 (the ViT stem down-samples by 16): use e.g. 32, 64, 128 or 224")
    run = common.Run(args, "vtcc")  # device, precision, rank; the run folder, made only when training starts
    ds = data.load_data(args, run)
    aug = data.Augmentation(recipe(args.recipe)["views"], args.image_size)
    model, net = common.prepare(Network(ds.num_classes, args.image_size, args.vit, args.stem, args.feature_dim, args.heads),
                                run, channels_last=True, compile=args.compile)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=run.device.type == "cuda")  # no weight decay, constant rate
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype == torch.float16)  # fp16 only
    autocast = torch.autocast(run.device.type, dtype=run.dtype, enabled=run.dtype is not None)  # bf16/fp16 forward, fp32 losses
    start_epoch, _ = run.start("VTCC", ds, model, optimizer, scaler, same=("heads", "vit", "stem"))  # --eval-only's or --resume's
    images = data.place_images(ds.images, args.data_on_device, run)
    terms = [t for t in ("instance", "cluster") if args.heads in ("both", t)]
    epoch_steps = len(images) // args.batch_size  # data.batches drops the last partial batch

    with run:  # Ctrl-C, SIGTERM, errors: the last finished epoch is on disk
        for epoch in range(start_epoch, 0 if args.eval_only else args.epochs):
            gen = common.generator(args.seed, epoch, run.rank)  # augmentation: a stream per epoch and process; rank 0's shuffles
            totals = torch.zeros(len(terms), device=run.device)  # read once per epoch: no per-step sync
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
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(losses.sum()).backward()  # Eq. (12)
                scaler.step(optimizer)
                scaler.update()
                totals += losses.detach()
            run.epoch_done(epoch, totals, terms, lambda: evaluate(model, images, aug, run, ds.num_classes, args.seed))

    if run.is_main:
        pred, conf = evaluate(model, images, aug, run, ds.num_classes, args.seed)
        if args.export_features:  # what evaluate clusters: the cluster projector's input, or k-means' features
            features = model.backbone if model.cluster_head is not None else lambda x: model.instance_head(model.backbone(x))
            common.export_features(run, features, model, images, aug.eval)
        run.finish(pred, conf)


if __name__ == "__main__":
    main()
