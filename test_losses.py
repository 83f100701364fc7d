"""Every method's losses against its paper's equations, side by side.

Each loss is compared with a direct transcription of the printed equation: plain Python loops over
samples and clusters, in float64, written from the paper and not from the code under test. Then the
invariances each loss must have (batch order, cluster names, feature scale) and finite gradients
where a cluster receives no mass (softmax underflow), the case that breaks a careless log.

CC, VTCC, ViT-IC and PICI share CC's two losses (each method file holds its own copy, so that it
reads on its own); the tests run every copy against one transcription of the equations.

Run: python -m pytest -q test_losses.py
"""
import math

import pytest
import torch
import torch.nn.functional as F

import cc
import dcsc
import pici
import vitic
import vtcc


# --- transcriptions of the equations --------------------------------------------------------------

def cos(u, v):
    """Cosine similarity (CC Eq. 1; VTCC Eq. 1; ViT-IC Eq. 1). A zero vector, an empty cluster's
    column, has similarity 0 to everything, as F.normalize's eps gives."""
    return float(u @ v) / (max(float(u.norm()), 1e-12) * max(float(v.norm()), 1e-12))


def nt_xent_loop(a, b, tau):
    """NT-Xent over the 2N vectors a_1..a_N, b_1..b_N: for each vector, -log of exp(s(i, i')/tau)
    over the sum of exp(s(i, j)/tau) over the 2N-1 others (itself excluded), averaged over the 2N.

    CC Eq. (1)-(3) on rows and Eq. (4)-(5) on cluster columns; VTCC Eq. (2)-(9); ViT-IC Eq. (2)-(5);
    PICI Eq. (5)-(8); DCSC Eq. (3.1)-(3.3). VTCC and ViT-IC print the denominator as two sums, over
    the own view and over the other view. Read literally, VTCC's j != i on the other view's sum
    would drop the positive and ViT-IC's own-view sum would keep the vector itself; CC's form above
    is what every authors' code computes."""
    rows = list(a) + list(b)
    n, total = len(a), 0.0
    for i, u in enumerate(rows):
        positive = rows[(i + n) % (2 * n)]
        denominator = sum(math.exp(cos(u, v) / tau) for j, v in enumerate(rows) if j != i)
        total += -math.log(math.exp(cos(u, positive) / tau) / denominator)
    return total / (2 * n)


def entropy_term_loop(p):
    """log K - H(Y) for one view's (N, K) soft assignments, with P(y_k) = sum_i Y_ik / ||Y||_1 and
    H = -sum_k P log P (CC Eq. 6; VTCC Eq. 10-11; ViT-IC Eq. 5; PICI Eq. 9-11; DCSC Eq. 3.6).
    The papers write the term as "- H(Y)" with H defined as sum P log P, which read literally
    would minimise the entropy and reward collapse; CC's public code maximises it (as do VTCC's,
    ViT-IC's and PICI's), and so do the scripts. The constant log K makes a uniform share score 0."""
    n, k = p.shape
    total = sum(float(p[i, j]) for i in range(n) for j in range(k))
    shares = [sum(float(p[i, j]) for i in range(n)) / total for j in range(k)]
    return math.log(k) + sum(s * math.log(s) for s in shares if s > 0)


def cluster_loss_loop(p_a, p_b, tau):
    """CC Eq. (6): NT-Xent over the 2K cluster columns plus the entropy term of each view."""
    k = p_a.shape[1]
    columns = lambda p: [p[:, j] for j in range(k)]
    return nt_xent_loop(columns(p_a), columns(p_b), tau) + entropy_term_loop(p_a) + entropy_term_loop(p_b)


def softmax_rows(n, k, g, sharpness=2.0):
    return torch.softmax(sharpness * torch.randn(n, k, generator=g, dtype=torch.float64), dim=1)


def underflowing_softmax(n, k, column, g):
    """Leaf logits and their softmax, where `column` is exactly 0 in fp32: an empty cluster."""
    logits = torch.randn(n, k, generator=g)
    logits[:, column] = -1e4
    logits.requires_grad_(True)
    p = torch.softmax(logits, dim=1)
    assert (p[:, column] == 0).all()
    return logits, p


# --- CC, VTCC, ViT-IC, PICI: the instance and cluster losses ----------------------------------------
CC_FAMILY = [cc, vtcc, vitic, pici]
family = pytest.mark.parametrize("method", CC_FAMILY, ids=[m.__name__ for m in CC_FAMILY])


