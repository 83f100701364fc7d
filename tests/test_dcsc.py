"""dcsc.py beyond its losses (those are in test_losses.py): parameter counts, the ablations, and an
end-to-end CPU run with exact resume."""
import contextlib
import csv
import json
from types import SimpleNamespace

import pytest
import torch

import common
import data
import dcsc
from conftest import adam_steps, check_resume, in_process


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
    env = SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)
    model = dcsc.Network(num_clusters=3, image_size=32, overcluster=6)
    images = torch.randint(0, 256, (40, 3, 36, 36), dtype=torch.uint8)
    aug = data.Augmentation(dcsc.recipe("paper", "shapes")["views"], 32)
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


def kmeans_of_the_checkpoint(run, image_folder, data_root, **network):
    """The clusters of k-means on the run's trained Fproj features of the whole images."""
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    model = dcsc.Network(num_clusters=8, image_size=32, **network)
    model.load_state_dict(state["model"])
    ds = data.load_dataset(image_folder, root=data_root, image_size=32, max_images=64)
    model.eval()
    with torch.no_grad():
        features = model.instance_head(model.backbone(data.Augmentation(dcsc.recipe("paper", ds.name)["views"], 32).eval(ds.images)))
    return common.kmeans(features, 8, seed=1)[0].tolist()


@pytest.mark.parametrize("part,zero", [("clc", ["loss_clc", "loss_cr"]), ("slc", ["loss_slc"])])
def test_ablations_without_clc_or_slc_cluster_by_kmeans(tmp_path, image_folder, part, zero):
    """Table 2's rows w/o CLC and w/o SLC: 'K-means ... after removing the CLC/SLC loss' (Sec. 4.4.1)."""
    final = in_process(dcsc, "--dataset", image_folder, "--max-images", 64, "--image-size", 32, "--batch-size", 32,
                       "--epochs", 1, "--ablate", part, "--run-name", part, out_dir=tmp_path, data_root=tmp_path / "data")
    record = json.loads((tmp_path / part / "log.jsonl").read_text())
    assert all(record[k] == 0 for k in zero) and all(record[k] > 0 for k in ("loss_flc", "loss_clc", "loss_slc", "loss_cr") if k not in zero)
    assert final["epochs"] == 1 and 0 <= final["nmi"] <= 1
    with open(tmp_path / part / "assignments.csv") as f:
        clusters = [int(row["cluster"]) for row in csv.DictReader(f)]
    assert clusters == kmeans_of_the_checkpoint(tmp_path / part, image_folder, tmp_path / "data")


def test_ablation_flc_keeps_the_cluster_head(tmp_path, image_folder):
    in_process(dcsc, "--dataset", image_folder, "--max-images", 64, "--image-size", 32, "--batch-size", 32,
               "--epochs", 1, "--ablate", "flc", "--slc-similarity", "kl", "--run-name", "flc", out_dir=tmp_path, data_root=tmp_path / "data")
    record = json.loads((tmp_path / "flc" / "log.jsonl").read_text())
    assert record["loss_flc"] == 0 and record["loss_slc"] != 0
    with open(tmp_path / "flc" / "assignments.csv") as f:
        confidence = [float(row["confidence"]) for row in csv.DictReader(f)]
    assert max(confidence) <= 1 and len(confidence) == 64


def test_slc_similarity_default_is_js():
    assert dcsc.Args().slc_similarity == "js"
    assert common.parse_args(dcsc.Args, ["--slc-similarity", "kl"]).slc_similarity == "kl"


def test_stl10_unlabeled_trains_fproj_in_a_pass_of_its_own(tmp_path, fake_stl10):
    """As CC: 64 labeled + 64 unlabeled images in batches of 32 give 4 steps; --no-stl10-unlabeled 2."""
    tiny = ["--dataset", "stl10", "--max-images", 64, "--image-size", 32, "--batch-size", 32, "--epochs", 1]
    in_process(dcsc, *tiny, "--run-name", "u", out_dir=tmp_path, data_root=tmp_path / "data")
    in_process(dcsc, *tiny, "--no-stl10-unlabeled", "--run-name", "l", out_dir=tmp_path, data_root=tmp_path / "data")
    assert adam_steps(tmp_path / "u" / "checkpoint.pt") == 4 and adam_steps(tmp_path / "l" / "checkpoint.pt") == 2
    assert len((tmp_path / "u" / "assignments.csv").read_text().splitlines()) == 65  # evaluated on the labeled images


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
