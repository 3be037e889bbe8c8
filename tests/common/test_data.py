"""Datasets by name: the real archive, the cache, clear errors for missing or corrupt data."""

from __future__ import annotations

import gzip
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import DataConfig
from common.data import (
    CIFAR10_CLASSES,
    DATA_ENV,
    DataError,
    denormalize,
    load_dataset,
    load_imagefolder,
    resolve_data_path,
    to_normalized_tensor,
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDDISTILL_CACHE", str(tmp_path / "cache"))


def _write_archive(path, per_class=3, classes=("a", "b"), size=8):
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for ci, cls in enumerate(classes):
                for i in range(per_class):
                    img = Image.fromarray(np.full((size, size, 3), 40 * ci + i, dtype=np.uint8))
                    buf = io.BytesIO()
                    img.save(buf, format="PNG")
                    info = tarfile.TarInfo(f"root/{split}/{cls}/{i:04d}.png")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)
    return path


def test_real_archive_has_the_full_cifar10(archive, tmp_path):
    ds = load_dataset(DataConfig(name="cifar10", path=str(archive)))
    assert ds.classes == CIFAR10_CLASSES
    assert ds.train.images.shape == (50000, 32, 32, 3) and ds.train.images.dtype == np.uint8
    assert ds.test.images.shape == (10000, 32, 32, 3)
    assert (ds.train.per_class(10) == 5000).all() and (ds.test.per_class(10) == 1000).all()
    cached = list((tmp_path / "cache").glob("imagefolder-*.npz"))
    assert len(cached) == 1
    again = load_dataset(DataConfig(name="cifar10", path=str(archive)))
    np.testing.assert_array_equal(again.train.labels, ds.train.labels)
    np.testing.assert_array_equal(again.test.images[:100], ds.test.images[:100])


def test_archive_and_directory_read_the_same(tmp_path):
    archive = _write_archive(tmp_path / "small.tar.gz")
    from_archive = load_imagefolder(archive)
    folder = tmp_path / "folder"
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    from_dir = load_imagefolder(folder / "root")
    assert from_archive.classes == from_dir.classes == ("a", "b")
    np.testing.assert_array_equal(from_archive.train.images, from_dir.train.images)
    np.testing.assert_array_equal(from_archive.test.labels, [0, 0, 0, 1, 1, 1])


def test_slices_per_class_are_seeded(tmp_path):
    archive = _write_archive(tmp_path / "small.tar.gz", per_class=6)
    cfg = DataConfig(name="imagefolder", path=str(archive), train_per_class=2, test_per_class=1)
    a, b = load_dataset(cfg, seed=1), load_dataset(cfg, seed=1)
    assert list(a.train.per_class(2)) == [2, 2] and list(a.test.per_class(2)) == [1, 1]
    np.testing.assert_array_equal(a.train.images, b.train.images)


def test_missing_dataset_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(DataError, match=r"data\.path.*FEDDISTILL_DATA.*data\.download=true"):
        load_dataset(DataConfig(name="cifar10", path=str(tmp_path / "nothing")))
    with pytest.raises(DataError, match="no imagefolder dataset"):
        load_dataset(DataConfig(name="imagefolder", path=str(tmp_path / "nothing.tar.gz")))


def test_truncated_archive_is_a_clear_error(tmp_path):
    good = _write_archive(tmp_path / "good.tar.gz").read_bytes()
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="corrupt or truncated archive"):
        load_imagefolder(bad)


def test_garbage_image_is_a_clear_error(tmp_path):
    path = tmp_path / "junk.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name in ("x/train/a/0.jpg", "x/test/a/0.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 5
            tar.addfile(info, io.BytesIO(b"hello"))
    with pytest.raises(DataError, match=r"(train|test)/a/0.jpg is not a readable image"):
        load_imagefolder(path)


def test_archive_that_is_not_cifar10_is_rejected_by_name(tmp_path):
    archive = _write_archive(tmp_path / "small.tar.gz")
    with pytest.raises(DataError, match="not CIFAR-10's"):
        load_dataset(DataConfig(name="cifar10", path=str(archive)))


def test_not_gzip_at_all(tmp_path):
    path = tmp_path / "plain.tar.gz"
    path.write_bytes(gzip.compress(b"not a tar file"))
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_imagefolder(path)


def test_data_root_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "from-env"))
    assert resolve_data_path(str(tmp_path / "from-config")) == tmp_path / "from-config"
    assert resolve_data_path(None) == tmp_path / "from-env"
    monkeypatch.delenv(DATA_ENV)
    assert resolve_data_path(None) == tmp_path / "cache" / "data"


def test_normalisation_matches_the_dm_reference_and_inverts():
    images = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    x = to_normalized_tensor(images)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    expected = (images[0, 5, 7, 1] / 255.0 - 0.4822) / 0.1994
    assert x[0, 1, 5, 7].item() == pytest.approx(expected, abs=1e-5)
    back = (denormalize(x) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(back, images)


def test_tiny_dataset_is_generated_only_by_name():
    ds = load_dataset(DataConfig(name="tiny", tiny_per_class=4))
    assert ds.name == "tiny" and len(ds.train) == 40 and len(ds.test) == 20
