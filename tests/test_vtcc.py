"""vtcc.py beyond its losses (those are in test_losses.py): the network's sizes (Tables V-VII) and
end-to-end runs on the CPU (files, exact resume, bad input)."""
import json
import subprocess
import sys

import pytest
import torch

import vtcc
from conftest import ROOT, check_resume, check_run_files, run_script


def count(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_parameter_counts():
    for k in (4, 21):
        net = vtcc.Network(k)
        assert count(net.backbone) == 15_218_352  # conv stem + 8 blocks + final norm + CLS; positions are fixed
        assert count(net.instance_head) == 3_155_072
        assert count(net.cluster_head) == 2_958_336 + 1537 * k
    only_instance, only_cluster = vtcc.Network(21, heads="instance"), vtcc.Network(21, heads="cluster")
    assert only_instance.cluster_head is None and count(only_instance) == 15_218_352 + 3_155_072  # Table VII: removed
    assert only_cluster.instance_head is None and count(only_cluster) == 15_218_352 + 2_958_336 + 1537 * 21


def projector_params(width, out):
    """Linear(w, 4w) + BN + Linear(4w, 4w) + BN + Linear(4w, out): the authors' hidden width, 4 x the ViT's."""
    h = 4 * width
    return width * h + h + 2 * h + h * h + h + 2 * h + h * out + out


@pytest.mark.parametrize("vit,hidden,instance,cluster,backbone", [
    ("tiny", 768, 840_320, 741_888 + 769 * 4, 2_036_184),
    ("small", 1536, 3_155_072, 2_958_336 + 1537 * 4, 15_218_352),
    ("base", 3072, 12_208_256, 11_814_912 + 3073 * 4, 89_136_480)])
def test_parameter_counts_of_table_vi_sizes(vit, hidden, instance, cluster, backbone):
    """Table VI as the authors ran it: projector hidden width 4 x the ViT width (768, 1536, 3072)."""
    net = vtcc.Network(4, vit=vit)
    assert net.instance_head[0].out_features == net.instance_head[3].out_features == hidden
    assert count(net.instance_head) == instance == projector_params(hidden // 4, 128)
    assert count(net.cluster_head) == cluster == projector_params(hidden // 4, 4)
    assert count(net.backbone) == backbone


@pytest.mark.parametrize("vit,width,depth", [("tiny", 192, 4), ("small", 384, 8), ("base", 768, 12)])
@pytest.mark.parametrize("stem", ["conv", "patchify"])
def test_vit_sizes(vit, width, depth, stem):
    """Table VI widths and depths with 12 heads; Table V's two stems; counts from the layer shapes."""
    backbone = vtcc.Network(4, image_size=32, vit=vit, stem=stem).backbone
    assert backbone.dim == width and len(backbone.blocks) == depth
    assert all(block.heads == 12 for block in backbone.blocks)
    if stem == "conv":
        widths = [3, width // 8, width // 4, width // 2, width]
        stem_params = sum(9 * a * b + 2 * b for a, b in zip(widths, widths[1:])) + width * width + width
    else:
        stem_params = 16 * 16 * 3 * width + width
    block = 12 * width * width + 13 * width  # qkv, proj, MLP 4x and two LayerNorms
    assert count(backbone) == stem_params + depth * block + 2 * width + width  # + final norm + CLS


@pytest.mark.parametrize("size", [16, 32, 64, 224])
def test_token_count_follows_image_size(size):
    net = vtcc.Network(4, image_size=size).eval()
    x = torch.randn(2, 3, size, size)
    tokens, _, _ = net.backbone.forward_features(x)
    assert tokens.shape == (2, 1 + (size // 16) ** 2, 384)
    assert net.backbone.pos_embed.shape == (1, 1 + (size // 16) ** 2, 384)
    z, p = net(x)
    assert z.shape == (2, 128) and p.shape == (2, 4)
    torch.testing.assert_close(p.sum(1), torch.ones(2))


def test_other_image_sizes_fail_clearly():
    for size in (40, 100, 8):
        with pytest.raises(ValueError, match="multiple of 16"):
            vtcc.Network(4, image_size=size)
    with pytest.raises(ValueError, match="built for 32"):
        vtcc.Network(4, image_size=32)(torch.randn(2, 3, 64, 64))


def test_end_to_end_and_exact_resume(tmp_path, image_folder):
    final = check_resume("vtcc.py", tmp_path, image_folder, "--batch-size", 64)
    args = json.loads((tmp_path / "full" / "args.json").read_text())
    assert args["heads"] == "both" and args["vit"] == "small" and args["stem"] == "conv"
    log = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert all(r["loss"] == pytest.approx(r["loss_instance"] + r["loss_cluster"]) for r in log)
    assert final["epochs"] == 2


def test_instance_projector_only(tmp_path, image_folder):
    """Table VII's instance-only run clusters by k-means on the instance features; a resume given
    another projector set is refused in one line, not a state-dict dump."""
    args = ["--dataset", image_folder, "--max-images", 256, "--image-size", 32, "--batch-size", 64,
            "--vit", "tiny", "--stem", "patchify", "--run-name", "inst"]
    out = run_script("vtcc.py", *args, "--heads", "instance", "--epochs", 1, out_dir=tmp_path, data_root=tmp_path / "data")
    assert "final: NMI" in out
    check_run_files(tmp_path / "inst", 256, 1)
    log = json.loads((tmp_path / "inst" / "log.jsonl").read_text())
    assert "loss_instance" in log and "loss_cluster" not in log
    proc = subprocess.run([sys.executable, str(ROOT / "vtcc.py"), *map(str, args), "--heads", "both", "--epochs", "2", "--resume", "auto",
                           "--out-dir", str(tmp_path), "--data-root", str(tmp_path / "data"), "--device", "cpu", "--threads", "2"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--heads" in proc.stderr, proc.stderr


@pytest.mark.parametrize("args,words", [
    (["--image-size", "40"], "multiple of 16"),
    (["--image-size", "0"], "multiple of 16"),
    (["--batch-size", "1"], "--batch-size"),
    (["--num-clusters", "1"], "--num-clusters"),
    (["--heads", "neither"], "--heads"),
    (["--vit", "huge"], "--vit"),
    (["--stem", "none"], "--stem"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, capsys, args, words):
    with pytest.raises(SystemExit) as e:
        vtcc.main(["--dataset", "no-such-dataset", "--out-dir", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "error:" in err[-1] and words in err[-1], err
    assert not (tmp_path / "out").exists()  # nothing written, no dataset looked for


def test_bad_image_size_exits_2_in_one_line(tmp_path):
    cmd = [sys.executable, str(ROOT / "vtcc.py"), "--image-size", "40", "--out-dir", str(tmp_path), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "multiple of 16" in proc.stderr
    assert list(tmp_path.iterdir()) == []
