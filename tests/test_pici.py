"""pici.py beyond its losses (those are in test_losses.py): pseudo-labelling, parameter counts, the
stage schedule, and end-to-end runs through all three stages with exact resume."""
import contextlib
import itertools
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import data
import pici
from conftest import ROOT, check_run_files, in_process, run_script


# ---------------------------------------------------------------------------------------------
# pseudo-labels (Eq. 12-14 and the matching)
# ---------------------------------------------------------------------------------------------
def test_match_labels_maximises_agreement():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        pseudo, pred = torch.randint(3, (30,), generator=g), torch.randint(3, (30,), generator=g)
        best = max((pred == torch.tensor(perm)[pseudo]).sum().item() for perm in itertools.permutations(range(3)))
        matched = pici.match_labels(pseudo, pred, 3)
        assert (matched == pred).sum().item() == best
        assert len(set(zip(pseudo.tolist(), matched.tolist()))) == len(set(pseudo.tolist()))  # one-to-one renaming


def test_pseudo_labels_recover_obvious_clusters_in_the_heads_names():
    g = torch.Generator().manual_seed(1)
    k, per = 5, 40
    truth = torch.arange(k).repeat_interleave(per)
    centres = 10 * torch.randn(k, 16, generator=g)
    z = centres[truth] + 0.1 * torch.randn(k * per, 16, generator=g)
    names = torch.tensor([3, 0, 4, 1, 2])  # the cluster head calls true class c "names[c]"
    head = names[truth].clone()
    wrong = torch.randperm(k * per, generator=g)[:30]  # and gets 15% wrong
    head[wrong] = torch.randint(k, (30,), generator=g)
    p = F.one_hot(head, k).float() * 0.6 + 0.4 / k
    labels = pici.pseudo_labels(z, p, k, seed=0)
    assert torch.equal(labels, names[truth])  # k-means recovers the structure, named as the head names it


