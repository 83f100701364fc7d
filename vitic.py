"""Vision Transformer for Image Clustering (ViT-IC).

Low. "Vision Transformer for Image Clustering". University of Maryland, College Park.
A small ViT with a convolutional stem embeds two augmented views of each image; an instance head
is trained with NT-Xent on the rows of the feature matrix and a cluster head with NT-Xent on its
columns (soft cluster assignments), plus an entropy term against collapse, as in Contrastive
Clustering. The cluster head's argmax is the clustering.

Paper versus the author's code (github.com/RyanLow/vitic), in one place:
- Instance features: the paper measures cosine similarity (Eq. 1-2), so they are L2-normalised
  (`--recipe paper`); the code feeds the raw projections to the loss, dot products over tau
  (`--recipe authors`; the published numbers came from the code).
- Augmentations: the paper names the operations only (Sec. 3.2: ResizedCrop, ColorJitter,
  Grayscale, GaussianBlur, HorizontalFlip, Solarize); the code's strengths are used by both recipes.
- STL-10: "both labeled and unlabeled images" (Sec. 4.2); the code shuffles the 100k unlabeled
  images into the training set with both losses; so does this script (evaluation: labeled only).
- Heads: the paper gives three fully-connected layers with 1344 hidden units (Sec. 4.1); the BN
  and ReLU after the two hidden layers are the code's.
- Initialisation (both recipes; the paper is silent): the code's ViT is MoCo v3's, initialised as
  MoCo v3 does: Q, K and V each Xavier over its own block of the fused qkv matrix, the other Linear
  layers Xavier, CLS token std 1e-6, the conv stem at torch's default; the heads at torch's default.
- Adam without weight decay: the code (the paper gives the constant learning rate only).
- The code blurs with PIL's radius = sigma, here a kernel of ~10% of the image (13 at 128 px).
- Images (both recipes): the code crops each view from the original image; here it is stored
  whole at its native size (squashed to S x S, the crop box drawn in the original's frame and
  read from the same part of the store, so a crop matches torchvision's of the original to about
  0.001 of the range on average; antialiased bilinear in torch, not PIL's). Only where the store
  would not fit in memory is S lowered, with a line saying so (`--storage-size`).
- Precision: the code trains in fp32, as `--recipe authors` does here (its unnormalised features
  can give logits in the hundreds, where bf16 rounding is coarse); `--recipe paper` uses bf16
  autocast on a GPU for speed (`--precision fp32` to match the code).

Usage: python vitic.py --dataset cifar10 --epochs 1000
       python vitic.py --dataset cifar10 --recipe authors   (unnormalised instance features, as the code)
       python vitic.py --image-size 32 --epochs 10 --batch-size 128   (quick look on digits, CPU)
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
from common import arg

# ---------------------------------------------------------------------------------------------
# Recipes, as data. ViT-IC paper, Sec. 3.2: two transforms drawn from ResizedCrop, ColorJitter,
# Grayscale, GaussianBlur, HorizontalFlip and Solarize, "similar to the setting in SimCLR", no
# strengths given: those of the author's code, BYOL-like views with blur p 0.8 on both and
# solarize on the second; ImageNet normalisation. The recipes differ in one setting only: whether
# the instance features are L2-normalised before the loss (the paper's cosine, Eq. 1; the code: not).
# ---------------------------------------------------------------------------------------------
VIEW_1 = data.View(crop=(0.08, 1.0), flip=0.5, jitter=(0.4, 0.4, 0.2, 0.1), p_jitter=0.8, p_grey=0.2, p_blur=0.8,
                   sigma=(0.1, 2.0), p_solarize=0.0, norm=data.IMAGENET)
VIEW_2 = dataclasses.replace(VIEW_1, p_solarize=0.2)
RECIPES = {"paper": {"views": (VIEW_1, VIEW_2), "normalize": True},
           "authors": {"views": (VIEW_1, VIEW_2), "normalize": False}}


def recipe(name, dataset=None):
    """The views and the instance-feature normalisation of `--recipe name` (the same for every dataset)."""
    return RECIPES[name]


@dataclass
class Args:
    dataset: str = arg("digits", "dataset name (cifar10, stl10, imagenet10, ...; see README) or a folder of images")
    data_root: str = arg("./data", "where named datasets live and decoded images are cached")
    cache_dir: str = arg(None, "where decoded images are cached (default: <data-root>/.cache); elsewhere when --data-root is read-only")
    num_clusters: int = arg(None, "number of clusters K (default: the dataset's number of classes)", type=int)
    image_size: int = arg(128, "input size, a multiple of 16 (128 px: 8x8 tokens): ViT-IC paper, Sec. 4.1")
    storage_size: int = arg(None, "side S of the cached images, each stored whole, squashed to S x S (None: the native "
                            "size, as the papers crop from the original image, less only where images x 3 x S^2 bytes "
                            "would not fit in half the host's free memory, or under --data-on-device yes a quarter of the "
                            "GPU's: a line then says so)", type=int)
    epochs: int = arg(1000, "training epochs: ViT-IC paper, Sec. 4.1")
    batch_size: int = arg(256, "global batch size: ViT-IC paper, Sec. 4.1")
    lr: float = arg(1e-3, "Adam learning rate, constant: ViT-IC paper, Sec. 4.1 (no weight decay: the author's code)")
    instance_temperature: float = arg(0.5, "tau_I of the instance loss: ViT-IC paper, Sec. 4.1")
    cluster_temperature: float = arg(1.0, "tau_C of the cluster loss: ViT-IC paper, Sec. 4.1")
    feature_dim: int = arg(128, "instance head output size: ViT-IC paper, Sec. 4.1")
    stl10_unlabeled: bool = arg(True, "STL-10 only: the 100k unlabeled images join the shuffled training set, trained with "
                                      "both losses (ViT-IC paper, Sec. 4.2: \"both labeled and unlabeled images\"; how: the "
                                      "author's code); evaluation uses the 13k labeled images")
    recipe: str = arg("paper", "paper: instance features L2-normalised (cosine similarity, Eq. 1-2); authors: not normalised, "
                      "as the author's code; the augmentations are the code's in both (Sec. 3.2 gives none)",
                      choices=list(RECIPES))
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
    run_name: str = arg(None, "run folder name (default: vitic-<dataset>-seed<seed>, numbered when taken)")
    max_images: int = arg(None, "train on a class-balanced subset of this many images (quick runs)", type=int)
    threads: int = arg(0, "CPU threads for torch (0: torch's default)")
    tensorboard: bool = arg(False, "also write every logged number to <run>/tensorboard/ (needs: pip install tensorboard)")
    export_features: bool = arg(False, "write features.npy beside assignments.csv: float16, one row per image in dataset order, "
                                       "the representation the clustering reads (the backbone's CLS token)")


def projection_head(width, hidden, out):
    """Three fully-connected layers, 1344 hidden units (ViT-IC paper, Sec. 4.1); the two hidden ones
    followed by BN and ReLU, as the author's code (modules/model.py; the paper does not say)."""
    return nn.Sequential(nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out))


