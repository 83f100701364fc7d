"""cc.py: the losses against loop transcriptions of CC's equations, the network's sizes, and an
end-to-end run with exact resume."""
import math
import subprocess
import sys

import pytest
import torch

import cc
from conftest import ROOT, check_resume


def cos(u, v):
    return float(u @ v / (u.norm() * v.norm()))


def loop_nt_xent(a, b, tau):
    """CC Eq. (1)-(3) (instance) and Eq. (4)-(5) (cluster, on columns) written out: for each of the
    2N vectors, -log exp(s(i, i')/tau) / sum over the 2N-1 others (self excluded, SPEC §1)."""
    rows = list(a) + list(b)
    n = len(a)
    total = 0.0
    for i, u in enumerate(rows):
        pos = i + n if i < n else i - n
        denom = sum(math.exp(cos(u, v) / tau) for j, v in enumerate(rows) if j != i)
        total += -math.log(math.exp(cos(u, rows[pos]) / tau) / denom)
    return total / (2 * n)


def loop_entropy_term(p):
    """log K - H(P) with P the batch share of each cluster (CC Eq. (6)'s H term, the sign that
    maximises entropy, SPEC §1)."""
    k = p.shape[1]
    share = [float(p[:, j].sum() / p.sum()) for j in range(k)]
    return math.log(k) + sum(s * math.log(s) for s in share if s > 0)


@pytest.mark.parametrize("n,d,tau", [(2, 3, 0.5), (5, 8, 0.5), (7, 4, 0.2), (4, 16, 1.0)])
def test_instance_loss_matches_equations(n, d, tau):
    g = torch.Generator().manual_seed(n * d)
    z_a, z_b = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    assert cc.instance_loss(z_a, z_b, tau).item() == pytest.approx(loop_nt_xent(z_a, z_b, tau), rel=1e-5)


@pytest.mark.parametrize("n,k,tau", [(6, 2, 1.0), (8, 5, 1.0), (16, 10, 0.5), (3, 7, 1.0)])
def test_cluster_loss_matches_equations(n, k, tau):
    g = torch.Generator().manual_seed(n * k)
    p_a = torch.randn(n, k, generator=g).softmax(1)
    p_b = torch.randn(n, k, generator=g).softmax(1)
    expected = loop_nt_xent(p_a.T.double(), p_b.T.double(), tau) + loop_entropy_term(p_a) + loop_entropy_term(p_b)
    assert cc.cluster_loss(p_a, p_b, tau).item() == pytest.approx(expected, rel=1e-5)


def test_losses_invariant_to_batch_permutation():
    g = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    p_a, p_b = torch.randn(8, 3, generator=g).softmax(1), torch.randn(8, 3, generator=g).softmax(1)
    perm = torch.randperm(8, generator=g)
    assert cc.instance_loss(z_a[perm], z_b[perm], 0.5).item() == pytest.approx(cc.instance_loss(z_a, z_b, 0.5).item(), rel=1e-6)
    assert cc.cluster_loss(p_a[perm], p_b[perm], 1.0).item() == pytest.approx(cc.cluster_loss(p_a, p_b, 1.0).item(), rel=1e-6)
    # the instance loss is also blind to the scale of each feature (it L2-normalises)
    assert cc.instance_loss(3 * z_a, z_b, 0.5).item() == pytest.approx(cc.instance_loss(z_a, z_b, 0.5).item(), rel=1e-6)


def test_cluster_loss_finite_gradient_with_an_empty_cluster():
    logits = torch.randn(6, 4)
    logits[:, 0] = -1e4  # cluster 0's column underflows to exactly 0 after the softmax
    logits.requires_grad_(True)
    p = logits.softmax(1)
    assert float(p[:, 0].max()) == 0.0
    loss = cc.cluster_loss(p, p.roll(1, 0), 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_agreement_gives_a_lower_loss_than_random():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 8, generator=g)
    assert cc.instance_loss(z, z, 0.5) < cc.instance_loss(z, torch.randn(16, 8, generator=g), 0.5)
    one_hot = torch.eye(4).repeat(4, 1)  # confident, balanced, and the same in both views
    random = torch.randn(16, 4, generator=g).softmax(1)
    assert cc.cluster_loss(one_hot, one_hot, 1.0) < cc.cluster_loss(random, random.flip(0), 1.0)


def test_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())
    for k in (10, 21):
        net = cc.Network(k)
        assert count(net.backbone) == 21_284_672  # torchvision ResNet34 without fc
        assert count(net.instance_head) == 328_320
        assert count(net.cluster_head) == 262_656 + 513 * k
    z, p = cc.Network(3, 32).eval()(torch.randn(2, 3, 32, 32))
    assert z.shape == (2, 128) and p.shape == (2, 3) and torch.allclose(p.sum(1), torch.ones(2))


def test_end_to_end_and_exact_resume(tmp_path, image_folder):
    check_resume("cc.py", tmp_path, image_folder, "--batch-size", 64)


@pytest.mark.parametrize("bad", [["--batch-size", "1"], ["--num-clusters", "1"], ["--device", "tpu"], ["--dataset", "nope"]])
def test_bad_arguments_exit_2(tmp_path, bad):
    proc = subprocess.run([sys.executable, str(ROOT / "cc.py"), "--out-dir", str(tmp_path), "--data-root", str(tmp_path), *bad],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error:")
