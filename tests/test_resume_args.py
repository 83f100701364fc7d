"""--resume continues the run as it was started: its arguments come from the checkpoint; flags that
would change what is trained are refused with both values; `auto` finds the run the flags describe."""
import json

import pytest

import common
import pici
import vtcc
from conftest import make_image_folder

TINY = ["--max-images", "16", "--image-size", "32", "--batch-size", "8", "--vit", "tiny", "--eval-every", "0",
        "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("resume") / "shapes", classes=2, per_class=8, size=(32, 32))


def train(tmp_path, shapes, *flags):
    vtcc.main(["--dataset", str(shapes), *TINY, "--out-dir", str(tmp_path / "runs"), "--data-root", str(tmp_path / "data"), *flags])


def fails(capsys, *argv, module=vtcc):
    with pytest.raises(SystemExit) as stop:
        module.main(list(map(str, argv)))
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_resume_takes_the_checkpoints_arguments_and_extends_with_epochs(tmp_path, shapes, capsys):
    train(tmp_path, shapes, "--epochs", "1", "--run-name", "a")
    run = tmp_path / "runs" / "a"
    before = json.loads((run / "args.json").read_text())
    # the README's form: the dataset only; image size, batch, subset and model come from the checkpoint
    vtcc.main(["--dataset", str(shapes), "--resume", "auto", "--run-name", "a", "--epochs", "2", "--out-dir", str(tmp_path / "runs"),
               "--device", "cpu", "--threads", "1"])
    out = capsys.readouterr().out
    assert "resumed from epoch 1" in out and "| 16 images |" in out
    after = json.loads((run / "args.json").read_text())
    same = lambda a: {k: v for k, v in a.items() if k not in ("epochs", "resume")}  # what this command line may change
    assert same(after) == same(before)
    assert after["epochs"] == 2 and json.loads((run / "final.json").read_text())["epochs"] == 2

    # a path resume: the same, by the checkpoint's path
    args = common.parse_args(vtcc.Args, ["--resume", str(run / "checkpoint.pt"), "--epochs", "3", "--eval-every", "1",
                                         "--device", "cpu", "--threads", "2", "--save-every", "5"], method="vtcc")
    assert (args.image_size, args.batch_size, args.max_images, args.vit, args.dataset) == (32, 8, 16, "tiny", str(shapes))
    assert (args.epochs, args.eval_every, args.threads, args.save_every) == (3, 1, 2, 5)
    (tmp_path / "link").symlink_to(shapes)  # the same folder, named another way: no conflict
    assert common.parse_args(vtcc.Args, ["--resume", str(run / "checkpoint.pt"), "--dataset", str(tmp_path / "link")], method="vtcc")

    # flags that change the model, the data or the recipe: one line with the checkpoint's value and the given one
    err = fails(capsys, "--resume", run / "checkpoint.pt", "--image-size", 224, "--batch-size", 256, "--out-dir", tmp_path / "runs")
    assert "was trained with --image-size 32 --batch-size 8, not --image-size 224 --batch-size 256" in err, err
    for flag, value in [("--max-images", 12), ("--vit", "small"), ("--instance-temperature", 0.2), ("--recipe", "authors"),
                        ("--heads", "instance"), ("--dataset", tmp_path), ("--num-clusters", 3), ("--seed", 2)]:
        err = fails(capsys, "--resume", run / "checkpoint.pt", flag, value, "--out-dir", tmp_path / "runs")
        assert f"not {flag} {value}" in err, err
    # the precision is how the run computes, not what it trains (fp16 after bf16 or fp32 starts a fresh loss scale)
    assert common.parse_args(vtcc.Args, ["--resume", str(run / "checkpoint.pt"), "--precision", "fp16"], method="vtcc").precision == "fp16"
    err = fails(capsys, "--resume", run / "checkpoint.pt", "--epochs", 1)
    assert "--epochs 1 is fewer than the 2 epochs" in err, err
    assert json.loads((run / "args.json").read_text()) == after  # no failed resume touched the run


def test_resume_auto_continues_the_run_the_flags_describe_and_refuses_a_conflict(tmp_path, shapes, capsys):
    train(tmp_path, shapes, "--epochs", "1")  # vtcc-shapes-seed1, 32 px
    train(tmp_path, shapes, "--epochs", "1", "--max-images", "12")  # vtcc-shapes-seed1-2, the newest
    runs = tmp_path / "runs"
    common_flags = ["--dataset", shapes, "--out-dir", runs, "--device", "cpu", "--threads", "1", "--resume", "auto"]
    args = common.parse_args(vtcc.Args, list(map(str, common_flags)), method="vtcc")
    assert args.run_name == "vtcc-shapes-seed1-2" and args.max_images == 12  # the newest, with its settings
    args = common.parse_args(vtcc.Args, list(map(str, [*common_flags, "--max-images", 16])), method="vtcc")
    assert args.run_name == "vtcc-shapes-seed1" and args.max_images == 16  # the older run these flags describe
    err = fails(capsys, *common_flags, "--max-images", 14)
    assert f"{runs / 'vtcc-shapes-seed1-2' / 'checkpoint.pt'} was trained with --max-images 12, not --max-images 14" in err, err
    assert "nor was any other run" in err
    # no checkpoint yet: a fresh start with the command line's arguments
    args = common.parse_args(vtcc.Args, list(map(str, [*common_flags, "--seed", 5, "--image-size", 48])), method="vtcc")
    assert (args.seed, args.image_size, args.run_name) == (5, 48, None)


def test_pici_resume_extends_a_stage_and_keeps_the_others(tmp_path, shapes, capsys):
    base = ["--dataset", shapes, "--max-images", 16, "--image-size", 32, "--batch-size", 8, "--vit", "tiny", "--eval-every", 0,
            "--device", "cpu", "--threads", 1, "--out-dir", tmp_path / "runs", "--data-root", tmp_path / "data", "--run-name", "p"]
    pici.main(list(map(str, [*base, "--epochs", 3])))  # one epoch per stage
    ckpt = tmp_path / "runs" / "p" / "checkpoint.pt"
    # --epochs 5 would split 5 epochs 1:3:1 and move epoch 3 out of boosting: refused, naming the fix
    err = fails(capsys, "--resume", ckpt, "--epochs", 5, "--out-dir", tmp_path / "runs", "--run-name", "p", module=pici)
    assert "give the stage lengths it was trained with (1, 1, 1)" in err, err
    args = common.parse_args(pici.Args, list(map(str, ["--resume", ckpt, "--pretrain-epochs", 1, "--train-epochs", 1,
                                                       "--boost-epochs", 2])), method="pici")
    assert (args.epochs, args.boost_epochs, args.vit, args.image_size) == (3, 2, "tiny", 32)