@family
@pytest.mark.parametrize("n,d,tau", [(2, 3, 0.5), (5, 8, 0.1), (7, 4, 0.2), (16, 4, 1.0), (4, 128, 0.5)])
def test_instance_loss_matches_the_equations(method, n, d, tau):
    g = torch.Generator().manual_seed(n * d)
    z_a, z_b = 3 * torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    assert method.instance_loss(z_a, z_b, tau).item() == pytest.approx(nt_xent_loop(z_a, z_b, tau), rel=1e-5)


@family
@pytest.mark.parametrize("n,k,tau", [(6, 2, 1.0), (8, 5, 1.0), (16, 10, 0.5), (3, 7, 1.0), (5, 21, 0.2), (16, 10, 2.0)])
def test_cluster_loss_matches_the_equations(method, n, k, tau):
    g = torch.Generator().manual_seed(n * k)
    p_a, p_b = softmax_rows(n, k, g), softmax_rows(n, k, g)
    assert method.cluster_loss(p_a, p_b, tau).item() == pytest.approx(cluster_loss_loop(p_a, p_b, tau), rel=1e-5)


@family
def test_invariances(method):
    g = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    perm, scale = torch.randperm(6, generator=g), torch.rand(6, 1, generator=g) + 0.1
    ref = method.instance_loss(z_a, z_b, 0.5)
    torch.testing.assert_close(method.instance_loss(z_a * scale, z_b, 0.5), ref)  # cosine: a row's scale is irrelevant
    torch.testing.assert_close(method.instance_loss(z_a[perm], z_b[perm], 0.5), ref)  # the batch's order
    torch.testing.assert_close(method.instance_loss(z_b, z_a, 0.5), ref)  # the two views play the same role
    assert method.instance_loss(z_a[perm], z_b, 0.5) > ref  # ... but the pairing of the views matters
    p_a, p_b = softmax_rows(6, 4, g).float(), softmax_rows(6, 4, g).float()
    ref = method.cluster_loss(p_a, p_b, 1.0)
    cols = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(method.cluster_loss(p_a[:, cols], p_b[:, cols], 1.0), ref)  # cluster names are arbitrary
    torch.testing.assert_close(method.cluster_loss(p_a[perm], p_b[perm], 1.0), ref)
    # the entropy term is 0 for a uniform batch share and 2 log K when all mass is in one cluster
    uniform = torch.eye(4).repeat(2, 1)
    collapsed = torch.zeros(8, 4).index_fill_(1, torch.tensor([0]), 1.0)
    contrastive = lambda p: method.instance_loss(p.T, p.T, 1.0)
    assert (method.cluster_loss(uniform, uniform, 1.0) - contrastive(uniform)).abs() < 1e-6
    assert (method.cluster_loss(collapsed, collapsed, 1.0) - contrastive(collapsed)).item() == pytest.approx(2 * math.log(4), rel=1e-5)


@family
def test_agreement_gives_a_lower_loss_than_random(method):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 8, generator=g)
    assert method.instance_loss(z, z, 0.5) < method.instance_loss(z, torch.randn(16, 8, generator=g), 0.5)
    one_hot = torch.eye(4).repeat(4, 1)  # confident, balanced, the same in both views
    random = torch.randn(16, 4, generator=g).softmax(1)
    assert method.cluster_loss(one_hot, one_hot, 1.0) < method.cluster_loss(random, random.flip(0), 1.0)


