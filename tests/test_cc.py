"""cc.py beyond its losses (those are in test_losses.py): the network's sizes, an end-to-end run
with exact resume, Tables 3 and 4 and STL-10's unlabeled pass end to end, and bad arguments."""
import csv
import json
import subprocess
import sys

import pytest
import torch

import cc
import common
import data
from conftest import ROOT, adam_steps, check_resume, in_process


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts():
    for k in (10, 21):
        net = cc.Network(k)
        assert count(net.backbone) == 21_284_672  # torchvision ResNet34 without fc
        assert count(net.instance_head) == 328_320
        assert count(net.cluster_head) == 262_656 + 513 * k
    z, p = cc.Network(3, 32).eval()(torch.randn(2, 3, 32, 32))
    assert z.shape == (2, 128) and p.shape == (2, 3) and torch.allclose(p.sum(1), torch.ones(2))
    instance, cluster = cc.Network(10, heads="instance"), cc.Network(10, heads="cluster")  # Table 4
    assert instance.cluster_head is None and count(instance) == 21_284_672 + 328_320
    assert cluster.instance_head is None and count(cluster) == 21_284_672 + 262_656 + 513 * 10


def test_end_to_end_and_exact_resume(tmp_path, image_folder):
    check_resume("cc.py", tmp_path, image_folder, "--batch-size", 64)


@pytest.mark.parametrize("bad", [["--batch-size", "1"], ["--num-clusters", "1"], ["--device", "tpu"], ["--dataset", "nope"]])
def test_bad_arguments_exit_2(tmp_path, bad):
    proc = subprocess.run([sys.executable, str(ROOT / "cc.py"), "--out-dir", str(tmp_path), "--data-root", str(tmp_path), *bad],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error:")


TINY = ["--max-images", 64, "--image-size", 32, "--batch-size", 32, "--epochs", 1, "--backbone", "resnet18"]


@pytest.fixture
def recorded(monkeypatch):
    """The recipes every Augmentation of the run was built with."""
    seen = []
    real = data.Augmentation.__init__

    def init(self, recipe, image_size):
        seen.append(tuple(recipe))
        real(self, recipe, image_size)

    monkeypatch.setattr(data.Augmentation, "__init__", init)
    return seen


@pytest.mark.parametrize("views", ["aug-raw", "raw-raw"])
def test_table_3_views_end_to_end(tmp_path, image_folder, recorded, views):
    final = in_process(cc, "--dataset", image_folder, *TINY, "--views", views, "--run-name", views,
                       out_dir=tmp_path, data_root=tmp_path / "data")
    assert final["epochs"] == 1 and 0 <= final["nmi"] <= 1
    augmented = cc.recipe("paper", "shapes")["views"][0]
    raw = data.View()  # nothing random: the whole image resized, the eval transform
    assert recorded == [(augmented, raw) if views == "aug-raw" else (raw, raw)]
    x = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8)
    aug = data.Augmentation(recorded[0], 32)
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    x_a, x_b = aug.views(x, g)
    torch.testing.assert_close(x_b, aug.eval(x))  # x of Table 3 is the evaluation input
    assert torch.equal(g.get_state(), before) == (views == "raw-raw")  # raw draws nothing


def test_table_4_instance_head_only_clusters_by_kmeans(tmp_path, image_folder):
    in_process(cc, "--dataset", image_folder, *TINY, "--heads", "instance", "--run-name", "ich", out_dir=tmp_path,
               data_root=tmp_path / "data")
    log = json.loads((tmp_path / "ich" / "log.jsonl").read_text())
    assert [k for k in log if k.startswith("loss_")] == ["loss_instance"]
    # the assignments are k-means on the trained instance features of the whole images
    state = torch.load(tmp_path / "ich" / "checkpoint.pt", weights_only=True)
    model = cc.Network(8, 32, "resnet18", heads="instance")
    model.load_state_dict(state["model"])
    ds = data.load_dataset(image_folder, root=tmp_path / "data", image_size=32, max_images=64)
    aug = data.Augmentation(cc.recipe("paper", ds.name)["views"], 32)
    model.eval()
    with torch.no_grad():
        features = model.instance_head(model.backbone(aug.eval(ds.images)))
    expected, _ = common.kmeans(features, 8, seed=1)
    with open(tmp_path / "ich" / "assignments.csv") as f:
        clusters = [int(row["cluster"]) for row in csv.DictReader(f)]
    assert clusters == expected.tolist()


def test_table_4_cluster_head_only(tmp_path, image_folder):
    final = in_process(cc, "--dataset", image_folder, *TINY, "--heads", "cluster", "--run-name", "cch", out_dir=tmp_path,
                       data_root=tmp_path / "data")
    log = json.loads((tmp_path / "cch" / "log.jsonl").read_text())
    assert [k for k in log if k.startswith("loss_")] == ["loss_cluster"] and final["epochs"] == 1


@pytest.mark.parametrize("heads,steps", [("both", 4), ("cluster", 2)])
def test_stl10_unlabeled_pass(tmp_path, fake_stl10, heads, steps):
    """CC paper, Sec. 4.1.1: the unlabeled images train the instance head in a pass of their own (64 + 64 images,
    batches of 32: 4 steps); without an instance head there is nothing for them to train."""
    in_process(cc, "--dataset", "stl10", *TINY, "--heads", heads, "--run-name", heads, out_dir=tmp_path, data_root=tmp_path / "data")
    assert adam_steps(tmp_path / heads / "checkpoint.pt") == steps
    assert len((tmp_path / heads / "assignments.csv").read_text().splitlines()) == 65  # evaluated on the labeled images
