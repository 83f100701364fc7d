"""common.py: clustering metrics on hand-computed cases, the ViT and MAE parts and k-means."""
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import common


# --- metrics -----------------------------------------------------------------------------------
def test_acc_perfect_under_permuted_and_arbitrary_ids():
    y = [0, 0, 1, 1, 2, 2]
    assert common.cluster_acc(y, [7, 7, 3, 3, 9, 9]) == 1.0
    assert common.cluster_metrics(y, [2, 2, 0, 0, 1, 1]) == {"nmi": 1.0, "acc": 1.0, "ari": 1.0}


def test_acc_hand_computed():
    # clusters {0,1,2} -> 0, {3,4,5} -> 1; best match: cluster 0 <-> class 0 (2 right), 1 <-> 2 (2 right)
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 0, 1, 1, 1]
    assert common.cluster_acc(y_true, y_pred) == pytest.approx(4 / 6)


def test_acc_empty_cluster_zero():
    # cluster id 0 is never used (the authors' code shifts ids here and is wrong)
    y_true = [0, 0, 1, 1]
    y_pred = [1, 1, 2, 2]
    assert common.cluster_acc(y_true, y_pred) == 1.0
    y_pred = [1, 2, 2, 2]
    assert common.cluster_acc(y_true, y_pred) == pytest.approx(3 / 4)


def test_acc_more_clusters_than_classes():
    # 4 clusters, 2 classes: only two clusters can be matched; the others count as errors
    y_true = [0, 0, 0, 1, 1, 1]
    y_pred = [0, 0, 1, 2, 2, 3]
    assert common.cluster_acc(y_true, y_pred) == pytest.approx(4 / 6)


def test_nmi_ari_known_values():
    # independent labelling: NMI 0; all in one cluster: ARI 0
    m = common.cluster_metrics([0, 0, 1, 1], [0, 1, 0, 1])
    assert m["nmi"] == pytest.approx(0.0, abs=1e-12) and m["acc"] == 0.5
    assert common.cluster_metrics([0, 0, 1, 1], [0, 0, 0, 0])["ari"] == pytest.approx(0.0)
    # a hand-computed ARI: y = [0,0,0,1,1,1], p = [0,0,1,1,2,2]
    # contingency [[2,1,0],[0,1,2]]: sum_ij C(n_ij,2) = 2; rows sum C(3,2)*2 = 6; columns C(2,2)*3 = 3;
    # expected 6*3/C(6,2) = 1.2; max (6+3)/2 = 4.5; ARI = (2-1.2)/(4.5-1.2)
    m = common.cluster_metrics([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2])
    assert m["ari"] == pytest.approx(0.8 / 3.3)


def test_cluster_health():
    h = common.cluster_health(np.array([0, 0, 1, 1]), 4)
    assert h == {"entropy": pytest.approx(math.log(2)), "min_share": 0.0, "max_share": 0.5, "empty": 2}


# --- ViT ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,tokens", [(224, 196), (128, 64), (32, 4)])
@pytest.mark.parametrize("stem", ["conv", "patchify"])
def test_vit_token_counts(size, tokens, stem):
    vit = common.ViT(size, dim=64, depth=1, heads=4, stem=stem)
    x = torch.randn(2, 3, size, size)
    t, mask, _ = vit.forward_features(x)
    assert t.shape == (2, 1 + tokens, 64) and mask is None
    assert vit(x).shape == (2, 64)


def test_vit_rejects_other_sizes():
    with pytest.raises(ValueError, match="multiple of 16"):
        common.ViT(100, dim=64, depth=1, heads=4)
    vit = common.ViT(32, dim=64, depth=1, heads=4)
    with pytest.raises(ValueError, match="built for 32"):
        vit(torch.randn(1, 3, 64, 64))


def test_sincos_table_formula():
    dim, g = 16, 3
    table = common.ViT(16 * g, dim, 1, 4).pos_embed[0]  # fixed 2-D sin-cos positions
    assert table.shape == (1 + g * g, dim) and torch.all(table[0] == 0)
    q = dim // 4
    for t in range(g * g):
        row, col = divmod(t, g)
        for k in range(q):
            w = 1 / 10000 ** (k / q)
            expected = [math.sin(col * w), math.cos(col * w), math.sin(row * w), math.cos(row * w)]
            got = [table[1 + t, k], table[1 + t, q + k], table[1 + t, 2 * q + k], table[1 + t, 3 * q + k]]
            assert [float(v) for v in got] == pytest.approx(expected, abs=1e-6)


