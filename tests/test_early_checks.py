"""What can be checked before the images are decoded is checked before: a start that fails on the
batch size or K decodes nothing and leaves no cache (and no run folder) behind."""
import pytest

import data
import vtcc
from conftest import make_image_folder


@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "32"], "shapes has 16 images, fewer than --batch-size 32: lower --batch-size"),
    (["--max-images", "3", "--batch-size", "2"], "shapes has 3 images, fewer than the 4 clusters: raise --max-images to at least the 4 classes"),
    (["--num-clusters", "20", "--batch-size", "8"], "shapes has 16 images, fewer than the 20 clusters: lower --num-clusters"),
])
def test_a_dataset_too_small_is_refused_before_decoding(tmp_path, capsys, monkeypatch, flags, message):
    shapes = make_image_folder(tmp_path / "shapes", classes=4, per_class=4, size=(32, 32))
    monkeypatch.setattr(data, "_decode", lambda *a: pytest.fail("an image was decoded"))
    with pytest.raises(SystemExit) as stop:
        vtcc.main(["--dataset", str(shapes), "--image-size", "32", "--vit", "tiny", "--device", "cpu", "--threads", "1",
                   "--out-dir", str(tmp_path / "runs"), "--data-root", str(tmp_path / "data"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err == [f"error: {message}"], err
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


def test_an_in_memory_dataset_is_checked_too(tmp_path):
    with pytest.raises(data.DataError, match="digits has 20 images, fewer than --batch-size 32"):
        data.load_dataset("digits", image_size=8, max_images=20, need=32)
    assert len(data.load_dataset("digits", image_size=8, max_images=20)) == 20  # evaluation needs no batch