class Network(nn.Module):
    """ViT backbone (conv stem, 8 blocks, width 288, 12 heads, sin-cos positions, CLS token; ViT-IC
    paper, Sec. 3.1 and 4.1; fixed positions and MoCo v3's init: the author's code), an instance
    head (3 layers, 1344 hidden, to 128) and a cluster
    head (the same to K, softmax). The instance features are L2-normalised inside instance_loss
    (cosine similarity, Eq. 1), unless --recipe authors (the author's code omits the normalisation)."""

    def __init__(self, num_clusters, image_size=128, feature_dim=128, hidden=1344):
        super().__init__()
        self.backbone = common.ViT(image_size, dim=288, depth=8, heads=12, stem="conv", positions="fixed")
        self.instance_head = projection_head(288, hidden, feature_dim)
        self.cluster_head = nn.Sequential(projection_head(288, hidden, num_clusters), nn.Softmax(dim=1))

    def forward(self, x):
        h = self.backbone(x)
        return self.instance_head(h), self.cluster_head(h)  # z (B, 128), p (B, K)


def instance_loss(z_a, z_b, temperature, normalize=True):
    """NT-Xent over the 2N augmented samples (ViT-IC paper, Sec. 3.3.1, Eq. 1-3).

    Each row's positive is its other view; the denominator holds the other 2N-1 rows. Eq. (2) as
    printed sums over all j, so it also counts the row's similarity with itself; we exclude it, as
    CC does (ViT-IC adopts CC's loss, and the CC authors confirmed the exclusion). normalize=False
    is the author's code: dot products of the raw features instead of the cosine of Eq. (1)."""
    z = torch.cat([z_a, z_b]).float()
    if normalize:
        z = F.normalize(z, dim=1)  # (2N, d): cosine similarity, Eq. (1)
    n = len(z_a)
    self_pairs = torch.eye(2 * n, dtype=torch.bool, device=z.device)  # dropped from Eq. (2)'s sum, as in CC
    sim = (z @ z.T / temperature).masked_fill(self_pairs, float("-inf"))
    positive = torch.arange(2 * n, device=z.device).roll(n)  # n..2n-1, then 0..n-1: made on the device, no host copy
    return F.cross_entropy(sim, positive)  # Eq. (2) per row, Eq. (3) mean over the 2N rows


