"""Benchmark data.py's batched augmentation against the model step it feeds and against torchvision's PIL pipeline.

    python benchmarks/bench_data.py --size 64 --batch 256 --data-root DATA          # CC views vs ResNet34 forward+backward on them
    python benchmarks/bench_data.py --size 64 --batch 256 --data-root DATA --pil    # also PIL transforms in a DataLoader at 224 px
    python benchmarks/bench_data.py --count                                         # kernels, copies and reads per training step

--count runs each script's real training step (its main(), stopped after two steps) with the meta
device standing in for CUDA, and counts with a TorchDispatchMode what the step asks of the device:
kernels (aten ops on the device, views and empty allocations left out) in the batch fetch, the
augmentation, the model (forward, losses, backward) and the optimiser; host-to-device copies; and
device-to-host reads (.item(), .tolist(), nonzero(), a copy back), each of which makes the host wait
for the GPU. Nothing is timed; the counts do not depend on the machine.

The goal is augmentation time < 10% of the model's. Images: --dataset (UC Merced in --data-root) when present
(else random pixels). Runs on CUDA when present.
"""

import argparse
import importlib
import os
import sys
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: data.py and the scripts
import data  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

COUNTED = {  # the scripts' step as published (ResNet34, ViT-Small), at a size the CPU sets up quickly
    "cc": [], "vtcc": [], "vitic": [], "dcsc": [],
    "pici": ["--pretrain-epochs", "0", "--train-epochs", "0", "--boost-epochs", "1"],  # boosting: masks and CLI targets
}


