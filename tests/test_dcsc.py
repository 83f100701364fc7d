"""dcsc.py: each loss against a loop transcription of its equation, invariances, finite gradients,
parameter counts, the ablations, and an end-to-end CPU run with exact resume."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import common
import data
import dcsc
from conftest import check_resume, run_script


def cos(u, v):
    return float(u @ v / (u.norm() * v.norm()))


def neg_js(p, q):
    """-JS(p, q) = -(KL(p||m) + KL(q||m)) / 2, m = (p + q) / 2, written as the definition."""
    m = (p + q) / 2
    kl = lambda x, y: sum(float(x[k] * math.log(x[k] / y[k])) for k in range(len(x)) if x[k] > 0)
    return -(kl(p, m) + kl(q, m)) / 2


def probs(n, k, g):
    return torch.softmax(2 * torch.randn(n, k, generator=g, dtype=torch.float64), dim=1)


# --- loop transcriptions of the paper's equations ----------------------------------------------
def flc_loop(z_a, z_b, tau):
    """Eq. (3.1)-(3.2) with the denominator over the other 2N-1 rows (self excluded, SPEC §1)."""
    z = torch.cat([z_a, z_b])
    n = len(z_a)
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        den = sum(math.exp(cos(z[i], z[j]) / tau) for j in range(2 * n) if j != i)
        total += -math.log(math.exp(cos(z[i], z[pos]) / tau) / den)
    return total / (2 * n)


def clc_loop(c_a, c_b, tau):
    """Eq. (3.3): the 2K columns of C = [C^a, C^b]; column j's positive is column j+K (and back);
    its denominator sums over the other 2K-1 columns; mean over the 2K columns."""
    c = torch.cat([c_a, c_b], dim=1)
    k = c_a.shape[1]
    total = 0.0
    for j in range(2 * k):
        pos = (j + k) % (2 * k)
        den = sum(math.exp(cos(c[:, j], c[:, m]) / tau) for m in range(2 * k) if m != j)
        total += -math.log(math.exp(cos(c[:, j], c[:, pos]) / tau) / den)
    return total / (2 * k)


def slc_loop(p_a, q_a, p_b, q_b, tau, s):
    """Eq. (3.4)-(3.5) as printed: sl_i^a = -log exp(s(p_i^a, q_i^b)/tau) /
    sum_j [exp(s(p_i^a, q_j^a)/tau) + exp(s(p_j^a, q_i^b)/tau)], j = 1..N; sl_i^b with a <-> b."""
    n = len(p_a)
    total = 0.0
    for p, q, q_o in ((p_a, q_a, q_b), (p_b, q_b, q_a)):
        for i in range(n):
            den = sum(math.exp(s(p[i], q[j]) / tau) + math.exp(s(p[j], q_o[i]) / tau) for j in range(n))
            total += -math.log(math.exp(s(p[i], q_o[i]) / tau) / den)
    return total / (2 * n)


def cr_loop(c_a, c_b):
    """Eq. (3.6) with the entropy-maximising sign (SPEC §2): sum over views of log K + sum_j P_j log P_j,
    P_j = sum_i c_ij / N."""
    total = 0.0
    for c in (c_a, c_b):
        n, k = c.shape
        total += math.log(k)
        for j in range(k):
            share = sum(float(c[i, j]) for i in range(n)) / n
            total += share * math.log(share) if share > 0 else 0.0
    return total


@pytest.mark.parametrize("n,d,tau", [(2, 3, 0.2), (5, 8, 0.5), (7, 4, 1.0)])
def test_flc_matches_loop(n, d, tau):
    g = torch.Generator().manual_seed(n)
    z_a, z_b = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    assert dcsc.flc_loss(z_a, z_b, tau).item() == pytest.approx(flc_loop(z_a, z_b, tau), rel=1e-5)
    # Fproj's outputs are L2-normalised inside: scaling a row changes nothing
    assert dcsc.flc_loss(3 * z_a, z_b, tau).item() == pytest.approx(flc_loop(z_a, z_b, tau), rel=1e-5)


@pytest.mark.parametrize("n,k,tau", [(4, 2, 1.0), (6, 5, 0.5), (9, 3, 2.0)])
def test_clc_matches_loop(n, k, tau):
    g = torch.Generator().manual_seed(k)
    c_a, c_b = probs(n, k, g), probs(n, k, g)
    assert dcsc.clc_loss(c_a, c_b, tau).item() == pytest.approx(clc_loop(c_a, c_b, tau), rel=1e-5)


@pytest.mark.parametrize("similarity", ["cosine", "js"])
@pytest.mark.parametrize("n,k,tau", [(2, 3, 1.0), (5, 4, 0.5), (6, 7, 0.2)])
def test_slc_matches_literal_loop(n, k, tau, similarity):
    g = torch.Generator().manual_seed(n * k)
    p_a, q_a, p_b, q_b = (probs(n, k, g) for _ in range(4))
    s = cos if similarity == "cosine" else neg_js
    got = dcsc.slc_loss(p_a, q_a, p_b, q_b, tau, similarity=similarity).item()
    assert got == pytest.approx(slc_loop(p_a, q_a, p_b, q_b, tau, s), rel=1e-5)


def test_slc_is_asymmetric_in_p_and_q():
    # p (Spred) and q (Sproj) play different roles: swapping them changes the value
    g = torch.Generator().manual_seed(0)
    p_a, q_a, p_b, q_b = (probs(6, 5, g) for _ in range(4))
    assert dcsc.slc_loss(p_a, q_a, p_b, q_b, 1.0).item() != pytest.approx(dcsc.slc_loss(q_a, p_a, q_b, p_b, 1.0).item(), rel=1e-4)
    # swapping the two views (a <-> b) does not: Eq. (3.5) sums both directions
    assert dcsc.slc_loss(p_a, q_a, p_b, q_b, 1.0).item() == pytest.approx(dcsc.slc_loss(p_b, q_b, p_a, q_a, 1.0).item(), rel=1e-6)


@pytest.mark.parametrize("n,k", [(4, 2), (8, 5), (3, 10)])
def test_cr_matches_loop_and_sign(n, k):
    g = torch.Generator().manual_seed(n + k)
    c_a, c_b = probs(n, k, g), probs(n, k, g)
    assert dcsc.cr_loss(c_a, c_b).item() == pytest.approx(cr_loop(c_a, c_b), rel=1e-5, abs=1e-6)
    # the sign that maximises entropy: a uniform batch share gives 0, all mass in one cluster 2 log K
    uniform = torch.eye(k, dtype=torch.float64).repeat(2, 1)
    collapsed = torch.zeros(2 * k, k, dtype=torch.float64)
    collapsed[:, 0] = 1
    assert dcsc.cr_loss(uniform, uniform).item() == pytest.approx(0.0, abs=1e-5)  # fp32 inside
    assert dcsc.cr_loss(collapsed, collapsed).item() == pytest.approx(2 * math.log(k))


def test_permuting_the_batch_changes_no_loss():
    # the losses compute in fp32: equal up to summation order
    g = torch.Generator().manual_seed(3)
    n, k = 7, 4
    z_a, z_b = torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randn(n, 6, generator=g, dtype=torch.float64)
    c_a, c_b, p_a, q_a, p_b, q_b = (probs(n, k, g) for _ in range(6))
    perm = torch.randperm(n, generator=g)
    assert dcsc.flc_loss(z_a[perm], z_b[perm], 0.2).item() == pytest.approx(dcsc.flc_loss(z_a, z_b, 0.2).item(), rel=1e-6)
    assert dcsc.clc_loss(c_a[perm], c_b[perm], 1.0).item() == pytest.approx(dcsc.clc_loss(c_a, c_b, 1.0).item(), rel=1e-6)
    assert dcsc.cr_loss(c_a[perm], c_b[perm]).item() == pytest.approx(dcsc.cr_loss(c_a, c_b).item(), rel=1e-6)
    for s in ("cosine", "js"):
        before = dcsc.slc_loss(p_a, q_a, p_b, q_b, 1.0, s).item()
        assert dcsc.slc_loss(p_a[perm], q_a[perm], p_b[perm], q_b[perm], 1.0, s).item() == pytest.approx(before, rel=1e-6)
    # relabelling the clusters (the same permutation of columns in both views) changes nothing either
    cols = torch.randperm(k, generator=g)
    assert dcsc.clc_loss(c_a[:, cols], c_b[:, cols], 1.0).item() == pytest.approx(dcsc.clc_loss(c_a, c_b, 1.0).item(), rel=1e-6)
    # ... but pairing the wrong rows of the two views does change the instance-level losses
    assert dcsc.flc_loss(z_a[perm], z_b, 0.2).item() != pytest.approx(dcsc.flc_loss(z_a, z_b, 0.2).item(), rel=1e-3)


@pytest.mark.parametrize("similarity", ["cosine", "js"])
def test_finite_gradients_with_an_empty_cluster(similarity):
    g = torch.Generator().manual_seed(5)
    n, k = 6, 4
    logits = [torch.randn(n, k, generator=g) for _ in range(4)]
    for x in logits:
        x[:, 1] = -1e4  # column 1 underflows to exactly 0 after the softmax
    leaves = [x.clone().requires_grad_() for x in logits]
    c_a, c_b, p_a, q_a = (torch.softmax(x, dim=1) for x in leaves)
    assert (c_a[:, 1] == 0).all()
    loss = dcsc.clc_loss(c_a, c_b, 1.0) + dcsc.cr_loss(c_a, c_b) + dcsc.slc_loss(p_a, q_a, c_b, c_a, 1.0, similarity)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(x.grad).all() for x in leaves)
    # and on the probabilities themselves (a zero entry hit directly by the logs)
    c = torch.softmax(logits[0], dim=1).detach().requires_grad_()
    (dcsc.cr_loss(c, c) + dcsc.slc_loss(c, c, c, c, 1.0, similarity)).backward()
    assert torch.isfinite(c.grad).all()


def test_agreement_beats_random():
    g = torch.Generator().manual_seed(7)
    n, k = 16, 4
    z = torch.randn(n, 8, generator=g)
    assert dcsc.flc_loss(z, z, 0.2) < dcsc.flc_loss(z, torch.randn(n, 8, generator=g), 0.2)
    onehot = F.one_hot(torch.arange(n) % k, k).float() * 0.97 + 0.03 / k  # confident, balanced, agreeing views
    rand_a, rand_b = probs(n, k, g).float(), probs(n, k, g).float()
    assert dcsc.clc_loss(onehot, onehot, 1.0) < dcsc.clc_loss(rand_a, rand_b, 1.0)
    assert dcsc.cr_loss(onehot, onehot) < dcsc.cr_loss(rand_a, rand_b)
    for s in ("cosine", "js"):
        sharp = F.one_hot(torch.arange(n) % 16, 16).float() * 0.97 + 0.03 / 16  # distinct instances, distinct rows
        r = [probs(n, 16, g).float() for _ in range(4)]
        assert dcsc.slc_loss(sharp, sharp, sharp, sharp, 1.0, s) < dcsc.slc_loss(*r, 1.0, s)


# --- network -----------------------------------------------------------------------------------
def head_params(d_in, hidden, d_out, bn=True):
    """Linear(d_in, hidden) + BN(hidden) (weight and bias) + Linear(hidden, d_out)."""
    return d_in * hidden + hidden + (2 * hidden if bn else 0) + hidden * d_out + d_out


@pytest.mark.parametrize("k,ks", [(10, 70), (21, 700)])
def test_parameter_counts(k, ks):
    count = lambda m: sum(p.numel() for p in m.parameters())
    net = dcsc.Network(num_clusters=k, overcluster=ks)
    assert count(net.backbone) == 21_284_672  # torchvision ResNet34 without fc
    assert count(net.instance_head) == 329_344 == head_params(512, 512, 128)
    assert count(net.cluster_head) == 263_680 + 513 * k == head_params(512, 512, k)
    assert count(net.semantic_head) == 263_680 + 513 * ks
    assert count(net.predictor) == head_params(ks, 512, ks) == 2 * 512 * ks + 3 * 512 + ks
    plain = dcsc.Network(num_clusters=k, overcluster=ks, predictor=False, bn=False)
    assert count(plain.predictor) == 0
    assert count(plain.instance_head) == head_params(512, 512, 128, bn=False) == 329_344 - 1024
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in plain.modules())


def test_forward_shapes_and_the_predictor_ablation():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    z, c, p, q = dcsc.Network(num_clusters=5, image_size=32, overcluster=9)(x)
    assert z.shape == (4, 128) and c.shape == (4, 5) and p.shape == q.shape == (4, 9)
    for y in (c, p, q):
        assert torch.allclose(y.sum(dim=1), torch.ones(4), atol=1e-5)
    assert not torch.allclose(p, q)
    _, _, p, q = dcsc.Network(num_clusters=5, image_size=32, overcluster=9, predictor=False)(x)
    assert torch.equal(p, q)  # w/o Spred: both branches are Sproj (Table 4)


def test_kmeans_evaluation_without_the_cluster_loss():
    args = dcsc.Args(device="cpu", image_size=32)
    env = common.Env(args, "dcsc")
    model = dcsc.Network(num_clusters=3, image_size=32, overcluster=6)
    images = torch.randint(0, 256, (40, 3, 36, 36), dtype=torch.uint8)
    aug = data.Augmentation("cc", 32)
    pred, conf = dcsc.evaluate(model, images, aug, env, kmeans_clusters=3, seed=1)
    assert model.training  # evaluate puts the model back in training mode
    model.eval()
    with torch.no_grad():
        features = model.instance_head(model.backbone(aug.eval(images)))
    expected, _ = common.kmeans(features, 3, seed=1)
    assert torch.equal(pred, expected) and pred.max() < 3
    assert ((conf > 0) & (conf <= 1)).all()
    pred, conf = dcsc.evaluate(model, images, aug, env)  # the default: Cproj's argmax
    model.eval()
    with torch.no_grad():
        assert torch.equal(pred, model.cluster_head(model.backbone(aug.eval(images))).argmax(dim=1))


# --- end to end --------------------------------------------------------------------------------
def test_end_to_end_resumes_exactly(tmp_path, image_folder):
    final = check_resume("dcsc.py", tmp_path, image_folder, "--batch-size", 64)
    log = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert all(r["loss_flc"] > 0 and r["loss_clc"] > 0 and r["loss_slc"] > 0 for r in log)
    assert log[0]["nmi"] is not None and final["epochs"] == 2


def test_ablation_clc_uses_kmeans(tmp_path, image_folder):
    out = run_script("dcsc.py", "--dataset", image_folder, "--max-images", 64, "--image-size", 32, "--batch-size", 32,
                     "--epochs", 1, "--ablate", "clc", "--run-name", "a", out_dir=tmp_path, data_root=tmp_path / "data")
    assert "DCSC w/o clc" in out and "final: NMI" in out
    record = json.loads((tmp_path / "a" / "log.jsonl").read_text())
    assert record["loss_clc"] == 0 and record["loss_cr"] == 0 and record["loss_flc"] > 0 and record["loss_slc"] > 0
    final = json.loads((tmp_path / "a" / "final.json").read_text())
    assert final["epochs"] == 1 and 0 <= final["nmi"] <= 1


@pytest.mark.parametrize("bad,word", [(["--overcluster", "1"], "overcluster"), (["--batch-size", "1"], "batch-size"),
                                      (["--ablate", "cr"], "ablate")])
def test_bad_arguments_exit_2(tmp_path, capsys, bad, word):
    with pytest.raises(SystemExit) as e:
        dcsc.main(["--out-dir", str(tmp_path), "--device", "cpu", *bad])
    out = capsys.readouterr()
    assert e.value.code == 2 and word in out.err and out.out == ""
    assert not any(tmp_path.iterdir())  # failed before any work


def test_checkpoint_of_another_method_exits_2(tmp_path, capsys):
    torch.save({"method": "cc"}, tmp_path / "cc.pt")
    with pytest.raises(SystemExit) as e:
        dcsc.main(["--out-dir", str(tmp_path), "--data-root", str(tmp_path / "data"), "--device", "cpu", "--image-size", "32",
                   "--eval-only", str(tmp_path / "cc.pt")])
    assert e.value.code == 2 and "not 'dcsc'" in capsys.readouterr().err
