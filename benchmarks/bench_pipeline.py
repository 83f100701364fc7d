"""Pipeline efficiency of the five scripts: how close is a training epoch to the model's own cost?

Runs each script's real `main()` twice, in this process, with the same arguments:
  1. as it is: batches indexed from the cached uint8 dataset and augmented on the device;
  2. fed pre-made batches: `data.batches` yields one fixed, already indexed batch and
     `Augmentation.views` returns one pair of views made once, so only the model's forward,
     losses, backward and optimiser step remain (the model's own cost).
The ratio of the two img/s (last epoch of each, warm-up excluded) is the pipeline efficiency.

    python benchmarks/bench_pipeline.py --data-root DATA --image-size 64 --max-images 1024 --epochs 2
    python benchmarks/bench_pipeline.py --data-root DATA --device cuda   (224 px and bf16 by default on CUDA)
"""
import argparse
import sys
import importlib
import json
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: data.py and the scripts
import common  # noqa: E402
import data  # noqa: E402

PAPER_BATCH = {"cc": 256, "vtcc": 128, "vitic": 256, "pici": 96, "dcsc": 256}
REAL_BATCHES, REAL_VIEWS = data.batches, data.Augmentation.views


def premade(enabled):
    """Swap the data pipeline for a fixed pre-made batch (or put the real one back)."""
    if not enabled:
        data.batches, data.Augmentation.views = REAL_BATCHES, REAL_VIEWS
        return
    made = {}

    def batches(images, labels, batch_size, shuffle=True, drop_last=True, generator=None, rank=0, world_size=1, device=None, **kw):
        if not shuffle:  # evaluation reads the real data
            yield from REAL_BATCHES(images, labels, batch_size, shuffle, drop_last, generator, rank, world_size, device, **kw)
            return
        share = batch_size // world_size
        idx = data.torch.arange(share)
        x = images[idx.to(images.device)].to(device or images.device)
        y = labels[idx.to(labels.device)] if labels is not None else None
        for _ in range(len(images) // batch_size):
            yield x, y, idx

    def views(self, x, generator, sizes=None, extra=None):
        if self.recipe not in made:
            made[self.recipe] = REAL_VIEWS(self, x, generator, sizes)
        if extra is None:
            return made[self.recipe]
        return (*made[self.recipe], data.to_device(extra(), x.device))  # PICI's masking noise and indices

    data.batches, data.Augmentation.views = batches, views


def last_img_per_s(run_path):
    return json.loads((run_path / "log.jsonl").read_text().splitlines()[-1])["img_per_s"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(PAPER_BATCH), choices=list(PAPER_BATCH))
    p.add_argument("--dataset", default="ucmerced", help="dataset name (in --data-root) or image folder")
    p.add_argument("--image-size", type=int, default=None, help="default: 224 on CUDA (the papers' size), 64 on the CPU")
    p.add_argument("--max-images", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=None, help="default: each paper's batch")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-root", default="./data")
    p.add_argument("--extra", default="", help="more flags for every script, e.g. '--compile'")
    a = p.parse_args(argv)
    device = common.pick_device(a.device)
    a.image_size = a.image_size or (224 if device.type == "cuda" else 64)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for method in a.methods:
            module = importlib.import_module(method)
            argv = ["--dataset", a.dataset, "--image-size", a.image_size, "--max-images", a.max_images, "--epochs", a.epochs,
                    "--batch-size", a.batch_size or PAPER_BATCH[method], "--device", a.device, "--data-root", a.data_root,
                    "--eval-every", 0, "--save-every", 10**6, "--out-dir", out, *a.extra.split()]
            if method == "pici":  # the main stage (PISD + PICD), where PICI spends 800 of its 1050 epochs
                argv += ["--pretrain-epochs", 0, "--train-epochs", a.epochs, "--boost-epochs", 0]
            speeds = {}
            for mode in ("loop", "model"):
                premade(mode == "model")
                try:
                    module.main([str(v) for v in argv + ["--run-name", f"{method}-{mode}"]])
                finally:
                    premade(False)
                speeds[mode] = last_img_per_s(Path(out) / f"{method}-{mode}")
            rows.append((method, speeds["loop"], speeds["model"], speeds["loop"] / speeds["model"]))
    print(f"\npipeline efficiency | device {device} | {a.image_size} px | {a.max_images} images | {a.epochs} epochs, the last timed {a.extra}")
    print(f"{'method':8} {'loop img/s':>11} {'model img/s':>12} {'efficiency':>11}")
    for method, loop, model, ratio in rows:
        print(f"{method:8} {loop:11.1f} {model:12.1f} {ratio:11.2f}")
    return rows


if __name__ == "__main__":
    main()