@family
def test_cluster_loss_finite_gradient_with_an_empty_cluster(method):
    g = torch.Generator().manual_seed(1)
    logits, p = underflowing_softmax(8, 5, 2, g)
    loss = method.cluster_loss(p, p.roll(1, dims=0), 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    leaf = p.detach().clone().requires_grad_(True)  # the probabilities themselves as leaves: a log hits the zeros
    loss = method.cluster_loss(leaf, leaf.flip(0), 1.0)
    loss.backward()
    assert torch.isfinite(leaf.grad).all()
    assert loss.item() == pytest.approx(cluster_loss_loop(leaf.detach().double(), leaf.detach().flip(0).double(), 1.0), rel=1e-5)


# --- PICI: reconstruction and cross-level interaction ------------------------------------------------

def reconstruction_loop(pred, target, mask, eps=1e-6):
    """PICI Eq. (1) for one view, with MAE's normalised-pixel target: each masked patch's target is
    standardised by its own mean and unbiased variance; squared error averaged over the patch's
    values, then over the masked patches."""
    total, count = 0.0, 0
    batch, length, values = pred.shape
    for b in range(batch):
        for patch in range(length):
            if mask[b, patch] == 0:
                continue
            t = target[b, patch].tolist()
            mean = sum(t) / values
            var = sum((v - mean) ** 2 for v in t) / (values - 1)
            total += sum((pred[b, patch, i].item() - (t[i] - mean) / math.sqrt(var + eps)) ** 2 for i in range(values)) / values
            count += 1
    return total / count


@pytest.mark.parametrize("batch,length,values", [(2, 4, 12), (3, 9, 6)])
def test_pici_reconstruction_loss_matches_eq_1_and_ignores_visible_patches(batch, length, values):
    g = torch.Generator().manual_seed(batch * length)
    pred = torch.randn(batch, length, values, generator=g, dtype=torch.float64)
    target = 3 * torch.rand(batch, length, values, generator=g, dtype=torch.float64) + 1
    mask = torch.zeros(batch, length)
    for b in range(batch):
        mask[b, torch.randperm(length, generator=g)[: length // 2]] = 1
    loss = pici.reconstruction_loss(pred, target, mask)
    assert loss.item() == pytest.approx(reconstruction_loop(pred, target, mask), rel=1e-5)
    visible = (mask == 0)[..., None]
    changed = pici.reconstruction_loss(pred + 5 * visible, target * torch.where(visible, 3.0, 1.0), mask)
    assert changed.item() == pytest.approx(loss.item(), rel=1e-9)  # visible patches do not count
    assert pici.reconstruction_loss(pred + 0.1 * (1 - visible.double()), target, mask).item() != pytest.approx(loss.item())


@pytest.mark.parametrize("n,k", [(4, 3), (9, 5)])
def test_pici_cli_loss_matches_eq_15(n, k):
    g = torch.Generator().manual_seed(n)
    p_a, p_b = softmax_rows(n, k, g, 1.0), softmax_rows(n, k, g, 1.0)
    t_a, t_b = torch.randint(k, (n,), generator=g), torch.randint(k, (n,), generator=g)
    # Eq. (15): -1/2 sum over views k of the mean over samples of log C^k at the view's own pseudo-label p~^k
    loop = 0.5 * sum(-sum(math.log(p[i, t[i]].item()) for i in range(n)) / n for p, t in ((p_a, t_a), (p_b, t_b)))
    loss = pici.cli_loss(p_a, p_b, t_a, t_b)
    assert loss.item() == pytest.approx(loop, rel=1e-6)
    assert loss.item() != pytest.approx(pici.cli_loss(p_a, p_b, t_a, t_a).item(), rel=1e-3)  # view b uses its own targets
    second_softmax = (F.cross_entropy(p_a, t_a) + F.cross_entropy(p_b, t_b)) / 2
    assert loss.item() != pytest.approx(second_softmax.item(), rel=1e-3)  # the log is of p itself, not of softmax(p)


def test_pici_cli_loss_finite_gradient_at_zero_probability():
    logits, p = underflowing_softmax(5, 3, 2, torch.Generator().manual_seed(2))
    targets = torch.tensor([2, 0, 1, 2, 0])
    loss = pici.cli_loss(p, p, targets, targets.flip(0))  # targets sit on a zero probability
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


# --- DCSC: feature-, cluster-, semantic-level contrast and the cluster regulariser -------------------

def neg_js(p, q):
    """s(p, q) = -JS(p, q) = -(KL(p || m) + KL(q || m)) / 2 with m = (p + q) / 2 (DCSC Sec. 3.1)."""
    m = (p + q) / 2
    kl = lambda x, y: sum(float(x[k] * math.log(x[k] / y[k])) for k in range(len(x)) if x[k] > 0)
    return -(kl(p, m) + kl(q, m)) / 2


def neg_kl(p, q):
    """s(p, q) = -KL(p || q) = -sum_k p_k log(p_k / q_k) (DCSC Sec. 3.1: "or KL divergence")."""
    return -sum(float(p[k] * math.log(p[k] / q[k])) for k in range(len(p)) if p[k] > 0)


SIMILARITIES = {"cosine": cos, "js": neg_js, "kl": neg_kl}


@pytest.mark.parametrize("similarity", ["js", "kl"])
def test_dcsc_divergence_similarities_match_their_definitions(similarity):
    g = torch.Generator().manual_seed(11)
    p, q = softmax_rows(5, 6, g), softmax_rows(4, 6, g)
    got = dcsc.pairwise_similarity(p, q, similarity)
    s = SIMILARITIES[similarity]
    expected = torch.tensor([[s(p[i], q[j]) for j in range(4)] for i in range(5)], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    assert torch.allclose(torch.diagonal(dcsc.pairwise_similarity(p, p, similarity)), torch.zeros(5, dtype=torch.float64))
    assert (got < 0).all()  # a divergence is positive between different distributions: s is negative
    if similarity == "kl":  # KL is not symmetric: s(p, q) != s(q, p)
        assert not torch.allclose(got[:4, :4], dcsc.pairwise_similarity(q, p[:4], "kl").T)
    else:
        torch.testing.assert_close(got[:4, :4], dcsc.pairwise_similarity(q, p[:4], "js").T)


def slc_loop(p_a, q_a, p_b, q_b, tau, s):
    """DCSC Eq. (3.4)-(3.5) as printed: sl_i^a = -log exp(s(p_i^a, q_i^b)/tau) /
    sum_j [exp(s(p_i^a, q_j^a)/tau) + exp(s(p_j^a, q_i^b)/tau)], j = 1..N; sl_i^b with a <-> b;
    the mean over the 2N terms."""
    n, total = len(p_a), 0.0
    for p, q, q_other in ((p_a, q_a, q_b), (p_b, q_b, q_a)):
        for i in range(n):
            denominator = sum(math.exp(s(p[i], q[j]) / tau) + math.exp(s(p[j], q_other[i]) / tau) for j in range(n))
            total += -math.log(math.exp(s(p[i], q_other[i]) / tau) / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("n,d,tau", [(2, 3, 0.2), (5, 8, 0.5), (7, 4, 1.0)])
def test_dcsc_flc_matches_eq_3_1_and_3_2(n, d, tau):
    g = torch.Generator().manual_seed(n)
    z_a, z_b = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    assert dcsc.flc_loss(z_a, z_b, tau).item() == pytest.approx(nt_xent_loop(z_a, z_b, tau), rel=1e-5)
    assert dcsc.flc_loss(3 * z_a, z_b, tau).item() == pytest.approx(nt_xent_loop(z_a, z_b, tau), rel=1e-5)  # normalised inside


@pytest.mark.parametrize("n,k,tau", [(4, 2, 1.0), (6, 5, 0.5), (9, 3, 2.0)])
def test_dcsc_clc_matches_eq_3_3(n, k, tau):
    g = torch.Generator().manual_seed(k)
    c_a, c_b = softmax_rows(n, k, g), softmax_rows(n, k, g)
    # the 2K columns of [C^a, C^b]; column j's positive is column j + K
    expected = nt_xent_loop([c_a[:, j] for j in range(k)], [c_b[:, j] for j in range(k)], tau)
    assert dcsc.clc_loss(c_a, c_b, tau).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("similarity", ["cosine", "js", "kl"])
@pytest.mark.parametrize("n,k,tau", [(2, 3, 1.0), (5, 4, 0.5), (6, 7, 0.2)])
def test_dcsc_slc_matches_eq_3_4_and_3_5(n, k, tau, similarity):
    g = torch.Generator().manual_seed(n * k)
    p_a, q_a, p_b, q_b = (softmax_rows(n, k, g) for _ in range(4))
    s = SIMILARITIES[similarity]
    got = dcsc.slc_loss(p_a, q_a, p_b, q_b, tau, similarity=similarity).item()
    assert got == pytest.approx(slc_loop(p_a, q_a, p_b, q_b, tau, s), rel=1e-5)


def test_dcsc_slc_is_asymmetric_in_p_and_q():
    g = torch.Generator().manual_seed(0)
    p_a, q_a, p_b, q_b = (softmax_rows(6, 5, g) for _ in range(4))
    # p (Spred) and q (Sproj) play different roles: swapping them changes the value ...
    assert dcsc.slc_loss(p_a, q_a, p_b, q_b, 1.0).item() != pytest.approx(dcsc.slc_loss(q_a, p_a, q_b, p_b, 1.0).item(), rel=1e-4)
    # ... swapping the views does not: Eq. (3.5) sums both directions
    assert dcsc.slc_loss(p_a, q_a, p_b, q_b, 1.0).item() == pytest.approx(dcsc.slc_loss(p_b, q_b, p_a, q_a, 1.0).item(), rel=1e-6)


@pytest.mark.parametrize("n,k", [(4, 2), (8, 5), (3, 10)])
def test_dcsc_cr_matches_eq_3_6(n, k):
    g = torch.Generator().manual_seed(n + k)
    c_a, c_b = softmax_rows(n, k, g), softmax_rows(n, k, g)
    assert dcsc.cr_loss(c_a, c_b).item() == pytest.approx(entropy_term_loop(c_a) + entropy_term_loop(c_b), rel=1e-5, abs=1e-6)
    uniform = torch.eye(k, dtype=torch.float64).repeat(2, 1)
    collapsed = torch.zeros(2 * k, k, dtype=torch.float64)
    collapsed[:, 0] = 1
    assert dcsc.cr_loss(uniform, uniform).item() == pytest.approx(0.0, abs=1e-5)  # fp32 inside
    assert dcsc.cr_loss(collapsed, collapsed).item() == pytest.approx(2 * math.log(k))


def test_dcsc_invariances():
    g = torch.Generator().manual_seed(3)
    n, k = 7, 4
    z_a, z_b = torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randn(n, 6, generator=g, dtype=torch.float64)
    c_a, c_b, p_a, q_a, p_b, q_b = (softmax_rows(n, k, g) for _ in range(6))
    perm = torch.randperm(n, generator=g)
    assert dcsc.flc_loss(z_a[perm], z_b[perm], 0.2).item() == pytest.approx(dcsc.flc_loss(z_a, z_b, 0.2).item(), rel=1e-6)
    assert dcsc.clc_loss(c_a[perm], c_b[perm], 1.0).item() == pytest.approx(dcsc.clc_loss(c_a, c_b, 1.0).item(), rel=1e-6)
    assert dcsc.cr_loss(c_a[perm], c_b[perm]).item() == pytest.approx(dcsc.cr_loss(c_a, c_b).item(), rel=1e-6)
    for s in ("cosine", "js", "kl"):
        before = dcsc.slc_loss(p_a, q_a, p_b, q_b, 1.0, s).item()
        assert dcsc.slc_loss(p_a[perm], q_a[perm], p_b[perm], q_b[perm], 1.0, s).item() == pytest.approx(before, rel=1e-6)
    cols = torch.randperm(k, generator=g)  # cluster names are arbitrary
    assert dcsc.clc_loss(c_a[:, cols], c_b[:, cols], 1.0).item() == pytest.approx(dcsc.clc_loss(c_a, c_b, 1.0).item(), rel=1e-6)
    # pairing the wrong rows of the two views does change the instance-level loss
    assert dcsc.flc_loss(z_a[perm], z_b, 0.2).item() != pytest.approx(dcsc.flc_loss(z_a, z_b, 0.2).item(), rel=1e-3)


@pytest.mark.parametrize("similarity", ["cosine", "js", "kl"])
def test_dcsc_finite_gradients_with_an_empty_cluster(similarity):
    g = torch.Generator().manual_seed(5)
    (la, c_a), (lb, c_b), (lp, p_a), (lq, q_a) = (underflowing_softmax(6, 4, 1, g) for _ in range(4))
    loss = dcsc.clc_loss(c_a, c_b, 1.0) + dcsc.cr_loss(c_a, c_b) + dcsc.slc_loss(p_a, q_a, c_b, c_a, 1.0, similarity)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(x.grad).all() for x in (la, lb, lp, lq))
    c = c_a.detach().clone().requires_grad_()  # a zero entry hit directly by the logs
    (dcsc.cr_loss(c, c) + dcsc.slc_loss(c, c, c, c, 1.0, similarity)).backward()
    assert torch.isfinite(c.grad).all()


def test_dcsc_agreement_beats_random():
    g = torch.Generator().manual_seed(7)
    n, k = 16, 4
    z = torch.randn(n, 8, generator=g)
    assert dcsc.flc_loss(z, z, 0.2) < dcsc.flc_loss(z, torch.randn(n, 8, generator=g), 0.2)
    one_hot = F.one_hot(torch.arange(n) % k, k).float() * 0.97 + 0.03 / k  # confident, balanced, agreeing views
    rand_a, rand_b = softmax_rows(n, k, g).float(), softmax_rows(n, k, g).float()
    assert dcsc.clc_loss(one_hot, one_hot, 1.0) < dcsc.clc_loss(rand_a, rand_b, 1.0)
    assert dcsc.cr_loss(one_hot, one_hot) < dcsc.cr_loss(rand_a, rand_b)
    for s in ("cosine", "js", "kl"):
        sharp = F.one_hot(torch.arange(n) % 16, 16).float() * 0.97 + 0.03 / 16  # distinct instances, distinct rows
        r = [softmax_rows(n, 16, g).float() for _ in range(4)]
        assert dcsc.slc_loss(sharp, sharp, sharp, sharp, 1.0, s) < dcsc.slc_loss(*r, 1.0, s)
