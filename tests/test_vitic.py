"""vitic.py beyond its losses (those are in test_losses.py): parameter counts, image sizes, bad
arguments, and an end-to-end run that resumes exactly."""

import json
import math

import pytest
import torch

import vitic
from conftest import adam_steps, check_resume, in_process


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


def test_authors_recipe_leaves_the_instance_features_unnormalised():
    """--recipe authors: the author's code feeds raw projections to NT-Xent (dot products over tau)."""
    g = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    rows, tau = list(z_a) + list(z_b), 0.5
    loop = 0.0
    for i, u in enumerate(rows):  # NT-Xent with s = u . v, self excluded
        denominator = sum(math.exp(float(u @ v) / tau) for j, v in enumerate(rows) if j != i)
        loop += -math.log(math.exp(float(u @ rows[(i + 4) % 8]) / tau) / denominator) / 8
    assert vitic.instance_loss(z_a, z_b, tau, normalize=False).item() == pytest.approx(loop, rel=1e-6)
    assert vitic.instance_loss(3 * z_a, z_b, tau, normalize=False) != pytest.approx(vitic.instance_loss(z_a, z_b, tau, normalize=False))
    assert vitic.recipe("paper")["normalize"] and not vitic.recipe("authors")["normalize"]


def test_stl10_unlabeled_images_join_the_training_set(tmp_path, fake_stl10):
    """ViT-IC paper, Sec. 4.2, as the author's code: one shuffled set of labeled and unlabeled images, both
    losses on every batch: 128 images in batches of 32 are 4 steps, all logged; evaluation on the 64 labeled."""
    tiny = ["--dataset", "stl10", "--max-images", 64, "--image-size", 32, "--batch-size", 32, "--epochs", 1]
    final = in_process(vitic, *tiny, "--run-name", "u", out_dir=tmp_path, data_root=tmp_path / "data")
    assert adam_steps(tmp_path / "u" / "checkpoint.pt") == 4
    record = json.loads((tmp_path / "u" / "log.jsonl").read_text())
    assert round(record["img_per_s"] * record["seconds"]) == 128 and record["loss_cluster"] > 0  # every step: both losses
    assert final["epochs"] == 1 and len((tmp_path / "u" / "assignments.csv").read_text().splitlines()) == 65
    in_process(vitic, *tiny, "--no-stl10-unlabeled", "--run-name", "l", out_dir=tmp_path, data_root=tmp_path / "data")
    assert adam_steps(tmp_path / "l" / "checkpoint.pt") == 2


def test_training_images():
    ds = type("DS", (), {})()
    ds.images, ds.unlabeled = torch.zeros(3, 3, 4, 4, dtype=torch.uint8), torch.ones(5, 3, 4, 4, dtype=torch.uint8)
    ds.sizes = torch.tensor([[96, 96]]).expand(3, 2)
    joined, sizes = vitic.training_images(ds)
    assert joined.shape == (8, 3, 4, 4) and joined[:3].eq(0).all() and joined[3:].eq(1).all()
    assert sizes.tolist() == [[96, 96]] * 8  # crop boxes are drawn on the originals, labeled or not
    ds.unlabeled = None
    images, sizes = vitic.training_images(ds)
    assert images is ds.images and sizes is ds.sizes
