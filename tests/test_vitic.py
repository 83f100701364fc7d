"""vitic.py beyond its losses (those are in test_losses.py): parameter counts, image sizes, bad
arguments, and an end-to-end run that resumes exactly."""

import pytest
import torch

import vitic
from conftest import check_resume


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
