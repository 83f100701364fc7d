"""Tests of vitic.py: each loss against a loop over the ViT-IC paper's equations, invariances,
finite gradients with an empty cluster, parameter counts, and an end-to-end run that resumes exactly."""
import math

import pytest
import torch

import vitic
from conftest import check_resume


def cos(u, v):  # Eq. (1)
    return float(u @ v / (u.norm() * v.norm()))


def loop_nt_xent(a, b, tau):
    """Eq. (2)-(3) (and (4)-(5) on columns) written out: for row i of view a, the positive is row i
    of view b; the denominator runs over all rows of both views except i itself (SPEC §1; the
    printed Eq. (2) would include j = i in its first sum)."""
    a, b, n = a.double(), b.double(), len(a)
    total = 0.0
    for x, y in ((a, b), (b, a)):
        for i in range(n):
            denom = sum(math.exp(cos(x[i], x[j]) / tau) for j in range(n) if j != i)
            denom += sum(math.exp(cos(x[i], y[j]) / tau) for j in range(n))
            total += -math.log(math.exp(cos(x[i], y[i]) / tau) / denom)
    return total / (2 * n)


def loop_cluster_loss(p_a, p_b, tau):
    """Eq. (4)-(5): NT-Xent over the 2K columns, plus log K + sum_i P(y_i) log P(y_i) per view
    (SPEC §1's sign: the entropy of the batch cluster distribution is maximised)."""
    k = p_a.shape[1]
    value = loop_nt_xent(p_a.T, p_b.T, tau)
    for p in (p_a.double(), p_b.double()):
        shares = [float(p[:, i].sum() / p.sum()) for i in range(k)]  # P(y_i) = sum_j Y_ji / ||Y||_1
        value += math.log(k) + sum(s * math.log(s) for s in shares)
    return value


@pytest.mark.parametrize("n,d,tau", [(2, 3, 0.5), (5, 8, 0.5), (7, 4, 0.1), (4, 16, 1.0)])
def test_instance_loss_matches_loop(n, d, tau):
    g = torch.Generator().manual_seed(n * 100 + d)
    z_a, z_b = torch.randn(n, d, generator=g) * 3, torch.randn(n, d, generator=g)  # unnormalised: Eq. (1) normalises
    assert vitic.instance_loss(z_a, z_b, tau).item() == pytest.approx(loop_nt_xent(z_a, z_b, tau), rel=1e-5)


@pytest.mark.parametrize("n,k,tau", [(4, 2, 1.0), (8, 3, 1.0), (6, 5, 0.5), (16, 10, 2.0)])
def test_cluster_loss_matches_loop(n, k, tau):
    g = torch.Generator().manual_seed(n * 100 + k)
    p_a = torch.softmax(torch.randn(n, k, generator=g) * 2, dim=1)
    p_b = torch.softmax(torch.randn(n, k, generator=g) * 2, dim=1)
    assert vitic.cluster_loss(p_a, p_b, tau).item() == pytest.approx(loop_cluster_loss(p_a, p_b, tau), rel=1e-5)


def test_losses_invariances():
    g = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    perm = torch.randperm(6, generator=g)
    base = vitic.instance_loss(z_a, z_b, 0.5)
    torch.testing.assert_close(vitic.instance_loss(z_a * 5, z_b * 0.1, 0.5), base)  # cosine: scale-free
    torch.testing.assert_close(vitic.instance_loss(z_a[perm], z_b[perm], 0.5), base)  # order of the batch
    torch.testing.assert_close(vitic.instance_loss(z_b, z_a, 0.5), base)  # symmetric in the views
    p_a = torch.softmax(torch.randn(6, 4, generator=g), dim=1)
    p_b = torch.softmax(torch.randn(6, 4, generator=g), dim=1)
    cols = torch.tensor([2, 0, 3, 1])
    base = vitic.cluster_loss(p_a, p_b, 1.0)
    torch.testing.assert_close(vitic.cluster_loss(p_a[:, cols], p_b[:, cols], 1.0), base)  # cluster ids are arbitrary
    torch.testing.assert_close(vitic.cluster_loss(p_a[perm], p_b[perm], 1.0), base)
    # the entropy term is zero for uniform batch shares and positive otherwise
    flat = torch.full((4, 4), 0.25)
    assert vitic.cluster_loss(flat, flat, 1.0).item() == pytest.approx(vitic.instance_loss(flat.T, flat.T, 1.0).item(), abs=1e-6)
    peaked = torch.eye(4)[[0, 0, 0, 1]]
    assert vitic.cluster_loss(peaked, peaked, 1.0) > vitic.instance_loss(peaked.T, peaked.T, 1.0) + 0.1


def test_cluster_loss_empty_column_has_finite_gradient():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 5, generator=g)
    logits[:, 2] = -1e4  # softmax underflows to exactly 0: an empty cluster in both views
    logits.requires_grad_(True)
    p = torch.softmax(logits, dim=1)
    assert (p[:, 2] == 0).all()
    loss = vitic.cluster_loss(p, p.roll(1, dims=0), 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    leaf = p.detach().clone().requires_grad_(True)  # the probabilities themselves as leaves
    vitic.cluster_loss(leaf, leaf.flip(0), 1.0).backward()
    assert torch.isfinite(leaf.grad).all()


def count(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("k", [4, 21])
def test_parameter_counts(k):
    model = vitic.Network(k)  # ViT-IC paper, Sec. 4.1: dim 288, 8 blocks, 12 heads, heads 1344 wide
    assert count(model.backbone) == 8_568_612
    assert count(model.instance_head) == 2_373_632
    assert count(model.cluster_head) == 2_201_472 + 1345 * k
    assert not any(n.startswith("backbone.pos_embed") for n, _ in model.named_parameters())  # fixed sin-cos


def test_network_shapes_and_image_sizes():
    model = vitic.Network(3, image_size=32).eval()
    z, p = model(torch.randn(2, 3, 32, 32))
    assert z.shape == (2, 128) and p.shape == (2, 3)
    torch.testing.assert_close(p.sum(dim=1), torch.ones(2))
    assert vitic.Network(3, image_size=64).backbone.pos_embed.shape == (1, 1 + 16, 288)  # table follows the size
    with pytest.raises(ValueError, match="multiple of 16"):
        vitic.Network(3, image_size=40)


@pytest.mark.parametrize("flags,words", [(["--image-size", "40"], "multiple of 16"), (["--batch-size", "1"], "at least 2"),
                                         (["--num-clusters", "1"], "at least 2")])
def test_bad_arguments_exit_2(tmp_path, capsys, flags, words):
    with pytest.raises(SystemExit) as exit_:
        vitic.main(["--out-dir", str(tmp_path / "runs"), "--data-root", str(tmp_path / "data"), "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and words in err, err
    assert len(err.strip().splitlines()) == 1 and not any(tmp_path.iterdir())  # one line, before any work


def test_end_to_end_resumes_exactly(tmp_path, image_folder):
    final = check_resume("vitic.py", tmp_path, image_folder, "--batch-size", 64)
    assert final["epochs"] == 2
