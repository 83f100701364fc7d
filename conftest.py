"""Shared test fixtures: where the real test images are, and a helper that runs a method script
end to end on the CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent


def find_shared_data():
    """The small real datasets (UC Merced, DTD) live in shared/data beside the checkout; CI's clean
    clone may sit elsewhere, so SHARED_DATA can point at them."""
    candidates = [os.environ.get("SHARED_DATA"), ROOT.parent / "shared" / "data", ROOT / "shared" / "data", "/work/shared/data"]
    for c in candidates:
        if c and (Path(c) / "ucmerced").is_dir():
            return Path(c)
    return None


SHARED_DATA = find_shared_data()


@pytest.fixture(scope="session")
def shared_data():
    if SHARED_DATA is None:
        pytest.fail("the shared test images were not found: set SHARED_DATA to the folder holding ucmerced/ and dtd10/")
    return SHARED_DATA


def run_script(script, *args, out_dir, data_root, timeout=900):
    """Run `python <script> args...` on the CPU, fail with its output if it fails, return stdout."""
    cmd = [sys.executable, str(ROOT / script), *map(str, args), "--out-dir", str(out_dir), "--data-root", str(data_root),
           "--device", "cpu", "--threads", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc.stdout


CONTRACT_FILES = ["args.json", "log.jsonl", "checkpoint.pt", "final.json", "assignments.csv", "clusters.png"]


def check_run_files(run_path, num_images, epochs):
    """Every file CONTRACT.md lists is there and well formed."""
    for name in CONTRACT_FILES:
        assert (run_path / name).is_file(), f"{name} missing in {run_path}"
    log = [json.loads(line) for line in (run_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, epochs + 1))
    assert all(r["img_per_s"] > 0 and r["seconds"] > 0 for r in log)
    final = json.loads((run_path / "final.json").read_text())
    for key in ("nmi", "acc", "ari"):
        assert 0.0 <= final[key] <= 1.0 or (key == "ari" and -1 <= final[key] <= 1)
    for key in ("epochs", "img_per_s", "wall_seconds", "device", "precision", "peak_memory_mb"):
        assert key in final, key
    assert final["epochs"] == epochs
    rows = (run_path / "assignments.csv").read_text().splitlines()
    assert rows[0] == "index,file,label,cluster,confidence" and len(rows) == num_images + 1
    assert (run_path / "clusters.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return final


def check_resume(script, tmp_path, shared_data, *args, epochs=2):
    """Train `epochs` epochs in one go, and 1 epoch then --resume auto to `epochs`: the final
    metrics and the last logged loss are equal (CONTRACT: exact resume on CPU)."""
    common = ["--dataset", shared_data / "ucmerced", "--max-images", 256, "--image-size", 32, "--eval-every", 1, "--save-every", 1, *args]
    full = run_script(script, *common, "--epochs", epochs, "--run-name", "full", out_dir=tmp_path, data_root=tmp_path / "data")
    run_script(script, *common, "--epochs", 1, "--run-name", "part", out_dir=tmp_path, data_root=tmp_path / "data")
    run_script(script, *common, "--epochs", epochs, "--run-name", "part", "--resume", "auto", out_dir=tmp_path, data_root=tmp_path / "data")
    a = check_run_files(tmp_path / "full", 256, epochs)
    b = json.loads((tmp_path / "part" / "final.json").read_text())
    for key in ("nmi", "acc", "ari"):
        assert a[key] == b[key], (key, a[key], b[key])
    last = lambda p: json.loads((p / "log.jsonl").read_text().splitlines()[-1])
    assert last(tmp_path / "full")["loss"] == last(tmp_path / "part")["loss"]
    assert "final: NMI" in full
    return a
