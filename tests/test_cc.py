"""cc.py beyond its losses (those are in test_losses.py): the network's sizes, an end-to-end run
with exact resume, and bad arguments."""
import subprocess
import sys

import pytest
import torch

import cc
from conftest import ROOT, check_resume


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