def count_main(methods, batch):
    """Print the kernels, copies and reads per training step of each method (--count)."""
    from conftest import make_image_folder
    from test_sync import count_steps  # the counter the test uses (needs pytest)

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_image_folder(Path(tmp) / "shapes", classes=4, per_class=batch // 2, size=(48, 40))
        print(f"per training step (the second of two), batch {batch}, 32 px, meta device standing in for CUDA")
        print(f"{'method':8} {'H2D copies':>10} {'D2H reads':>9} {'aug kernels':>11} {'model kernels':>13} "
              f"{'aug/model':>9} {'batch':>5} {'optimizer':>9}")
        for method in methods:
            module = importlib.import_module(method)
            extra = COUNTED[method]
            if method == "pici":  # k-means pseudo-labels on the host at the epoch's start: outside the step
                module = _with_fixed_targets(module)
            argv = ["--dataset", str(folder), "--image-size", "32", "--batch-size", str(batch), "--max-images", str(2 * batch),
                    "--epochs", "1", "--eval-every", "0", "--threads", "1", *extra, "--out-dir", tmp,
                    "--data-root", str(Path(tmp) / "data")]
            step = count_steps(module, argv)[-1]
            k = step["kernels"]
            print(f"{method:8} {step['copies']:>10} {step['reads']:>9} {k['augmentation']:>11} {k['model']:>13} "
                  f"{100 * k['augmentation'] / k['model']:>8.1f}% {k['batch']:>5} {k['optimizer']:>9}")


def _with_fixed_targets(module):
    """pici with its pseudo-labels made up (zeros): the counted step is the same, k-means is skipped."""
    class Shim:
        def __getattr__(self, name):
            return getattr(module, name)

        def main(self, argv):
            fake = lambda model, images, *a, **k: (torch.zeros(2, len(images), dtype=torch.long), 0.0)
            real, module.cli_targets = module.cli_targets, fake
            try:
                return module.main(argv)
            finally:
                module.cli_targets = real
    return Shim()


def timed(fn, device, repeat):
    """(fastest wall time, median process CPU time) of fn() over repeat runs, after one warm-up.

    On a shared CPU the wall time swings with other processes' load; the CPU time (all threads of
    this process) is steadier, and the fastest wall time is the least disturbed run.
    """
    fn()
    walls, cpus = [], []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return min(walls), statistics.median(cpus)


def pil_images_per_s(files, args):
    """torchvision's v1 transforms of the CC recipe on PIL images, decoded from disk as CC's own code does."""
    T = torchvision.transforms
    view = T.Compose([
        T.RandomResizedCrop(224, scale=(0.08, 1.0)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5),
        T.ToTensor(),
    ])

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            from PIL import Image
            with Image.open(files[i]) as im:
                im = im.convert("RGB")
            return view(im), view(im)

    loader = torch.utils.data.DataLoader(Files(), batch_size=args.batch, num_workers=args.workers, shuffle=True)
    t = time.perf_counter()
    n = sum(len(a) for a, _ in loader)
    return n / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64, help="image size of the views")
    p.add_argument("--batch", type=int, default=256, help="images per batch (two views each)")
    p.add_argument("--method", default="cc", choices=["cc", "vtcc", "vitic", "pici", "dcsc"],
                   help="whose augmentation recipe (the paper's, as declared in the method's file)")
    p.add_argument("--dataset", default="ucmerced", help="dataset name or image folder for real pixels (random pixels when absent)")
    p.add_argument("--data-root", default="./data", help="where named datasets live and the decoded-image cache goes")
    p.add_argument("--repeat", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--pil", action="store_true", help="also time torchvision's PIL transforms in a DataLoader")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for --pil")
    p.add_argument("--pil-images", type=int, default=512, help="images to push through the PIL pipeline")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--count", nargs="*", metavar="METHOD", help="count kernels, host-to-device copies and device-to-host "
                   "reads per training step of these methods (all five when none is named); nothing is timed")
    args = p.parse_args()
    if args.count is not None:
        return count_main(args.count or list(COUNTED), batch=16)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch}, recipe of {args.method}")
    recipe = lambda method: importlib.import_module(method).recipe("paper", args.dataset)["views"]

    def images(size, n):
        """Whole images (n, 3, S, S) at the default storage size and their originals' (height, width)."""
        if os.path.isdir(args.dataset) or os.path.isdir(os.path.join(args.data_root, args.dataset)):
            ds = data.load_dataset(args.dataset, root=args.data_root, image_size=size, max_images=n)
            return ds.images, ds.sizes
        return torch.randint(0, 256, (n, 3, 2 * size, 2 * size), dtype=torch.uint8), torch.tensor([[4 * size, 3 * size]]).repeat(n, 1)

    x, sizes = images(args.size, args.batch)
    x = x.to(device)
    aug = data.Augmentation(recipe(args.method), args.size)
    g = torch.Generator().manual_seed(0)
    t_aug, c_aug = timed(lambda: aug.views(x, g, sizes), device, args.repeat)

    model = torchvision.models.resnet34().to(device)
    x_a, x_b = aug.views(x, g, sizes)

    def step():
        model.zero_grad(set_to_none=True)
        (model(x_a).square().mean() + model(x_b).square().mean()).backward()

    t_model, c_model = timed(step, device, args.repeat)
    print(f"size {args.size}: storage {x.shape[-1]} px; wall s (fastest of {args.repeat}), CPU s (median)")
    print(f"augmentation (2 views)        wall {t_aug:8.3f}  cpu {c_aug:8.3f}   {args.batch / t_aug:.0f} images/s")
    print(f"resnet34 forward+backward     wall {t_model:8.3f}  cpu {c_model:8.3f}   "
          f"{args.batch / t_model:.0f} images/s")
    print(f"augmentation / model          wall {100 * t_aug / t_model:7.1f}%  cpu {100 * c_aug / c_model:7.1f}%")

    if args.pil:
        x224, sizes224 = images(224, args.batch)
        x224 = x224.to(device)
        aug224 = data.Augmentation(recipe("cc"), 224)
        t224, _ = timed(lambda: aug224.views(x224, g, sizes224), device, args.repeat)
        print(f"batched cc views at 224 px    {args.batch / t224:.0f} images/s "
              f"(two views each, from a {x224.shape[-1]} px cache)")
        folder = args.dataset if os.path.isdir(args.dataset) else os.path.join(args.data_root, args.dataset)
        if os.path.isdir(folder):
            files = sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs)
            files = files[::max(1, len(files) // args.pil_images)][:args.pil_images]  # spread over the classes
            print(f"PIL cc views at 224 px        {pil_images_per_s(files, args):.0f} images/s "
                  f"(two views each, DataLoader with {args.workers} workers, JPEG decoded each time)")
        else:
            print("PIL pipeline skipped: needs --dataset (a folder of images)")


if __name__ == "__main__":
    main()
