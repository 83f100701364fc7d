"""clusters.png: a tied majority says so, and class names are drawn in ASCII, the default font's letters."""
import numpy as np
import torch
from PIL import Image

import common


def test_a_tie_names_every_class_in_it():
    labels = torch.tensor([0, 0, 1, 1, 2, 3, 3, 3])
    pred = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    rows, _ = common.grid_plan(pred, 2, labels, ["agricultural", "beach", "forest", "river"])
    assert [lines for _, _, lines in rows] == [["cluster 0", "5 images", "tie: agricultural, beach", "40% of the cluster each"],
                                               ["cluster 1", "3 images", "river", "100% of the cluster"]]


def test_names_are_spelled_in_ascii():
    def drawn(name):  # the class line of a one-image cluster
        return common.grid_plan(torch.tensor([0]), 1, torch.tensor([0]), [name])[0][0][2][2]

    assert drawn("plage é") == "plage e"
    assert drawn("Straße Œuvre Ñandú") == "Strasse OEuvre Nandu"
    assert drawn("川 river") == "? river"
    assert drawn("beach-2 (A&B)") == "beach-2 (A&B)"


def test_clusters_png_draws_an_accented_name_as_its_letters(tmp_path):
    """The same grid with "plage é" and with "plage e": the same pixels (before: a box for the é)."""
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    pred, labels, conf = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 0, 1, 1, 1]), torch.rand(6)
    for name in ("plage é", "plage e"):
        common.save_cluster_grid(tmp_path / f"{name}.png", images, pred, conf, labels, [name, "forêt"], num_clusters=2)
    a, b = (np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("plage é", "plage e"))
    assert a.shape == b.shape and (a == b).all()