def count(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_parameter_counts_of_spec_configurations():
    assert count(common.ViT(224, 384, 8, 12, stem="conv")) == 15_218_352  # VTCC backbone
    assert count(common.ViT(128, 288, 8, 12, stem="conv")) == 8_568_612  # ViT-IC backbone
    enc = common.ViT(224, 384, 6, 12, stem="patchify", positions="learnable")  # PICI encoder
    assert count(enc) == 10_943_232 + 75_648 and enc.pos_embed.numel() == 75_648
    dec = common.MAEDecoder(196, 384, 512, 8, 16)
    assert count(dec) == 25_811_712 + 100_864
    # fixed positions are a buffer, not a parameter, and follow the image size
    vit = common.ViT(64, 384, 1, 12)
    assert "pos_embed" not in dict(vit.named_parameters()) and vit.pos_embed.shape == (1, 17, 384)


# --- MAE ---------------------------------------------------------------------------------------
def test_patchify_layout():
    x = torch.randn(2, 3, 32, 32)
    p = common.patchify(x, 16)
    assert p.shape == (2, 4, 768)
    # patches in row-major order (patch 1 is the top-right 16x16 block), pixels in (row, col, channel) order
    for i, (row, col) in enumerate([(0, 0), (0, 16), (16, 0), (16, 16)]):
        assert torch.equal(p[1, i].view(16, 16, 3), x[1, :, row:row + 16, col:col + 16].permute(1, 2, 0))


def test_random_masking_counts_and_restore_order():
    x = torch.arange(2 * 8, dtype=torch.float).view(2, 8, 1).expand(-1, -1, 4).contiguous()
    gen = torch.Generator().manual_seed(0)
    kept, mask, ids_restore = common.random_masking(x, 0.75, gen)
    assert kept.shape == (2, 2, 4) and mask.sum(1).tolist() == [6, 6]
    for b in range(2):
        visible = (mask[b] == 0).nonzero().flatten()
        # the kept tokens are exactly the unmasked ones
        assert sorted(kept[b, :, 0].tolist()) == sorted(x[b, visible, 0].tolist())
    # ids_restore undoes the shuffle: visible first then the rest, gathered back, is the original order
    shuffle = ids_restore.argsort(dim=1)
    shuffled = torch.gather(x, 1, shuffle[:, :, None].expand(-1, -1, 4))
    assert torch.equal(torch.gather(shuffled, 1, ids_restore[:, :, None].expand(-1, -1, 4)), x)
    assert torch.equal(shuffled[:, :2], kept)
    # a seeded generator gives the same mask
    _, mask2, _ = common.random_masking(x, 0.75, torch.Generator().manual_seed(0))
    assert torch.equal(mask, mask2)


def test_masked_encoder_and_decoder_shapes():
    enc = common.ViT(64, 32, 1, 4, stem="patchify", positions="learnable")
    dec = common.MAEDecoder(16, 32, 32, 1, 4)
    latent, mask, ids = enc.forward_features(torch.randn(3, 3, 64, 64), 0.5, torch.Generator().manual_seed(1))
    assert latent.shape == (3, 1 + 8, 32) and mask.shape == (3, 16)
    assert dec(latent, ids).shape == (3, 16, 768)


def test_masked_patch_mse_only_counts_masked_patches():
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(2, 4, 12, generator=gen)
    pred = torch.randn(2, 4, 12, generator=gen)
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1.0]])
    loss = common.masked_patch_mse(pred, target, mask)
    # change the visible patches' predictions: the loss does not move
    other = pred.clone()
    other[mask == 0] += 100
    assert common.masked_patch_mse(other, target, mask) == pytest.approx(loss.item())
    # direct transcription: normalise each target patch, mean square error per patch, mean over masked
    total, n = 0.0, 0
    for b in range(2):
        for i in range(4):
            if mask[b, i]:
                t = target[b, i]
                t = (t - t.mean()) / (t.var() + 1e-6) ** 0.5
                total += ((pred[b, i] - t) ** 2).mean().item()
                n += 1
    assert loss.item() == pytest.approx(total / n, rel=1e-5)


# --- k-means ----------------------------------------------------------------------------------
def test_kmeans_recovers_obvious_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(3) * 10
    x = torch.cat([c + 0.1 * torch.randn(20, 3, generator=gen) for c in centres])
    labels, conf = common.kmeans(x, 3, seed=0)
    assert common.cluster_acc(np.repeat([0, 1, 2], 20), labels.numpy()) == 1.0
    assert conf.shape == (60,) and bool((conf > 0.3).all() and (conf <= 1).all())


# --- the method files' own training loops ----------------------------------------------------------
SHARED_PARTS = {"ViT", "MAEDecoder", "patchify", "random_masking", "masked_patch_mse", "kmeans", "predict", "arg", "check",
                "cluster_metrics", "cluster_acc"}  # the model and metric parts the scripts share


@pytest.mark.parametrize("method", ["cc", "vtcc", "vitic", "pici", "dcsc"])
def test_each_method_writes_its_own_training_loop(method):
    """A reader of main() sees the optimiser, the autocast context, backward and the step; of common.py's
    plumbing a method uses at most 10 names."""
    source = (Path(__file__).resolve().parent.parent / f"{method}.py").read_text()
    main = source[source.index("def main("):]
    for part in ("torch.optim.Adam(", "torch.amp.GradScaler(", "torch.autocast(", "optimizer.zero_grad(set_to_none=True)",
                 "scaler.scale(", ").backward()", "scaler.step(optimizer)", "scaler.update()", "for epoch in range(", "for x, "):
        assert part in main, part
    plumbing = set(re.findall(r"common\.(\w+)", source)) - SHARED_PARTS
    assert len(plumbing) <= 10, sorted(plumbing)