class MeanColour(torch.nn.Module):
    """A toy model with PICI's outputs: z = the input's mean colour, p = a softmax of it over 4 clusters.
    With a mask ratio it averages a random share of the rows only (drawn from the generator, as the
    ViT's masking), and it records the mask ratios it was called with."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3, 4)
        torch.nn.init.normal_(self.head.weight, std=3.0, generator=torch.Generator().manual_seed(0))
        self.mask_ratios = []

    def forward(self, x, mask_ratio=0.0, generator=None):
        self.mask_ratios.append(mask_ratio)
        if mask_ratio > 0:
            keep = torch.rand(x.shape[2], generator=generator).argsort()[:int(x.shape[2] * (1 - mask_ratio))]
            x = x[:, :, keep]
        z = x.mean(dim=(2, 3))
        return z, self.head(z).softmax(dim=1), None, None


def colour_images(per=12):
    """4 colours x `per` images with noise, 40 px (uint8)."""
    g = torch.Generator().manual_seed(2)
    colours = torch.tensor([[220, 30, 30], [30, 200, 40], [40, 60, 220], [230, 220, 40]])
    x = colours.repeat_interleave(per, 0)[:, :, None, None] + torch.randint(-15, 16, (4 * per, 3, 40, 40), generator=g)
    return x.clamp(0, 255).to(torch.uint8)


ENV = SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)
WIDE = torch.tensor([[40, 120]]).expand(48, 2)  # the originals of colour_images(): 3 times as wide as high


def test_cli_targets_per_view_on_a_toy_case():
    """Eq. (12)-(14) per view: view a's targets are k-means on its own features (the weak view: the whole
    image) named by its own head; view b's the same on one strong draw, cropped in the original (here
    non-square) frame as training crops; the option 'weak' gives view a's targets to both views and
    draws nothing."""
    model, images = MeanColour(), colour_images()
    aug = data.Augmentation(pici.recipe("paper")["views"], 32)
    g = torch.Generator().manual_seed(5)
    start = g.get_state()
    targets, agreement = pici.cli_targets(model, images, WIDE, aug, ENV, 4, seed=0, generator=g)
    assert targets.shape == (2, len(images)) and model.training and set(model.mask_ratios) == {0.0}  # unmasked (paper)
    replay = torch.Generator()
    replay.set_state(start)
    for k, x in enumerate([aug.eval(images), aug.view(images, replay, aug.recipe[1], WIDE)]):  # view b: one draw, as replayed
        z, p, _, _ = model(x)
        assert torch.equal(targets[k], pici.pseudo_labels(z, p, 4, seed=0)), k
    assert torch.equal(g.get_state(), replay.get_state())  # exactly one strong draw of the dataset
    truth = torch.arange(4).repeat_interleave(12)
    assert len(set(zip(truth.tolist(), targets[0].tolist()))) == 4  # the weak view: the four colours, renamed
    assert not torch.equal(targets[0], targets[1])  # jitter, greys and blur move view b's features: its own targets
    z_a, p_a, _, _ = model(aug.eval(images))
    z_b, p_b, _, _ = model(aug.view(images, torch.Generator().set_state(start), aug.recipe[1], WIDE))
    expected = ((targets[0] == p_a.argmax(1)).float().mean() + (targets[1] == p_b.argmax(1)).float().mean()) / 2
    assert agreement == pytest.approx(expected.item())
    weak, _ = pici.cli_targets(model, images, WIDE, aug, ENV, 4, seed=0, generator=g, per_view=False)
    assert torch.equal(weak[0], targets[0]) and torch.equal(weak[1], targets[0])
    assert torch.equal(g.get_state(), replay.get_state())  # the weak option draws nothing


def test_cli_strong_view_is_cropped_in_the_original_frame(monkeypatch):
    """Training crops a view in the image's original frame (ds.sizes); CLI's random view must too: a
    crop drawn in the stored square of a 3:1 image has another aspect ratio once back in the original."""
    model, images = MeanColour(), colour_images()
    aug = data.Augmentation(pici.recipe("paper")["views"], 32)
    seen, real = [], aug.view
    monkeypatch.setattr(aug, "view", lambda x, g, v, sizes=None: seen.append(sizes) or real(x, g, v, sizes))
    pici.cli_targets(model, images, WIDE, aug, ENV, 4, seed=0, generator=torch.Generator().manual_seed(0))
    assert len(seen) == 2 and all(s is not None and torch.equal(s, WIDE) for s in seen)  # both views, the originals' sizes
    g = torch.Generator().manual_seed(3)
    assert not torch.equal(real(images, g, aug.recipe[1], WIDE), real(images, torch.Generator().manual_seed(3), aug.recipe[1]))


# ---------------------------------------------------------------------------------------------
# --recipe authors: each part of the authors' CLI, one test each
# ---------------------------------------------------------------------------------------------
def test_authors_cli_features_are_of_masked_inputs():
    model, images = MeanColour(), colour_images()
    aug = data.Augmentation(pici.recipe("authors")["views"], 32)
    pici.cli_targets(model, images, WIDE, aug, ENV, 4, seed=0, generator=torch.Generator().manual_seed(0),
                     settings=pici.recipe("authors"), mask_ratio=0.5, batch_size=16)
    assert set(model.mask_ratios) == {0.5} and model.training  # the training mask ratio; back in training mode
    net = pici.Network(4, 32, "tiny")
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    z, _ = pici.cli_features(net, x, torch.full((6, 2), 32), lambda x, s: aug.eval(x), ENV, torch.Generator().manual_seed(1), mask_ratio=0.5)
    net.eval()
    with torch.no_grad():
        masked = net(aug.eval(x), 0.5, torch.Generator().manual_seed(1))[0]
        whole = net(aug.eval(x))[0]
    torch.testing.assert_close(z, masked)
    assert not torch.allclose(z, whole, atol=1e-3)


def test_authors_cli_features_are_min_max_scaled_per_batch():
    """sklearn's MinMaxScaler fitted to each batch of the authors' loader: per batch and dimension,
    the features span [0, 1] exactly; the whole set (in dataset order) does not batch by batch."""
    model, images = MeanColour(), colour_images()
    order = torch.randperm(48, generator=torch.Generator().manual_seed(0))
    z, p = pici.cli_features(model, images, WIDE, lambda x, s: x.float(), ENV, None, order=order, chunk=16, minmax=True)
    raw, _ = pici.cli_features(model, images, WIDE, lambda x, s: x.float(), ENV, None)
    for idx in order.split(16):
        assert torch.allclose(z[idx].min(0).values, torch.zeros(3)) and torch.allclose(z[idx].max(0).values, torch.ones(3))
        lo, hi = raw[idx].min(0).values, raw[idx].max(0).values
        torch.testing.assert_close(z[idx], (raw[idx] - lo) / (hi - lo))  # the same scaling as sklearn's
    assert not all(torch.allclose(z[i:i + 16].min(0).values, torch.zeros(3)) for i in range(0, 48, 16))  # the order matters
    assert torch.equal(pici.cli_features(model, images, WIDE, lambda x, s: x.float() * 0, ENV, None, minmax=True)[0],
                       torch.zeros(48, 3))  # a constant dimension: 0, as sklearn


@pytest.mark.parametrize("name,n_init,normalize,matched", [("paper", 10, True, True), ("authors", 100, False, False)])
def test_cli_kmeans_inits_normalisation_and_matching_per_recipe(monkeypatch, name, n_init, normalize, matched):
    """The paper's k-means (10 inits, ours: the paper gives none) on unit features, renamed over the
    dataset; the authors': 100 inits on the min-max-scaled features, k-means' own names (renamed per batch)."""
    calls, real = [], common.kmeans
    monkeypatch.setattr(common, "kmeans", lambda *a, **k: calls.append(k) or real(*a, **k))
    model, images = MeanColour(), colour_images()
    aug = data.Augmentation(pici.recipe(name)["views"], 32)
    g = torch.Generator().manual_seed(0)
    targets, _ = pici.cli_targets(model, images, WIDE, aug, ENV, 4, seed=0, generator=g, settings=pici.recipe(name), batch_size=16)
    assert [(c["n_init"], c["normalize"]) for c in calls] == [(n_init, normalize)] * 2
    if not matched:  # the labels are k-means' own: the same partition as a fresh k-means on those features, same names
        assert targets.shape == (2, 48) and targets.max() < 4


def test_authors_matching_is_batch_by_batch():
    """match_batch renames one batch's pseudo-labels to that batch's head argmax (the authors' code), which
    can differ from the renaming over the whole dataset."""
    g = torch.Generator().manual_seed(0)
    pseudo = torch.randint(3, (60,), generator=g)
    head = (pseudo + 1) % 3  # the head calls k-means' cluster c "c + 1"
    head[:20] = (pseudo[:20] + 2) % 3  # but in the first batch "c + 2"
    p = F.one_hot(head, 3).float()
    assert torch.equal(pici.match_batch(pseudo[:20], p[:20]), head[:20])
    assert torch.equal(pici.match_batch(pseudo[20:], p[20:]), head[20:])
    assert not torch.equal(pici.match_labels(pseudo, head, 3)[:20], head[:20])  # over the dataset: one renaming for all


def authors_match(pseudo, pred):
    """The authors' per-batch matching (modules/cross_level_interaction.py, match), step by step in
    numpy: counts[head cluster, k-means cluster] over D x D (D = largest label present + 1), the
    assignment minimising max - counts, then each pseudo-label replaced by the row assigned to it."""
    from scipy.optimize import linear_sum_assignment
    d = max(pred.max(), pseudo.max()) + 1
    counts = np.zeros((d, d), dtype=np.int64)
    for head, kmeans in zip(pred, pseudo):
        counts[head, kmeans] += 1
    rows, cols = linear_sum_assignment(counts.max() - counts)
    renamed = np.zeros(len(pseudo), dtype=np.int64)
    for i, label in enumerate(pseudo):
        for j in rows:
            if label == cols[j]:
                renamed[i] = rows[j]
    return renamed


def test_authors_matching_breaks_ties_as_their_code():
    """On random batches of 96 with many ties (K = 21 to 30, a few labels absent), match_batch renames
    exactly as the authors' code; the K x K maximisation (match_labels) agrees as much but not always alike."""
    rng, differ = np.random.default_rng(0), 0
    for trial in range(150):
        k = int(rng.integers(21, 31))
        pseudo = rng.integers(0, k - trial % 3, 96)  # every third batch lacks the top labels: D < K
        pred = rng.integers(0, k, 96) if trial % 2 else (pseudo + rng.integers(0, 2, 96)) % k  # independent, or mostly agreeing
        ours = pici.match_batch(torch.from_numpy(pseudo), F.one_hot(torch.from_numpy(pred), k).float())
        assert ours.tolist() == authors_match(pseudo, pred).tolist(), trial
        kxk = pici.match_labels(torch.from_numpy(pseudo), torch.from_numpy(pred), k)
        assert (kxk.numpy() == pred).sum() == (ours.numpy() == pred).sum()  # the same total agreement
        differ += not torch.equal(kxk, ours)
    assert differ > 0  # the tie rule is what this test tells apart


def test_authors_boosting_keeps_one_order_and_drops_the_last_batch(monkeypatch, tmp_path, image_folder):
    """--recipe authors boosts as the authors' loader did: one random order drawn once, the same batches
    every boosting epoch, the last N mod batch images never trained on nor pseudo-labelled (-1); k-means
    sees exactly the batched images, in that order's batches. The paper recipe reshuffles every epoch
    and labels every image."""
    seen, labelled, real_batches, real_targets = [], [], data.batches, pici.cli_targets
    monkeypatch.setattr(data, "batches", lambda *a, **k: seen.append([]) or (
        (seen[-1].append(b[2].tolist()) or b) for b in real_batches(*a, **k)))
    monkeypatch.setattr(pici, "cli_targets", lambda *a, **k: labelled.append(a[-1]) or real_targets(*a, **k))
    for name in ("authors", "paper"):
        seen.clear(), labelled.clear()
        in_process(pici, "--dataset", image_folder, "--max-images", 40, "--image-size", 32, "--batch-size", 16, "--eval-every", 0,
                   "--vit", "tiny", "--pretrain-epochs", 0, "--train-epochs", 1, "--boost-epochs", 2, "--recipe", name,
                   "--run-name", name, out_dir=tmp_path, data_root=tmp_path / "data")
        targets = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["cli_targets"]
        train, boost = seen[0], seen[1:3]
        assert len(train) == 2 and all(len(b) == 2 and all(len(i) == 16 for i in b) for b in boost)
        used = sorted(i for batch in boost[0] for i in batch)
        if name == "authors":
            assert boost[0] == boost[1] and boost[0] != train  # one order for boosting, drawn once
            assert [b.tolist() for b in labelled[0].split(16)] == boost[0]  # features min-max scaled over those batches
            assert [i for i in range(40) if targets[0, i] < 0] == sorted(set(range(40)) - set(used))  # 8 never labelled
            assert (targets[:, used] >= 0).all()
        else:
            assert boost[0] != boost[1] and labelled == [None, None]  # reshuffled, every image labelled
            assert (targets >= 0).all()


def test_authors_cli_loss_takes_a_second_softmax():
    g = torch.Generator().manual_seed(0)
    p_a, p_b = torch.randn(8, 5, generator=g).softmax(1), torch.randn(8, 5, generator=g).softmax(1)
    t_a, t_b = torch.randint(5, (8,), generator=g), torch.randint(5, (8,), generator=g)
    twice = pici.cli_loss(p_a, p_b, t_a, t_b, softmax_twice=True)
    torch.testing.assert_close(twice, (F.cross_entropy(p_a, t_a) + F.cross_entropy(p_b, t_b)) / 2)  # torch's CE on probabilities
    once = pici.cli_loss(p_a, p_b, t_a, t_b)
    torch.testing.assert_close(once, (F.nll_loss(p_a.log(), t_a) + F.nll_loss(p_b.log(), t_b)) / 2)  # Eq. (15)
    assert not torch.allclose(once, twice)


def test_authors_positions_are_fixed_in_encoder_and_decoder():
    fixed, learnable = pici.Network(4, 32, "tiny", positions="fixed"), pici.Network(4, 32, "tiny")
    names = lambda net: {n for n, _ in net.named_parameters() if "pos_embed" in n}
    assert names(fixed) == set() and names(learnable) == {"backbone.pos_embed", "decoder.pos_embed"}
    torch.testing.assert_close(fixed.backbone.pos_embed, learnable.backbone.pos_embed)  # both start from the same sin-cos
    torch.testing.assert_close(fixed.decoder.pos_embed, learnable.decoder.pos_embed)
    assert pici.recipe("authors")["positions"] == "fixed" and pici.recipe("paper")["positions"] == "learnable"


@pytest.mark.parametrize("name,computed", [("paper", 2), ("authors", 1)])
def test_pseudo_labels_every_boosting_epoch_or_once(monkeypatch, tmp_path, image_folder, name, computed):
    """The paper relabels at each boosting epoch (Algorithm 1, line 14); the authors' code once, at the
    first. Both log NMI / ACC / ARI after every boosting epoch, and final.json is the last epoch's.
    The authors' run trains with fixed positions (none in the checkpoint's parameters)."""
    calls, real = [], pici.cli_targets
    monkeypatch.setattr(pici, "cli_targets", lambda *a, **k: calls.append(a[7]) or real(*a, **k))
    final = in_process(pici, "--dataset", image_folder, "--max-images", 32, "--image-size", 32, "--batch-size", 16, "--eval-every", 0,
                       "--pretrain-epochs", 1, "--train-epochs", 0, "--boost-epochs", 2, "--recipe", name, "--run-name", "r",
                       out_dir=tmp_path, data_root=tmp_path / "data")
    assert len(calls) == computed
    log = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == ["pretrain", "boost", "boost"]
    assert [("cli_agreement" in r) for r in log[1:]] == [True, computed == 2]
    assert all("nmi" in r and "acc" in r and "ari" in r for r in log[1:])  # every boosting epoch, the last too
    assert all(log[-1][k] == final[k] for k in ("nmi", "acc", "ari"))
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert any("pos_embed" in k for k in state["model"]) == (name == "paper")


# ---------------------------------------------------------------------------------------------
# network and schedule
# ---------------------------------------------------------------------------------------------
def count(module, without=()):
    return sum(p.numel() for n, p in module.named_parameters() if p.requires_grad and n not in without)


def test_parameter_counts():
    k = 21
    net = pici.Network(k, 224)
    assert count(net.backbone, ["pos_embed"]) == 10_943_232
    assert net.backbone.pos_embed.numel() == 75_648 and net.backbone.pos_embed.requires_grad
    assert count(net.decoder, ["pos_embed"]) == 25_811_712
    assert net.decoder.pos_embed.numel() == 100_864 and net.decoder.pos_embed.requires_grad
    assert count(net.instance_head) == 197_120
    assert count(net.cluster_head) == 147_840 + 385 * k
    tiny, base = pici.Network(k, 32, "tiny"), pici.Network(k, 32, "base")
    assert (tiny.backbone.dim, len(tiny.backbone.blocks), base.backbone.dim, len(base.backbone.blocks)) == (192, 4, 768, 12)
    assert pici.Network(k, 32, heads="instance").cluster_head is None and pici.Network(k, 32, heads="cluster").instance_head is None


def test_forward_masks_half_the_patches_with_the_given_generator():
    torch.manual_seed(0)
    net = pici.Network(4, 64).eval()
    x = torch.randn(3, 3, 64, 64)
    z, p, pixels, mask = net(x, 0.5, torch.Generator().manual_seed(7), decode=True)
    assert z.shape == (3, 128) and torch.allclose(z.norm(dim=1), torch.ones(3)) and torch.allclose(p.sum(1), torch.ones(3))
    assert pixels.shape == (3, 16, 16 * 16 * 3) and mask.shape == (3, 16) and (mask.sum(1) == 8).all()
    z2, _, _, mask2 = net(x, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(mask, mask2) and torch.allclose(z, z2)  # the run's generator decides the mask
    z_full, _, pixels_none, mask_none = net(x)
    assert pixels_none is None and mask_none is None and not torch.allclose(z_full, z)  # test time: the whole image


@pytest.mark.parametrize("epochs,pisd,expected", [(1050, True, (200, 800, 50)), (21, True, (4, 16, 1)), (3, True, (1, 1, 1)),
                                                   (2, True, (1, 1, 0)), (1, True, (1, 0, 0)), (None, True, (200, 800, 50)),
                                                   (1050, False, (0, 1000, 50))])
def test_stage_lengths(epochs, pisd, expected):
    args = SimpleNamespace(epochs=epochs, pretrain_epochs=None, train_epochs=None, boost_epochs=None)
    assert pici.stage_lengths(args, pisd) == expected
    assert [pici.stage_of(e, expected) for e in range(sum(expected))] == ["pretrain"] * expected[0] + ["train"] * expected[1] + ["boost"] * expected[2]


# ---------------------------------------------------------------------------------------------
# end to end (CPU)
# ---------------------------------------------------------------------------------------------
def test_end_to_end_through_all_three_stages_with_exact_resume_from_the_middle_of_boosting(tmp_path, image_folder):
    """conftest.check_resume's comparison, stopping inside a stage rather than after epoch 1: stages
    1 + 1 + 2, one run straight through, one stopped after the first boosting epoch and resumed (the
    pseudo-labels of the last epoch are then computed from restored weights). Three processes
    instead of check_resume's three plus another three for the mid-stage case: CPU time."""
    common_args = ["--dataset", image_folder, "--max-images", 64, "--image-size", 32, "--eval-every", 1, "--save-every", 1,
                   "--batch-size", 32, "--pretrain-epochs", 1, "--train-epochs", 1, "--boost-epochs", 2]  # 64 images: CPU time
    run = lambda name, *extra: run_script("pici.py", *common_args, "--run-name", name, *extra, out_dir=tmp_path, data_root=tmp_path / "data")
    full = run("full")
    run("part", "--epochs", 3)
    state = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert state["stage"] == "boost" and state["stages"] == [1, 1, 2] and state["epoch"] == 3
    resumed = run("part", "--resume", "auto", "--epochs", 4)  # the run was started with --epochs 3: extended
    assert "resumed from epoch 3 (stage boost)" in resumed and "final: NMI" in full
    a = check_run_files(tmp_path / "full", 64, 4)
    b = json.loads((tmp_path / "part" / "final.json").read_text())
    assert all(a[k] == b[k] for k in ("nmi", "acc", "ari")), (a, b)
    logs = {p: [json.loads(line) for line in (tmp_path / p / "log.jsonl").read_text().splitlines()] for p in ("full", "part")}
    assert [r["loss"] for r in logs["full"]] == [r["loss"] for r in logs["part"]]  # every epoch, exactly
    log = logs["full"]
    assert [r["stage"] for r in log] == ["pretrain", "train", "boost", "boost"]
    assert [sorted(k for k in r if k.startswith("loss_")) for r in log] == [
        ["loss_pisd"], ["loss_cluster", "loss_instance", "loss_pisd"]] + [["loss_cli", "loss_cluster", "loss_instance"]] * 2
    assert all("nmi" in r for r in log[:3])  # evaluated every epoch here; the stage ends always are
    assert all(0 <= r["cli_agreement"] <= 1 for r in log[2:])


def test_authors_recipe_resumes_exactly_with_the_pseudo_labels_it_computed(tmp_path, image_folder):
    """--recipe authors labels once, at the first boosting epoch: a run stopped after that epoch and
    resumed goes on with those labels (kept in the checkpoint), as the uninterrupted run does."""
    flags = ["--dataset", image_folder, "--max-images", 32, "--image-size", 32, "--batch-size", 16, "--eval-every", 0,
             "--pretrain-epochs", 1, "--train-epochs", 0, "--boost-epochs", 2, "--recipe", "authors"]
    run = lambda name, *extra: in_process(pici, *flags, "--run-name", name, *extra, out_dir=tmp_path, data_root=tmp_path / "data")
    full = run("full")
    run("part", "--epochs", 2)
    assert torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["cli_targets"].shape == (2, 32)
    resumed = run("part", "--resume", "auto", "--epochs", 3)  # the run is extended to its 3 epochs
    logs = {p: [json.loads(line) for line in (tmp_path / p / "log.jsonl").read_text().splitlines()] for p in ("full", "part")}
    assert [r["loss"] for r in logs["full"]] == [r["loss"] for r in logs["part"]]
    assert "cli_agreement" not in logs["part"][-1]  # not labelled again after the resume
    assert all(full[k] == resumed[k] for k in ("nmi", "acc", "ari"))


def test_one_head_ablation_clusters_by_kmeans(tmp_path, image_folder):
    out = run_script("pici.py", "--dataset", image_folder, "--max-images", 128, "--image-size", 32, "--batch-size", 64,
                     "--epochs", 1, "--ablate", "pisd,cli", "--heads", "instance", "--run-name", "t7", out_dir=tmp_path, data_root=tmp_path / "data")
    assert "stage pretrain: skipped (0 epochs)" in out and "final: NMI" in out
    log = json.loads((tmp_path / "t7" / "log.jsonl").read_text())
    assert log["stage"] == "train" and [k for k in log if k.startswith("loss_")] == ["loss_instance"]


@pytest.mark.parametrize("bad", [["--image-size", "40"], ["--batch-size", "1"], ["--heads", "instance"], ["--boost-epochs", "3"],
                                 ["--mask-ratio", "1.0"], ["--ablate", "pisd", "--pretrain-epochs", "1", "--train-epochs", "1", "--boost-epochs", "1"],
                                 ["--epochs", "5", "--pretrain-epochs", "1", "--train-epochs", "1", "--boost-epochs", "1"]])
def test_bad_arguments_exit_2(tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as stop:  # in-process: the checks come before any work, so this is cheap
        pici.main(["--out-dir", str(tmp_path), "--data-root", str(tmp_path), "--device", "cpu", *bad])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())  # failed before any work


def test_script_exits_2_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "pici.py"), "--out-dir", str(tmp_path), "--device", "cpu", "--image-size", "40"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "multiple of 16" in proc.stderr