def cluster_loss(p_a, p_b, temperature, eps=1e-8):
    """Cluster-level contrastive loss (ViT-IC paper, Sec. 3.3.2, Eq. 4-5).

    The K columns of the (N, K) soft assignments are the cluster representations: NT-Xent over the
    2K columns (Eq. 4, self excluded as above), plus log K - H(P) per view, where P is the batch's
    share of each cluster. The paper writes "- H(Y)" with H defined as sum P log P; minimising
    log K - H maximises the entropy, as the authors' code does. The clamp keeps value
    and gradient finite when a cluster gets no mass."""
    p_a, p_b = p_a.float(), p_b.float()
    contrastive = instance_loss(p_a.T, p_b.T, temperature)  # Eq. (4)-(5): same NT-Xent, on columns
    entropy = 0.0
    for p in (p_a, p_b):
        share = p.sum(dim=0) / p.sum()  # P(y_i) = sum_j Y_ji / ||Y||_1
        entropy = entropy + torch.log(torch.tensor(float(p.shape[1]))) + (share * torch.log(share.clamp_min(eps))).sum()  # -H(Y), Eq. (5)
    return contrastive + entropy  # Eq. (5)


def training_images(ds):
    """The images trained on and their originals' (height, width): the dataset's, and STL-10's
    unlabeled split when loaded, in one tensor that the batches shuffle together (the author's code
    concatenates the three splits). The unlabeled originals are 96 x 96 like the labeled ones."""
    if ds.unlabeled is None:
        return ds.images, ds.sizes
    return torch.cat([ds.images, ds.unlabeled]), torch.cat([ds.sizes, ds.sizes[:1].expand(len(ds.unlabeled), 2)])


def evaluate(model, images, aug, run):
    """Cluster = argmax of the cluster head on the deterministic eval view: the whole image resized."""
    model.eval()
    out = common.predict(lambda x: {"p": model.cluster_head(model.backbone(x))}, images, aug.eval, run)
    model.train()
    conf, pred = out["p"].max(dim=1)
    return pred, conf


def main(argv=None):
    args = common.parse_args(Args, argv, description=__doc__, method="vitic")
    common.check(args.image_size % 16 == 0, f"--image-size must be a multiple of 16 (the conv stem down-samples by 16), got {args.image_size}: use e.g. 32, 64 or 128")
    run = common.Run(args, "vitic")  # device, precision, rank; the run folder, made only when training starts
    ds = data.load_data(args, run, with_unlabeled=args.stl10_unlabeled and args.dataset == "stl10")
    settings = recipe(args.recipe)
    aug = data.Augmentation(settings["views"], args.image_size)
    model, net = common.prepare(Network(ds.num_classes, args.image_size, args.feature_dim), run,
                                channels_last=True, compile=args.compile)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=run.device.type == "cuda")  # no weight decay, constant rate
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype == torch.float16)  # fp16 only
    autocast = torch.autocast(run.device.type, dtype=run.dtype, enabled=run.dtype is not None)  # bf16/fp16 forward, fp32 losses
    start_epoch, _ = run.start("ViT-IC", ds, model, optimizer, scaler)  # --eval-only's or --resume's checkpoint, if any
    train_images, train_sizes = training_images(ds)  # STL-10: the labeled and unlabeled images, shuffled together
    ds.unlabeled = None  # held once, in train_images
    images = data.place_images(train_images, args.data_on_device, run)
    evaluated = images[:len(ds.images)]  # the labeled images, first in train_images (and on the GPU with them)
    epoch_steps = len(images) // args.batch_size  # data.batches drops the last partial batch

    with run:  # Ctrl-C, SIGTERM, errors: the last finished epoch is on disk
        for epoch in range(start_epoch, 0 if args.eval_only else args.epochs):
            gen = common.generator(args.seed, epoch, run.rank)  # augmentation: a stream per epoch and process; rank 0's shuffles
            totals = torch.zeros(2, device=run.device)  # read once per epoch: no per-step sync
            for x, _, idx in run.progress(data.batches(images, None, args.batch_size, generator=gen, rank=run.rank,
                                                       world_size=run.world_size, device=run.device), epoch, epoch_steps, totals):
                x_a, x_b = aug.views(x, gen, train_sizes[idx])
                with autocast:
                    z_a, p_a = net(x_a)  # two backbone calls, as the author's code: BatchNorm statistics per view
                    z_b, p_b = net(x_b)
                z_a, z_b, p_a, p_b = common.gather(z_a, z_b, p_a, p_b)  # the global batch, with gradients
                loss_instance = instance_loss(z_a, z_b, args.instance_temperature, settings["normalize"])
                loss_cluster = cluster_loss(p_a, p_b, args.cluster_temperature)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss_instance + loss_cluster).backward()  # Eq. (6)
                scaler.step(optimizer)
                scaler.update()
                totals += torch.stack([loss_instance.detach(), loss_cluster.detach()])
            run.epoch_done(epoch, totals, ["instance", "cluster"], lambda: evaluate(model, evaluated, aug, run))

    if run.is_main:
        pred, conf = evaluate(model, evaluated, aug, run)
        if args.export_features:  # the cluster head's input
            common.export_features(run, model.backbone, model, evaluated, aug.eval)
        run.finish(pred, conf)


if __name__ == "__main__":
    main()
