"""bench_pipeline.py: both modes run each script's real main() and the pipeline is put back."""
import math

import bench_pipeline
import data


def test_bench_pipeline_measures_loop_and_model_and_restores_the_pipeline(tmp_path, shared_data):
    rows = bench_pipeline.main(["--methods", "cc", "pici", "--dataset", str(shared_data / "ucmerced"), "--image-size", "32",
                                "--max-images", "64", "--epochs", "1", "--batch-size", "32", "--device", "cpu",
                                "--data-root", str(tmp_path)])
    assert [r[0] for r in rows] == ["cc", "pici"]
    for method, loop, model, ratio in rows:
        assert loop > 0 and model > 0 and math.isfinite(ratio), method
    assert data.batches is bench_pipeline.REAL_BATCHES and data.Augmentation.views is bench_pipeline.REAL_VIEWS
