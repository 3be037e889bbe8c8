"""Datasets by name: the real archive, the cache, clear errors for missing or corrupt data."""

from __future__ import annotations

import gzip
import io
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import ConfigError, DataConfig, build_config
from common.data import (
    CIFAR10_CLASSES,
    CIFAR10_NORMALIZATION,
    DATA_ENV,
    DataError,
    Normalization,
    denormalize,
    load_dataset,
    load_imagefolder,
    resolve_data_path,
    to_normalized_tensor,
    unsafe_member,
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDDISTILL_CACHE", str(tmp_path / "cache"))


def _rgb(ci: int, i: int, size: int) -> Image.Image:
    return Image.fromarray(np.full((size, size, 3), (40 * ci + i) % 256, dtype=np.uint8))


def _write_archive(path, per_class=3, classes=("a", "b"), size=8, image=_rgb):
    """An ImageFolder archive under root/; image(class index, image index, size) draws each PNG."""
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for ci, cls in enumerate(classes):
                for i in range(per_class):
                    img = image(ci, i, size)
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


def extract(archive, folder):
    """Extracts a test archive safely on every Python 3.11: with filter="data" where tarfile has it (3.11.4+),
    else after checking every member ourselves."""
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(folder, filter="data")
        else:
            unsafe = [(m.name, reason) for m in tar.getmembers() if (reason := unsafe_member(m))]
            if unsafe:
                raise tarfile.TarError(f"unsafe members {unsafe}")
            tar.extractall(folder)


def test_archive_and_directory_read_the_same(tmp_path):
    archive = _write_archive(tmp_path / "small.tar.gz")
    from_archive = load_imagefolder(archive)
    folder = tmp_path / "folder"
    extract(archive, folder)
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
    x = to_normalized_tensor(images, CIFAR10_NORMALIZATION)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    expected = (images[0, 5, 7, 1] / 255.0 - 0.4822) / 0.1994
    assert x[0, 1, 5, 7].item() == pytest.approx(expected, abs=1e-5)
    back = (denormalize(x, CIFAR10_NORMALIZATION) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(back, images)
    with pytest.raises(ValueError, match="images have 1 channels but the normalisation has 3"):
        to_normalized_tensor(images[..., :1], CIFAR10_NORMALIZATION)


def _grey(ci: int, i: int, size: int) -> Image.Image:
    return Image.fromarray(np.full((size, size), 50 * ci + 7 * i + 10, dtype=np.uint8))  # mode L


def _grey_palette(ci: int, i: int, size: int) -> Image.Image:
    return _grey(ci, i, size).convert("P")  # a palette of greys only


def _colour_palette(ci: int, i: int, size: int) -> Image.Image:
    return _rgb(ci, i, size).convert("P") if ci else _grey(ci, i, size)  # colour PNGs and grey ones mixed


@pytest.mark.parametrize(("image", "channels"), [(_grey, 1), (_grey_palette, 1), (_rgb, 3), (_colour_palette, 3)],
                         ids=["grey", "grey palette", "colour", "grey and colour mixed"])
@pytest.mark.reliability
def test_images_keep_their_channels(image, channels, tmp_path, request, reliability):
    ds = load_imagefolder(_write_archive(tmp_path / "x.tar.gz", image=image))
    assert ds.channels == channels and ds.train.images.shape == (6, 8, 8, channels)
    expected = np.asarray(image(0, 1, 8).convert("L" if channels == 1 else "RGB"))  # grey repeated into RGB: lossless
    np.testing.assert_array_equal(ds.train.images[1], expected.reshape(8, 8, channels))
    kind = request.node.callspec.id
    reliability("Data", f"an ImageFolder of {kind} images (not CIFAR)",
                f"loaded with {channels} channel(s), pixels unchanged, normalised with its own mean "
                f"{tuple(round(m, 3) for m in ds.normalization.mean)}")


def test_an_imagefolder_is_normalised_with_its_whole_training_splits_statistics(tmp_path):
    archive = _write_archive(tmp_path / "grey.tar.gz", per_class=6, image=_grey)
    full = load_imagefolder(archive)
    pixels = full.train.images.astype(np.float64) / 255
    assert full.normalization.mean == pytest.approx([pixels.mean()])
    assert full.normalization.std == pytest.approx([pixels.std()])
    sliced = load_dataset(DataConfig(name="imagefolder", path=str(archive), train_per_class=2), seed=3)
    assert sliced.normalization == full.normalization != Normalization.of(sliced.train.images)
    x = to_normalized_tensor(full.train.images, full.normalization)
    assert x.shape == (12, 1, 8, 8) and x.mean().item() == pytest.approx(0, abs=1e-5)
    assert x.std().item() == pytest.approx(1, abs=0.05)


def test_cifar10_keeps_the_published_statistics(tmp_path):
    archive = _write_archive(tmp_path / "cifar.tar.gz", per_class=1, classes=CIFAR10_CLASSES)
    assert load_dataset(DataConfig(name="cifar10", path=str(archive))).normalization == CIFAR10_NORMALIZATION
    assert load_dataset(DataConfig(name="imagefolder", path=str(archive))).normalization != CIFAR10_NORMALIZATION


@pytest.mark.parametrize(("classes", "size", "message"), [
    (("only",), 8, r"one class folder \['only'\]; a classification dataset needs >= 2"),
])
@pytest.mark.reliability
def test_a_dataset_with_one_class_is_an_error(classes, size, message, tmp_path, reliability):
    with pytest.raises(DataError, match=message) as err:
        load_imagefolder(_write_archive(tmp_path / "one.tar.gz", classes=classes, size=size))
    reliability("Data", "an ImageFolder with one class folder", f"one-line error: {err.value}")


@pytest.mark.reliability
def test_non_square_images_are_an_error(tmp_path, reliability):
    def wide(ci: int, i: int, size: int) -> Image.Image:
        return Image.fromarray(np.full((size, 2 * size, 3), 40 * ci + i, dtype=np.uint8))

    with pytest.raises(DataError, match="images are 8x16 px; the ConvNet takes square images only") as err:
        load_imagefolder(_write_archive(tmp_path / "wide.tar.gz", image=wide))
    reliability("Data", "an ImageFolder of 8x16 images", f"one-line error: {err.value}")


def test_the_shard_windows_are_checked_against_the_datasets_own_classes(tmp_path):
    from common.holdings import load_experiment_data

    archive = _write_archive(tmp_path / "four.tar.gz", per_class=4, classes=("a", "b", "c", "d"))
    split = {"split.partition": "shards", "split.num_clients": 2, "split.classes_per_client": 2, "split.pipc": 1,
             "distill.ipc": 1, "data.name": "imagefolder", "data.path": str(archive)}
    with pytest.raises(ConfigError, match=r"number of classes \(4\) .* got 2 \+ 2 - 1"):
        load_experiment_data(build_config({}, split))
    assert load_experiment_data(build_config({}, {**split, "split.classes_per_client": 3})).num_classes == 4


def test_tiny_dataset_is_generated_only_by_name():
    ds = load_dataset(DataConfig(name="tiny", tiny_per_class=4))
    assert ds.name == "tiny" and len(ds.train) == 40 and len(ds.test) == 20


def _member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    data = b"x" if kind == tarfile.REGTYPE else b""
    info.size = len(data)
    return info, data


UNSAFE = [
    ("absolute path", _member("/tmp/train/a/0.png"), "an absolute path"),
    ("'..' component", _member("root/train/../../escape.png"), "'..' component"),
    ("symlink", _member("root/train/a/1.png", tarfile.SYMTYPE, "/etc/passwd"), "a link"),
    ("hard link", _member("root/train/a/1.png", tarfile.LNKTYPE, "root/train/a/0000.png"), "a link"),
    ("character device", _member("root/train/a/dev", tarfile.CHRTYPE), "a device"),
]


def _with_member(tmp_path, member) -> object:
    archive = _write_archive(tmp_path / "bad.tar.gz")
    with tarfile.open(archive) as good:
        members = [(m, good.extractfile(m).read()) for m in good.getmembers()]
    with tarfile.open(archive, "w:gz") as tar:
        for info, data in [*members, member]:
            tar.addfile(info, io.BytesIO(data))
    return archive


@pytest.mark.parametrize("kind, member, words", UNSAFE, ids=[u[0] for u in UNSAFE])
def test_the_archive_reader_refuses_unsafe_members(kind, member, words, tmp_path):
    with pytest.raises(DataError, match=f"bad.tar.gz: member .*{words}"):
        load_imagefolder(_with_member(tmp_path, member))


@pytest.mark.parametrize("kind, member, words", UNSAFE, ids=[u[0] for u in UNSAFE])
def test_extraction_without_tarfile_filters_checks_every_member(kind, member, words, tmp_path, monkeypatch):
    monkeypatch.delattr(tarfile, "data_filter", raising=False)  # Python 3.11.0-3.11.3: extractall has no filter=
    with pytest.raises(tarfile.TarError, match=words):
        extract(_with_member(tmp_path, member), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    extract(_write_archive(tmp_path / "good.tar.gz"), tmp_path / "good")
    assert len(list((tmp_path / "good" / "root" / "train").glob("*/*.png"))) == 6


def test_a_test_split_without_a_class_is_an_error(tmp_path):
    folder = tmp_path / "folder"
    extract(_write_archive(tmp_path / "small.tar.gz", classes=("a", "b", "c")), folder)
    for image in (folder / "root" / "test" / "c").iterdir():
        image.unlink()
    with pytest.raises(DataError, match=r"the test split has no images of classes \['c'\]"):
        load_dataset(DataConfig(name="imagefolder", path=str(folder / "root")))


def test_a_directory_edited_in_place_is_decoded_again(tmp_path):
    folder = tmp_path / "folder"
    extract(_write_archive(tmp_path / "small.tar.gz"), folder)
    image = folder / "root" / "train" / "a" / "0001.png"
    first = load_imagefolder(folder / "root")
    stat = image.stat()
    Image.fromarray(np.full((8, 8, 3), 3, dtype=np.uint8)).save(image)  # same size on disk, other pixels
    assert image.stat().st_size == stat.st_size
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again = load_imagefolder(folder / "root")
    assert first.train.images[1, 0, 0, 0] == 1 and again.train.images[1, 0, 0, 0] == 3
