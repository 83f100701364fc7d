"""The README's reproduction table ("Reproducing the papers"): every row's commands are valid commands
of its script, naming the row's dataset, the first with the recipe that produced the published
number (the authors' code for VTCC, ViT-IC and PICI, then the paper as written); and every distinct
configuration in the table trains for one tiny epoch on the CPU, run as written but for the data
(the test images under the row's dataset name: that name still picks the recipe, and STL-10 still
gets an unlabeled split), 32 px, 32 images, batches of 16, one epoch (PICI: one per stage)."""
import importlib
import json
import re
import shlex

import pytest

import common
import data
from conftest import ROOT, in_process

DATASETS = {"CIFAR-10": "cifar10", "CIFAR-100 (20)": "cifar100", "STL-10": "stl10", "ImageNet-10": "imagenet10",
            "ImageNet-Dogs": "imagenet-dogs", "Tiny-ImageNet": "tiny-imagenet", "RSOD": "rsod", "UC-Merced": "ucmerced",
            "SIRI-WHU": "siri-whu", "AID": "aid", "D0": "d0", "DTD": "dtd", "Chaoyang": "chaoyang"}
TABLES = {"CC Table 2": 6, "CC Table 3": 6, "CC Table 4": 6, "CC Table 5": 6, "VTCC Tables II-IV": 8,
          "VTCC Tables II-IV (CC)": 8, "VTCC Table V": 4, "VTCC Table VI": 6, "VTCC Table VII": 6, "ViT-IC Table 1": 3,
          "PICI Tables 2-4": 6, "PICI Tables 2-4 (CC)": 6, "PICI Table 5": 6, "PICI Table 6": 6, "PICI Table 7": 6,
          "DCSC Table 1": 6, "DCSC Table 2": 8, "DCSC Table 3": 4, "DCSC Table 4": 4}
ROW = re.compile(r"\| ([^|]+) \| ([^|]+) \| (paper|authors) \| (`python [^|]+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$")
AUTHORS_CODE = ("vtcc.py", "vitic.py", "pici.py")  # the published numbers came from the authors' code, which departs from its paper


def table_rows():
    """(table, dataset, recipe, [commands], NMI, ACC, ARI, GPU-h) per row."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Reproducing the papers"):]
    section = section[:section.index("\n## ")]
    rows = [ROW.match(line).groups() for line in section.splitlines() if line.startswith("| ") and "python" in line]
    assert all(rows) and len(rows) == len([line for line in section.splitlines() if "`python" in line and line.startswith("|")])
    return [(t, d, r, re.findall(r"`(python [^`]+)`", cell), *rest) for t, d, r, cell, *rest in rows]


ROWS = table_rows()


def configurations():
    """One command per distinct configuration over every row's commands: the script and its parsed
    arguments (the recipe among them) but the dataset, which here only matters for STL-10's unlabeled
    images (the recipes per dataset: test_recipes.py)."""
    seen = {}
    for row in ROWS:
        for command in row[3]:
            argv = shlex.split(command)
            args = vars(common.parse_args(importlib.import_module(argv[1][:-3]).Args, argv[2:]))
            dataset = args.pop("dataset")
            seen.setdefault((argv[1], dataset == "stl10", tuple(sorted(args.items(), key=str))), command)
    return list(seen.values())


def test_the_table_has_every_row_of_every_table():
    counts = {}
    for table, *_ in ROWS:
        counts[table] = counts.get(table, 0) + 1
    assert counts == TABLES
    for table, dataset, recipe, commands, *metrics, hours in ROWS:
        for m in metrics:
            assert m in ("n/a", "–") or 0 <= float(m) <= 1, (table, dataset, m)
        assert hours == "—" or float(hours) > 0


@pytest.mark.parametrize("row", ROWS, ids=[f"{r[0]}-{r[1]}-{i}" for i, r in enumerate(ROWS)])
def test_every_command_parses_and_names_its_dataset(row):
    """The first command trains what produced the number (`recipe`): for the methods whose numbers came
    from their authors' code, `--recipe authors`, followed by the same command as the paper is written."""
    table, dataset, recipe, commands = row[:4]
    argvs = [shlex.split(c) for c in commands]
    script = argvs[0][1]
    assert all(a[0] == "python" and a[1] == script for a in argvs) and script in ("cc.py", "vtcc.py", "vitic.py", "pici.py", "dcsc.py")
    module = importlib.import_module(script[:-3])
    args = [common.parse_args(module.Args, a[2:]) for a in argvs]
    assert all(a.dataset == DATASETS[dataset] and a.dataset in data.DATASETS for a in args)
    assert recipe == ("authors" if script in AUTHORS_CODE else "paper") and args[0].recipe == recipe
    if recipe == "authors":  # then the paper as written: the same command without the recipe flag
        assert len(commands) == 2 and args[1].recipe == "paper"
        assert commands[0] == commands[1] + " --recipe authors"
    else:
        assert len(commands) == 1
    method = table.split()[0].lower().replace("-", "")
    baseline = table.endswith("(CC)") or table == "PICI Table 6"  # the CC rows of VTCC's and PICI's tables, PICI's vanilla CC
    assert script == f"{method}.py" or (baseline and script == "cc.py")


@pytest.fixture
def any_dataset(monkeypatch, image_folder):
    """Every dataset name loads the test images under that name (STL-10: with an unlabeled split)."""
    real = data.load_dataset

    def load(name, *args, with_unlabeled=False, **kwargs):
        ds = real(image_folder, *args, **kwargs)
        ds.name, ds.unlabeled = str(name), ds.images.flip(0).clone() if with_unlabeled else None
        return ds

    monkeypatch.setattr(data, "load_dataset", load)


@pytest.mark.parametrize("command", configurations())
def test_each_configuration_trains_one_tiny_epoch(command, tmp_path, any_dataset):
    argv = shlex.split(command)
    module = importlib.import_module(argv[1][:-3])
    epochs = 3 if argv[1] == "pici.py" else 1  # PICI: one epoch per stage (or two of training without pre-training)
    final = in_process(module, *argv[2:], "--max-images", 32, "--image-size", 32, "--batch-size", 16, "--epochs", epochs,
                       "--eval-every", 0, "--run-name", "row", out_dir=tmp_path, data_root=tmp_path / "data")
    assert final["epochs"] == epochs and 0 <= final["nmi"] <= 1
    args = json.loads((tmp_path / "row" / "args.json").read_text())
    assert all(args[flag[2:].replace("-", "_")] == value for flag, value in zip(argv[2::2], argv[3::2]) if flag != "--dataset")
