"""A collapsed run says so: after each evaluation, one warning line naming what was seen and where
the cluster health is, and final.json records it."""
import json

import torch

import common
import vtcc
from conftest import make_image_folder


def test_collapse_rules():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    assert common.collapse(torch.arange(10) % 5, 5, labels) is None  # every cluster, evenly
    assert common.collapse(torch.tensor([0] * 6 + [1, 2, 3, 4]), 5, labels) == "the predictions put 60% of the images in cluster 0"
    assert common.collapse(torch.tensor([3] * 9 + [1]), 5) == "the predictions use 2 of the 5 clusters and put 90% of the images in cluster 3"
    assert common.collapse(torch.zeros(10, dtype=torch.long), 2) == "the predictions use 1 of the 2 clusters"
    assert common.collapse(torch.tensor([0] * 6 + [1] * 4), 2) is None  # two clusters: 60:40 is no collapse
    # a class that holds 70% of the images may fill its cluster
    assert common.collapse(torch.tensor([0] * 7 + [1, 2, 3]), 4, torch.tensor([0] * 7 + [1, 2, 3])) is None
    healthy = common.evaluation_record(labels, torch.arange(10) % 5, 5)
    assert "collapse" not in healthy  # log.jsonl's records keep their keys


def test_a_collapsed_run_warns_after_each_evaluation_and_records_it(tmp_path, capsys, monkeypatch):
    shapes = make_image_folder(tmp_path / "shapes", classes=4, per_class=4, size=(32, 32))
    monkeypatch.setattr(vtcc, "evaluate", lambda model, images, *a: (torch.full((len(images),), 2), torch.ones(len(images))))
    vtcc.main(["--dataset", str(shapes), "--image-size", "32", "--batch-size", "8", "--vit", "tiny", "--epochs", "2", "--eval-every", "1",
               "--device", "cpu", "--threads", "1", "--out-dir", str(tmp_path / "runs"), "--data-root", str(tmp_path / "data")])
    run = tmp_path / "runs" / "vtcc-shapes-seed1"
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    seen = "the predictions use 1 of the 4 clusters"  # all in one: no need to say 100 %
    where = f"the cluster health of every evaluation (empty, max_share, entropy) is in {run / 'log.jsonl'}"
    assert warnings == [f"warning: epoch 1, {seen}: the model may have collapsed; {where}",
                        f"warning: final evaluation, {seen}: the model may have collapsed; {where}"], warnings
    final = json.loads((run / "final.json").read_text())
    assert final["collapse"] == seen and final["empty"] == 3 and final["max_share"] == 1.0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[0]["collapse"] == seen and log[0]["empty"] == 3
