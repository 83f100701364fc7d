"""Partial Information discrimination and Cross-level Interaction (PICI).

Zhang, Huang, Ling, Zhang, Sun, Wen. "Learning Representations for Clustering via Partial Information
Discrimination and Cross-Level Interaction". 2024 (code: github.com/Regan-Zhang/PICI).
A masked auto-encoder (ViT-Small encoder, 8-block decoder) sees a weak and a strong view of each
image with half of the patches removed. Three stages (Algorithm 1): pre-train the auto-encoder on
reconstruction (PISD); then add CC's instance and cluster contrastive losses on the CLS token (PICD);
then boost with PICD plus a cross-entropy from k-means pseudo-labels of the instance features to the
cluster head (CLI). The cluster head's argmax on the unmasked weak view is the clustering.

Paper versus the authors' code (github.com/Regan-Zhang/PICI), in one place. `--recipe paper` (the
default) trains as the paper is written; `--recipe authors` as the code's training script did, the
code that produced the published numbers; the parts (RECIPES below lists them as data):
- Augmentations: paper, view a weak (resize and normalise only), view b strong (ResizedCrop,
  ColorJitter, Grayscale, HorizontalFlip, GaussianBlur; Sec. 3.1, 4.1), strengths not given: the
  code's weak/strong transform (BYOL's first view). Authors: two strong BYOL views, the second
  with solarize p 0.2.
- Position embeddings: paper, learnable 1-D (Sec. 3.2.1), started here from sin-cos; authors,
  fixed sin-cos in encoder and decoder.
- CLI pseudo-labels: paper, k-means on each view's instance features (Eq. 12-13), matched to that
  view's cluster assignments over the dataset (Eq. 14), every boosting epoch (Algorithm 1, line 14),
  the features of unmasked inputs, k-means with 10 inits (the paper gives no number). Authors: once,
  at the first boosting epoch; the features of the two training views with half of the patches
  masked, min-max scaled within each loader batch; k-means with 100 inits; the pseudo-labels
  renamed to the head's argmax batch by batch in every step, with the code's tie rule (a D x D
  count matrix, D = the largest label present + 1, minimising max - count; the paper's K x K
  maximisation finds the same total agreement but may break ties otherwise).
- Boosting order: paper, reshuffled every epoch as in the other stages (Algorithm 1 says no
  more), every image pseudo-labelled.
  Authors: one random order drawn once, batches of --batch-size (96) with the last partial batch
  dropped, the same batches every boosting epoch; k-means labels only the images that order
  batches, so the last N mod 96 (16 on RSOD, AID and Chaoyang, 84 on UC Merced) are neither
  clustered nor trained on while boosting. Their order comes from the seed (theirs from torch's
  global generator).
- CLI loss: paper, cross-entropy of the softmax probabilities (Eq. 15); authors, torch's
  CrossEntropyLoss on those probabilities, so a second softmax.
- Initialisation (both recipes; the paper is silent): MAE's, as the code. Linear layers Xavier
  (fused qkv as one matrix), the 16x16 patch embedding Xavier over its flattened kernel, CLS and
  mask tokens std 0.02; the heads keep torch's default.
- Not copied from the code (evaluation stays the paper's under both recipes): the code masks half
  of the patches at test time too (the paper does not, Sec. 4.1); and it evaluates ground-truth ACC
  after every boosting epoch and keeps the checkpoint with the best ACC (train_pici.py), so the
  published numbers may be the best of the 50 boosting epochs, chosen with the labels. Here every
  boosting epoch's NMI / ACC / ARI is in log.jsonl (the spread that selection picked from), and
  final.json reports the last epoch.
- Also not copied: the code blurs with PIL's radius = sigma, here a kernel of ~10% of the image
  (23 at 224 px). The checkpoint keeps the pseudo-labels, so a run resumed during boosting under
  `--recipe authors` goes on with those it computed.
- Images (both recipes): the code crops each view from the original image; here it is stored
  whole at its native size (squashed to S x S, the crop box drawn in the original's frame and
  read from the same part of the store, so a crop matches torchvision's of the original to about
  0.001 of the range on average; antialiased bilinear in torch, not PIL's). Only where the store
  would not fit in memory is S lowered, with a line saying so (`--storage-size`).
- Precision: the code trains in fp32, as `--recipe authors` does here; `--recipe paper` uses bf16
  autocast on a GPU for speed (`--precision fp32` to match the code).

Usage: python pici.py --dataset ucmerced --epochs 1050
       python pici.py --dataset ucmerced --recipe authors     (as the authors' training script: see above)
       python pici.py --image-size 32 --epochs 3 --batch-size 96   (quick look on digits, CPU: one epoch per stage)
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

import common
import data
from common import arg

VITS = {"tiny": (192, 4), "small": (384, 6), "base": (768, 12)}  # width, blocks (PICI paper, Table 5; 12 heads each)
STAGES = {"pretrain": ("pisd",), "train": ("pisd", "instance", "cluster"), "boost": ("instance", "cluster", "cli")}  # Algorithm 1

# ---------------------------------------------------------------------------------------------
# Recipes, as data. `paper`: the PICI paper as written. View a weak, "merely resizes and normalizes
# the images" (Sec. 4.1; the whole image resized); view b strong, drawn from ResizedCrop,
# ColorJitter, Grayscale, HorizontalFlip and GaussianBlur (Sec. 3.1), with the strengths of the
# authors' code's weak/strong transform (BYOL's first view): RandomResizedCrop 0.08-1,
# ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, grayscale p 0.2, Gaussian blur sigma U(0.1, 2) p 1.0,
# flip; ImageNet normalisation. `authors`: what the authors' training script (train_pici.py, with
# modules/cross_level_interaction.py and models_mae.py) does where it departs from the paper:
#   views          two strong BYOL views, the second also solarizes (p 0.2)
#   positions      fixed sin-cos in encoder and decoder (MAE's code), not learnable (Sec. 3.2.1)
#   relabel        CLI's pseudo-labels once, at the first boosting epoch, not every epoch (Alg. 1, line 14)
#   masked         ... from the instance features of masked inputs (their forward always masks, 50 %)
#   minmax         ... min-max scaled per feature within each batch of the loader (sklearn's MinMaxScaler)
#   kmeans_inits   ... k-means with 100 initialisations (sklearn, on the scaled features, not normalised)
#   match          renamed to the cluster head's argmax batch by batch, not over the dataset (Eq. 14), with
#                  their tie rule (a D x D count matrix, D = the largest label present + 1, max - count minimised)
#   softmax_twice  cross-entropy taken on the softmax probabilities, so a second softmax (Eq. 15: one)
#   boost_order    boosting keeps one random order drawn once (the same batches every epoch, the last
#                  N mod batch images never seen), and k-means covers only the images that order batches
# ---------------------------------------------------------------------------------------------
WEAK = data.View(norm=data.IMAGENET)  # nothing random: the whole image resized, as at evaluation
STRONG = data.View(crop=(0.08, 1.0), flip=0.5, jitter=(0.4, 0.4, 0.2, 0.1), p_jitter=0.8, p_grey=0.2, p_blur=1.0,
                   sigma=(0.1, 2.0), p_solarize=0.0, norm=data.IMAGENET)
RECIPES = {
    "paper": {"views": (WEAK, STRONG), "positions": "learnable", "relabel": "every epoch", "masked": False,
              "minmax": False, "kmeans_inits": 10, "match": "dataset", "softmax_twice": False, "boost_order": "reshuffled"},
    "authors": {"views": (STRONG, dataclasses.replace(STRONG, p_solarize=0.2)), "positions": "fixed", "relabel": "once",
                "masked": True, "minmax": True, "kmeans_inits": 100, "match": "batch", "softmax_twice": True,
                "boost_order": "fixed"},
}


def recipe(name, dataset=None):
    """The settings of `--recipe name` (the same for every dataset)."""
    return RECIPES[name]


@dataclass
class Args:
    dataset: str = arg("digits", "dataset name (rsod, ucmerced, aid, ...; see README) or a folder of images")
    data_root: str = arg("./data", "where named datasets live and decoded images are cached")
    cache_dir: str = arg(None, "where decoded images are cached (default: <data-root>/.cache); elsewhere when --data-root is read-only")
    num_clusters: int = arg(None, "number of clusters K (default: the dataset's number of classes)", type=int)
    image_size: int = arg(224, "input size, a multiple of 16 (tokens = (size/16)^2): PICI paper, Sec. 4.1, 224x224")
    storage_size: int = arg(None, "side S of the cached images, each stored whole, squashed to S x S (None: the native "
                            "size, as the papers crop from the original image, less only where images x 3 x S^2 bytes "
                            "would not fit in half the host's free memory, or under --data-on-device yes a quarter of the "
                            "GPU's: a line then says so)", type=int)
    epochs: int = arg(None, "total epochs: PICI paper, Sec. 4.1, 200 + 800 + 50 = 1050, split 200:800:50 between the "
                      "stages; with explicit stage lengths their sum, and a smaller --epochs stops the run early", type=int)
    pretrain_epochs: int = arg(None, "stage 1, L_PISD only (Algorithm 1, lines 1-7; paper 200); give all three stage lengths or none", type=int)
    train_epochs: int = arg(None, "stage 2, L_PISD + L_PICD (Algorithm 1, lines 8-12; paper 800)", type=int)
    boost_epochs: int = arg(None, "stage 3, L_PICD + L_CLI (Algorithm 1, lines 13-17; paper 50)", type=int)
    batch_size: int = arg(96, "global batch size: PICI paper, Sec. 4.1")
    lr: float = arg(1e-4, "Adam learning rate: PICI paper, Sec. 4.1; one optimiser for all stages, no weight decay or schedule: the authors' code")
    instance_temperature: float = arg(0.5, "tau_I of the instance loss, Eq. (5): PICI paper, Sec. 4.1")
    cluster_temperature: float = arg(1.0, "tau_C of the cluster loss, Eq. (8): PICI paper, Sec. 4.1")
    feature_dim: int = arg(128, "instance-MLP output size: PICI paper, Sec. 4.1")
    mask_ratio: float = arg(0.5, "share of each training view's patches removed (none at test): PICI paper, Sec. 4.1")
    vit: str = arg("small", "encoder: PICI paper uses ViT-Small, 384 wide, 6 blocks (Sec. 4.1); Table 5 compares tiny "
                   "(192, 4 blocks), small and base (768, 12 blocks), all 12 heads; the decoder is 512 wide, 8 blocks, 16 heads",
                   choices=list(VITS))
    ablate: str = arg("none", "modules left out, Table 6: 'cli' = row 2 (no boosting loss from pseudo-labels); 'pisd,cli' "
                      "= row 1 on the ViT (no pre-training, no reconstruction; the paper's row 1 is vanilla CC on a "
                      "ResNet34: cc.py); 'pisd' alone is not in the table", choices=["none", "pisd", "cli", "pisd,cli"])
    heads: str = arg("both", "projectors trained: both, Eq. (2); Table 7 trains one only (instance: clusters by k-means on "
                     "its features); one head needs --ablate cli, since CLI links the two", choices=["both", "instance", "cluster"])
    recipe: str = arg("paper", "paper = the PICI paper as written: view a weak (the whole image resized), view b strong "
                      "(Sec. 3.1, 4.1; strengths from the authors' weak/strong transform), learnable positions, CLI "
                      "pseudo-labels every boosting epoch (Eq. 12-15); authors = the authors' training script, which "
                      "produced the published numbers: two strong BYOL views, fixed sin-cos positions, pseudo-labels once "
                      "from masked, min-max-scaled features, k-means 100 inits, matched per batch, a second softmax in "
                      "the cross-entropy, boosting in one fixed order, fp32 (see the docstring); evaluation is the paper's in both", choices=list(RECIPES))
    cli_targets: str = arg("per-view", "CLI pseudo-labels: per-view = for each view, k-means on its instance features over "
                           "the whole dataset (a random view: one draw) matched to its own cluster assignments, Eq. (12)-(15) "
                           "(the authors' code too); weak = the whole image's targets for both views (ours, not in the paper)",
                           choices=["per-view", "weak"])
    seed: int = arg(1, "random seed (model init, shuffling, augmentation, masking, k-means)")
    device: str = arg("auto", "auto (the current CUDA device when present, LOCAL_RANK's under torchrun), cpu, cuda or cuda:N")
    precision: str = arg(None, "auto (bf16 autocast on a GPU with native bf16, else fp16; fp32 on CPU), fp32 (TF32 off), "
                         "bf16 or fp16 (default: auto, or fp32 under --recipe authors, the authors' precision); bf16 on a "
                         "CPU without native bf16 (AVX512-BF16, AMX) is 10x or more slower than fp32",
                         choices=["auto", "fp32", "bf16", "fp16"])
    compile: bool = arg(False, "torch.compile the network")
    deterministic: bool = arg(False, "deterministic kernels, strict on CUDA: an op without one stops the run "
                                      "(slower; CPU runs are deterministic anyway)")
    data_on_device: str = arg("auto", "keep the uint8 dataset on the GPU: auto (when it fits), yes, no", choices=["auto", "yes", "no"])
    eval_every: int = arg(10, "evaluate every N epochs, at the end of each stage and after every boosting epoch (log.jsonl; "
                               "final.json: the last epoch)")
    save_every: int = arg(10, "write the checkpoint every N epochs and at the end (Ctrl-C, SIGTERM and errors write the last finished epoch)")
    resume: str = arg(None, "continue a run as it was started, with the arguments in its checkpoint: a path, or 'auto' (the "
                         "newest run folder of this method, dataset and seed whose checkpoint fits the flags given; a fresh start "
                         "when none has one). Give only run flags (--epochs or the stage lengths to extend, --eval-every, --save-every, --device, "
                         "--threads, ...): one that changes the model, data or recipe is an error", metavar="CHECKPOINT|auto")
    eval_only: str = arg(None, "only evaluate this checkpoint, with the arguments it was trained with (flags given override "
                               "them, e.g. --dataset another/folder), and write the result files", metavar="CHECKPOINT")
    out_dir: str = arg("runs", "where run folders are written")
    run_name: str = arg(None, "run folder name (default: pici-<dataset>-seed<seed>, numbered when taken)")
    max_images: int = arg(None, "train on a class-balanced subset of this many images (quick runs)", type=int)
    threads: int = arg(0, "CPU threads for torch (0: torch's default)")
    tensorboard: bool = arg(False, "also write every logged number to <run>/tensorboard/ (needs: pip install tensorboard)")
    export_features: bool = arg(False, "write features.npy beside assignments.csv: float16, one row per image in dataset order, "
                                       "the representation the clustering reads (the encoder's CLS token; with --heads instance the instance-MLP's)")


class Network(nn.Module):
    """Masked auto-encoder (PICI paper, Sec. 3.2.1, 4.1): ViT encoder with the 16x16 patchify
    stem and 2-D sin-cos positions, learnable (the paper) or fixed (`positions="fixed"`: the authors'
    code), MAE decoder, both initialised as MAE's code (the authors'); an instance-MLP (to 128,
    L2-normalised) and a cluster-MLP (to K, softmax) read the CLS token of the masked input
    (Sec. 3.2.2). A head left out (Table 7) is None."""

    def __init__(self, num_clusters, image_size=224, vit="small", feature_dim=128, heads="both", positions="learnable"):
        super().__init__()
        width, depth = VITS[vit]
        self.backbone = common.ViT(image_size, width, depth, heads=12, stem="patchify", positions=positions, init="mae")
        self.decoder = common.MAEDecoder(self.backbone.num_patches, width, dim=512, depth=8, heads=16, positions=positions)
        mlp = lambda out: [nn.Linear(width, width), nn.ReLU(), nn.Linear(width, out)]  # two layers (Sec. 3.2.2)
        self.instance_head = nn.Sequential(*mlp(feature_dim)) if heads != "cluster" else None
        self.cluster_head = nn.Sequential(*mlp(num_clusters), nn.Softmax(dim=1)) if heads != "instance" else None

    def forward(self, x, mask_ratio=0.0, generator=None, project=True, decode=False, noise=None):
        """z (B, 128), p (B, K), the decoder's pixels (B, L, 16*16*3) and the mask (B, L; 1 = removed);
        a part not asked for or not built is None (parts outside the loss must not run under DDP).
        The mask comes from generator's draw, or from noise (B, L) on x's device (common.random_masking)."""
        tokens, mask, ids_restore = self.backbone.forward_features(x, mask_ratio, generator, noise)
        h = tokens[:, 0]  # CLS after the final norm
        z = F.normalize(self.instance_head(h), dim=1) if project and self.instance_head is not None else None
        p = self.cluster_head(h) if project and self.cluster_head is not None else None
        pixels = self.decoder(tokens, ids_restore) if decode else None
        return z, p, pixels, mask


def reconstruction_loss(pred, target, mask):
    """l_re of one view (PICI paper, Sec. 3.2.1): MSE between the predicted and true pixels of the
    removed patches only, each target patch normalised by its own mean and variance (MAE's
    norm_pix_loss). pred, target (B, L, 16*16*3); mask (B, L), 1 = removed."""
    return common.masked_patch_mse(pred, target, mask)  # l_re^a or l_re^b of Eq. (1)


def instance_loss(z_a, z_b, temperature):
    """Instance-level contrastive loss over the 2N augmented samples (PICI paper, Sec. 3.2.2, Eq. 3-6).

    Each row's positive is its other view. The denominator of Eq. (5) as printed also holds the row
    itself; we follow CC, which PICI cites: only self is excluded."""
    z = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)  # (2N, d): cosine similarity, Eq. (3)-(4)
    n = len(z_a)
    sim = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positive = torch.arange(2 * n, device=z.device).roll(n)  # n..2n-1, then 0..n-1: made on the device, no host copy
    return F.cross_entropy(sim, positive)  # Eq. (5) per row, Eq. (6) sum over both views / 2N


def cluster_loss(p_a, p_b, temperature, eps=1e-8):
    """Cluster-level contrastive loss (PICI paper, Sec. 3.2.2, Eq. 7-11).

    The K columns of the (N, K) soft assignments are the cluster representations: NT-Xent over the
    2K columns (Eq. 7-8, self excluded as above), minus the entropy of the batch's share of each
    cluster, per view (Eq. 9). log K is added per view so the term stays non-negative (the authors'
    code). Eq. (10) divides by the column's own L1 norm, which would make every share 1; the
    share is the column sum over the whole matrix's sum, as in CC. The clamp keeps value and gradient
    finite when a cluster gets no mass."""
    p_a, p_b = p_a.float(), p_b.float()
    contrastive = instance_loss(p_a.T, p_b.T, temperature)  # Eq. (7)-(8), and the 1/2K mean of Eq. (11)
    entropy = 0.0
    for p in (p_a, p_b):
        share = p.sum(dim=0) / p.sum()  # Eq. (10)
        entropy = entropy + torch.log(torch.tensor(float(p.shape[1]))) + (share * torch.log(share.clamp_min(eps))).sum()  # -H, Eq. (9)
    return contrastive + entropy  # Eq. (11)


def cli_loss(p_a, p_b, targets_a, targets_b, softmax_twice=False, eps=1e-8):
    """Cross-level interaction (PICI paper, Sec. 3.3, Eq. 15): cross-entropy of each view's cluster
    probabilities against that view's matched pseudo-labels (one per image). The log is taken of the
    softmax probabilities themselves; softmax_twice: of a second softmax over them, as the authors'
    code (torch's CrossEntropyLoss on the probabilities). Mean over the samples."""
    log_p = (lambda p: F.log_softmax(p.float(), dim=1)) if softmax_twice else (lambda p: torch.log(p.float().clamp_min(eps)))
    nll = [F.nll_loss(log_p(p), t) for p, t in ((p_a, targets_a), (p_b, targets_b))]
    return (nll[0] + nll[1]) / 2  # Eq. (15): 1/2 sum over the views


def match_labels(pseudo, pred, num_clusters):
    """Rename k-means clusters to the cluster head's: the one-to-one map with the most agreement over
    the dataset, by the Hungarian algorithm (PICI paper, Sec. 3.3, the w of Eq. 15). pseudo, pred (N,)."""
    counts = torch.zeros(num_clusters, num_clusters, dtype=torch.long)
    counts.index_put_((pseudo, pred), torch.ones_like(pseudo), accumulate=True)  # (k-means cluster, head cluster)
    rows, cols = linear_sum_assignment(counts.numpy(), maximize=True)
    rename = torch.empty(num_clusters, dtype=torch.long)
    rename[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return rename[pseudo]


def pseudo_labels(z, p, num_clusters, seed, n_init=10, normalize=True, match=True):
    """Eq. (12)-(14): k-means on the instance features, matched to the cluster head's argmax over the
    dataset (match=False: k-means' own names, for the authors' matching batch by batch).
    normalize=False: k-means on the features as given (the authors' min-max-scaled ones)."""
    pseudo, _ = common.kmeans(z, num_clusters, seed, n_init=n_init, normalize=normalize)  # Eq. (12)-(13)
    return match_labels(pseudo, p.argmax(dim=1), num_clusters) if match else pseudo  # Eq. (14) and the matching


def embed(model, images, transform, run):
    """Instance features and cluster probabilities of every image under `transform` (a uint8 batch
    to the model's input), unmasked (no masking at test, Sec. 4.1), eval mode."""
    fn = lambda x: {k: v for k, v in zip("zp", model(x)[:2]) if v is not None}
    model.eval()
    out = common.predict(fn, images, transform, run)
    model.train()
    return out


def cli_features(model, images, sizes, view, run, generator, mask_ratio=0.0, order=None, chunk=512, minmax=False):
    """Instance features and cluster probabilities (CPU fp32, dataset order) of every image under
    `view` (a function of a uint8 batch and its originals' sizes, so random crops are drawn in the
    original frame as in training), eval mode, `chunk` images at a time in `order` (default: dataset
    order). mask_ratio > 0: that share of the patches masked, drawn from `generator` (the authors'
    forward always masks). minmax: each chunk's features scaled to [0, 1] per dimension (the authors'
    code fits sklearn's MinMaxScaler to each loader batch)."""
    order = torch.arange(len(images)) if order is None else order
    zs, ps = [], []
    model.eval()
    with torch.no_grad():
        for idx in order.split(chunk):
            x = view(images[idx.to(images.device)].to(run.device, non_blocking=True), sizes[idx])
            with run.autocast():
                z, p = model(x, mask_ratio, generator)[:2]
            z = z.float().cpu()
            if minmax:
                lo, hi = z.min(dim=0).values, z.max(dim=0).values
                z = (z - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))  # a constant dimension becomes 0, as sklearn's
            zs.append(z)
            ps.append(p.float().cpu())
    model.train()
    back = order.argsort()
    return torch.cat(zs)[back], torch.cat(ps)[back]


def cli_targets(model, images, sizes, aug, run, num_clusters, seed, generator, per_view=True, settings=RECIPES["paper"],
                mask_ratio=0.5, batch_size=96, order=None):
    """CLI's pseudo-labels (PICI paper, Sec. 3.3, Eq. 12-14) over the dataset: for each view k,
    k-means on the instance features of every image under that view (the weak view as it is, a random
    view as one draw from `generator`), renamed to match view k's cluster-head argmax. per_view=False:
    the weak view's (the whole image's) targets for both. `settings` (a recipe): the paper's, or the
    authors' code's: features of masked inputs, taken batch by batch in `order` (their boosting
    loader's: the images it batches, in its fixed order) and min-max scaled per batch, k-means with
    100 inits on them, the renaming left to each training step. order: the images labelled (default
    all, in dataset order). Returns the targets (2, N), -1 for the images outside `order`, and the
    share of labelled images whose (renamed) target is their head's argmax."""
    views = [lambda x, s, v=v: aug.view(x, generator, v, s) for v in aug.recipe] if per_view else [lambda x, s: aug.eval(x)]
    minmax = settings["minmax"]
    order = torch.arange(len(images)) if order is None else order
    targets, agreement = [], []
    for view in views:
        z, p = cli_features(model, images, sizes, view, run, generator, mask_ratio if settings["masked"] else 0.0, order,
                            batch_size if minmax else 512, minmax)
        targets.append(pseudo_labels(z, p, num_clusters, seed, settings["kmeans_inits"], normalize=not minmax,
                                     match=settings["match"] == "dataset"))
        head = p.argmax(dim=1)
        agreement.append((match_labels(targets[-1], head, num_clusters) == head).float().mean().item())
    if not per_view:
        targets, agreement = targets * 2, agreement * 2
    out = torch.full((2, len(images)), -1, dtype=torch.long)
    out[:, order.sort().values] = torch.stack(targets)  # cli_features returns the rows in dataset order
    return out, sum(agreement) / 2


def match_batch(targets, p):
    """The authors' code's matching (modules/cross_level_interaction.py): one batch's pseudo-labels
    renamed to the cluster head's argmax in that batch, at every step (the paper matches over the
    dataset, Eq. 14), with their tie rule: a D x D count matrix (D = the largest label present + 1),
    rows the head's clusters, columns k-means', and the assignment that minimises max - count."""
    pseudo, pred = targets.cpu(), p.detach().argmax(dim=1).cpu()
    d = int(max(pseudo.max(), pred.max())) + 1
    counts = torch.zeros(d, d, dtype=torch.long)
    counts.index_put_((pred, pseudo), torch.ones_like(pred), accumulate=True)
    rows, cols = linear_sum_assignment((counts.max() - counts).numpy())
    rename = torch.empty(d, dtype=torch.long)
    rename[torch.as_tensor(cols)] = torch.as_tensor(rows)
    return rename[pseudo].to(targets.device)


def evaluate(model, images, aug, run, num_clusters, seed):
    """Cluster = argmax of the cluster-MLP (Algorithm 1, lines 18-20); without a cluster-MLP, k-means
    on the instance-MLP's features (PICI paper, Sec. 4.4.3)."""
    out = embed(model, images, aug.eval, run)
    if "p" not in out:
        return common.kmeans(out["z"], num_clusters, seed)
    conf, pred = out["p"].max(dim=1)
    return pred, conf


def stage_lengths(args, pisd):
    """Epochs of (pretrain, train, boost): as given, or --epochs split 200:800:50 (PICI paper, Sec. 4.1)
    with at least one epoch per stage while there are enough, earlier stages first. Without PISD there
    is nothing to pre-train: those epochs go to training."""
    given = (args.pretrain_epochs, args.train_epochs, args.boost_epochs)
    if all(g is not None for g in given):
        return given
    total = args.epochs if args.epochs is not None else 1050
    pretrain = min(total, max(1, round(total * 200 / 1050))) if pisd else 0
    boost = min(max(total - pretrain - 1, 0), max(1, round(total * 50 / 1050)))
    return pretrain, total - pretrain - boost, boost


def stage_of(epoch, lengths):
    """The stage of (0-based) epoch."""
    return list(STAGES)[(epoch >= lengths[0]) + (epoch >= lengths[0] + lengths[1])]


def main(argv=None):
    args = common.parse_args(Args, argv, description=__doc__, method="pici")
    pisd, cli = "pisd" not in args.ablate, "cli" not in args.ablate
    given = [g is not None for g in (args.pretrain_epochs, args.train_epochs, args.boost_epochs)]
    common.check(all(given) or not any(given), "give all three of --pretrain-epochs, --train-epochs, --boost-epochs, or none (then --epochs is split 200:800:50)")
    lengths = stage_lengths(args, pisd)
    common.check(min(lengths) >= 0, f"stage lengths must not be negative, got {lengths}")
    common.check(pisd or lengths[0] == 0, "--ablate pisd leaves nothing to pre-train: pass --pretrain-epochs 0")
    args.epochs = sum(lengths) if args.epochs is None else args.epochs
    common.check(args.epochs <= sum(lengths), f"--epochs {args.epochs} is more than the {sum(lengths)} epochs of the stages: raise a stage length")
    common.check(args.image_size % 16 == 0 and args.image_size >= 16,
                 f"--image-size {args.image_size} is not a multiple of 16 (the ViT patches are 16x16): use e.g. 32, 64, 128 or 224")
    keep = int((args.image_size // 16) ** 2 * (1 - args.mask_ratio))
    common.check(0 <= args.mask_ratio < 1 and keep >= 1 and (keep < (args.image_size // 16) ** 2 or not pisd),
                 f"--mask-ratio {args.mask_ratio} must remove at least one of the {(args.image_size // 16) ** 2} patches and keep one: use e.g. 0.5")
    common.check(args.heads == "both" or not cli, f"--heads {args.heads}: CLI needs both heads (pseudo-labels from one, targets for the other): add --ablate cli")
    run = common.Run(args, "pici")  # device, precision, rank; the run folder, made only when training starts
    ds = data.load_data(args, run)
    settings = recipe(args.recipe)
    aug = data.Augmentation(settings["views"], args.image_size)
    # heads idle while pre-training, the decoder while boosting: DDP must allow unused parameters
    model, net = common.prepare(Network(ds.num_classes, args.image_size, args.vit, args.feature_dim, args.heads, settings["positions"]), run,
                                compile=args.compile, find_unused=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=run.device.type == "cuda")  # one for all three stages; no weight decay
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype == torch.float16)  # fp16 only
    autocast = torch.autocast(run.device.type, dtype=run.dtype, enabled=run.dtype is not None)  # bf16/fp16 forward, fp32 losses
    start_epoch, state = run.start("PICI", ds, model, optimizer, scaler, same=("heads", "vit", "ablate"),  # --eval-only's or --resume's
                                   extra=lambda epoch: dict(stages=list(lengths), stage=stage_of(epoch - 1, lengths) if epoch else None,
                                                            cli_targets=targets))  # kept: `--recipe authors` labels once
    common.check(not state or args.eval_only or start_epoch == 0 or stage_of(start_epoch - 1, lengths) == state["stage"],
                 f"the checkpoint's epoch {start_epoch} was in stage {state and state['stage']}, this schedule {lengths} puts it in "
                 f"{stage_of(start_epoch - 1, lengths)}: give the stage lengths it was trained with {state and tuple(state['stages'])}")
    images = data.place_images(ds.images, args.data_on_device, run)
    active = {"pisd": pisd, "instance": args.heads != "cluster", "cluster": args.heads != "instance", "cli": cli}
    stage_terms = {stage: [t for t in terms if active[t]] for stage, terms in STAGES.items()}  # the losses of each stage
    ends = [sum(lengths[:i + 1]) for i in range(3)]  # last epoch (1-based) of each stage
    for (stage, terms), n, end in zip(stage_terms.items(), lengths, ends):
        run.print(f"stage {stage}: {n} epochs ({end - n + 1}-{end}), losses {' + '.join(terms)}" if n else f"stage {stage}: skipped (0 epochs)")
    epoch_steps = len(images) // args.batch_size  # data.batches drops the last partial batch
    # `--recipe authors` boosts in one random order drawn once (their boosting loader's sampler): a
    # generator seeded alike each epoch gives data.batches the same order, and k-means labels the
    # images it batches (the last N mod batch are never clustered or trained on while boosting)
    fixed_order = lambda: torch.Generator().manual_seed(args.seed + 1_000_003)
    boost_order = torch.randperm(len(images), generator=fixed_order())[:epoch_steps * args.batch_size]
    targets = state.get("cli_targets") if state else None  # CLI's pseudo-labels, (2, N): one row per view
    targets = targets.to(run.device) if targets is not None else None

    with run:  # Ctrl-C, SIGTERM, errors: the last finished epoch is on disk
        for epoch in range(start_epoch, 0 if args.eval_only else args.epochs):
            gen = common.generator(args.seed, epoch, run.rank)  # augmentation and masking: a stream per epoch and process; rank 0's shuffles
            stage = stage_of(epoch, lengths)
            terms = stage_terms[stage]
            parts = dict(project=terms != ["pisd"], decode="pisd" in terms)  # heads idle in pre-training, decoder in boosting
            extra = {}
            if "cli" in terms and (settings["relabel"] == "every epoch" or targets is None):  # Eq. (12)-(14); authors: once
                targets = torch.empty(2, len(ds.images), dtype=torch.long, device=run.device)  # per view
                if run.is_main:
                    t, extra["cli_agreement"] = cli_targets(model, images, ds.sizes, aug, run, ds.num_classes, args.seed + epoch, gen,
                                                            args.cli_targets == "per-view", settings, args.mask_ratio, args.batch_size,
                                                            boost_order if settings["boost_order"] == "fixed" else None)
                    targets.copy_(t)
                if run.distributed:
                    torch.distributed.broadcast(targets, src=0)
            totals = torch.zeros(len(terms), device=run.device)  # read once per epoch: no per-step sync
            order = fixed_order() if stage == "boost" and settings["boost_order"] == "fixed" else gen
            for x, _, idx in run.progress(data.batches(images, None, args.batch_size, generator=order, rank=run.rank,
                                                       world_size=run.world_size, device=run.device), epoch, epoch_steps, totals):
                # the two masks' noise, drawn after the views' parameters, and the batch's indices (CLI's
                # targets) travel to the device in the views' one copy
                masks = (2, len(x), model.backbone.num_patches if args.mask_ratio > 0 else 0)
                x_a, x_b, (noise, idx) = aug.views(x, gen, ds.sizes[idx], extra=lambda: (torch.rand(masks, generator=gen), idx))
                with autocast:  # two encoder calls, each with its own random mask (Sec. 3.2.1)
                    z_a, p_a, pixels_a, mask_a = net(x_a, args.mask_ratio, noise=noise[0], **parts)
                    z_b, p_b, pixels_b, mask_b = net(x_b, args.mask_ratio, noise=noise[1], **parts)
                losses = []
                if "pisd" in terms:  # target: the normalised view the encoder saw, patch by patch
                    losses.append((reconstruction_loss(pixels_a, common.patchify(x_a), mask_a)
                                   + reconstruction_loss(pixels_b, common.patchify(x_b), mask_b)) / 2)  # Eq. (1)
                if "instance" in terms:  # the global batch, with gradients
                    z_a, z_b = common.gather(z_a, z_b)
                    losses.append(instance_loss(z_a, z_b, args.instance_temperature))
                if "cluster" in terms:
                    p_a, p_b = common.gather(p_a, p_b)
                    losses.append(cluster_loss(p_a, p_b, args.cluster_temperature))
                if "cli" in terms:
                    t_a, t_b = common.gather(*targets[:, idx])
                    if settings["match"] == "batch":  # the authors' code: renamed to this batch's argmax (reads the batch back)
                        t_a, t_b = match_batch(t_a, p_a), match_batch(t_b, p_b)
                    losses.append(cli_loss(p_a, p_b, t_a, t_b, settings["softmax_twice"]))
                losses = torch.stack(losses)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(losses.sum()).backward()  # Algorithm 1, lines 6, 11, 16
                scaler.step(optimizer)
                scaler.update()
                totals += losses.detach()
            # every stage's end, and every boosting epoch: the spread the authors' best-ACC checkpoint was picked from
            evaluate_now = (args.eval_every and (epoch + 1) % args.eval_every == 0) or epoch + 1 in ends or stage == "boost"
            run.epoch_done(epoch, totals, terms, lambda: evaluate(model, images, aug, run, ds.num_classes, args.seed), stage=stage,
                           evaluate_now=evaluate_now and (epoch + 1 < args.epochs or stage == "boost"), **extra)

    if run.is_main:
        pred, conf = evaluate(model, images, aug, run, ds.num_classes, args.seed)
        if args.export_features:  # what evaluate clusters: the cluster-MLP's input, or k-means' features
            features = model.backbone if model.cluster_head is not None else lambda x: model(x)[0]
            common.export_features(run, features, model, images, aug.eval)
        run.finish(pred, conf)


if __name__ == "__main__":
    main()
