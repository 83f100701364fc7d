"""bench_pipeline.py: both modes run each script's real main() and the pipeline is put back."""
import math
import sys

import data
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_pipeline  # noqa: E402


def test_bench_pipeline_measures_loop_and_model_and_restores_the_pipeline(tmp_path, image_folder):
    rows = bench_pipeline.main(["--methods", "cc", "pici", "--dataset", str(image_folder), "--image-size", "32",
                                "--max-images", "64", "--epochs", "1", "--batch-size", "32", "--device", "cpu",
                                "--data-root", str(tmp_path)])
    assert [r[0] for r in rows] == ["cc", "pici"]
    for method, loop, model, ratio in rows:
        assert loop > 0 and model > 0 and math.isfinite(ratio), method
    assert data.batches is bench_pipeline.REAL_BATCHES and data.Augmentation.views is bench_pipeline.REAL_VIEWS
