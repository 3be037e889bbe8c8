"""Datasets by name, decoded once to uint8 arrays and cached, each with the normalisation its images get."""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.atomic import atomic_write
from common.config import DataConfig

# CIFAR-10 statistics used by the DM reference (utils.get_dataset); every other dataset uses its own.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std of [0, 1] pixels: normalised = (pixel - mean) / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return len(self.mean)

    @classmethod
    def of(cls, images: np.ndarray) -> Normalization:
        """The statistics of uint8 images (N, H, W, C), accumulated in float64 one chunk at a time."""
        total, squares, n = 0.0, 0.0, 0
        for chunk in np.array_split(images, max(1, len(images) // 4096)):
            pixels = chunk.reshape(-1, chunk.shape[-1]).astype(np.float64) / 255.0
            total, squares, n = total + pixels.sum(0), squares + (pixels**2).sum(0), n + len(pixels)
        mean = total / n
        std = np.sqrt(np.maximum(squares / n - mean**2, 0.0))
        if (std == 0).any():
            raise DataError("the training images have a constant channel (std 0): they cannot be normalised")
        return cls(tuple(float(m) for m in mean), tuple(float(s) for s in std))

    def to_json(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, value: object) -> Normalization:
        """{"mean": [...], "std": [...]}; DataError unless both are lists of finite numbers of one length >= 1 and
        every std is > 0 (a std of 0 would divide by zero: every image becomes inf/NaN)."""
        if not isinstance(value, dict) or not all(isinstance(value.get(k), list) for k in ("mean", "std")):
            raise DataError("normalization: must be {\"mean\": [numbers], \"std\": [numbers]}")
        mean, std = value["mean"], value["std"]
        numbers = [*mean, *std]
        if not mean or len(mean) != len(std) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in numbers):
            raise DataError(f"normalization: mean and std must be lists of finite numbers of one length (got {len(mean)} "
                            f"and {len(std)} entries)")
        if min(std) <= 0:
            raise DataError(f"normalization: std {std} has an entry <= 0 (a constant channel cannot be normalised)")
        return cls(tuple(float(m) for m in mean), tuple(float(s) for s in std))

    def broadcast(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std shaped (1, C, 1, 1) like `x` (N, C, H, W); ValueError when the channels differ."""
        if x.shape[1] != self.channels:
            raise ValueError(f"images have {x.shape[1]} channels but the normalisation has {self.channels}")
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return mean, torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)


CIFAR10_NORMALIZATION = Normalization(CIFAR10_MEAN, CIFAR10_STD)


def to_normalized_tensor(images: np.ndarray, norm: Normalization, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W), scaled to [0, 1] and normalised with `norm`."""
    x = torch.as_tensor(images, device=device).permute(0, 3, 1, 2).float().div_(255.0)
    mean, std = norm.broadcast(x)
    return x.sub_(mean).div_(std).contiguous()


def denormalize(x: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """Inverse of the normalisation: (N, C, H, W) -> [0, 1] values (clamped)."""
    mean, std = norm.broadcast(x)
    return (x * std + mean).clamp(0.0, 1.0)


DATA_ENV = "FEDDISTILL_DATA"  # where the dataset is: a .tar.gz archive, an ImageFolder dir, or a torchvision root
CACHE_ENV = "FEDDISTILL_CACHE"  # where decoded arrays are cached (default ~/.cache/feddistill)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DECODER = 2  # in the cache key: 2 keeps grey images at one channel (1 converted everything to RGB)


class DataError(RuntimeError):
    """A dataset that is missing, corrupt or malformed; the message says what to do."""


@dataclass(frozen=True)
class ImageArrays:
    """Images as uint8 (N, H, W, C) with int64 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def per_class(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=num_classes)


@dataclass(frozen=True)
class Dataset:
    """A dataset and the normalisation every node applies to it: CIFAR-10's published statistics for cifar10 (as the
    DM reference), else the per-channel statistics of the whole training split (`load_dataset` decides)."""

    name: str
    classes: tuple[str, ...]
    train: ImageArrays
    test: ImageArrays
    normalization: Normalization

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[-1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[1])


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "feddistill")


def resolve_data_path(configured: str | None) -> Path:
    """data.path, else $FEDDISTILL_DATA, else ~/.cache/feddistill/data."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return cache_dir() / "data"


def load_dataset(cfg: DataConfig, seed: int = 0) -> Dataset:
    """The dataset named by `cfg`, sliced to `train_per_class`/`test_per_class` if set (seeded)."""
    if cfg.name == "tiny":
        dataset = make_tiny_dataset(cfg.tiny_per_class, seed=seed)
    else:
        path = resolve_data_path(cfg.path)
        if _is_imagefolder(path):
            dataset = load_imagefolder(path, CIFAR10_NORMALIZATION if cfg.name == "cifar10" else None)
        elif cfg.name == "cifar10":
            dataset = load_torchvision_cifar10(path, download=cfg.download)
        else:
            raise DataError(_missing_message(path, cfg.name))
        if cfg.name == "cifar10" and dataset.classes != CIFAR10_CLASSES:
            raise DataError(f"{path}: class folders {list(dataset.classes)} are not CIFAR-10's {list(CIFAR10_CLASSES)}")
        untested = [c for i, c in enumerate(dataset.classes) if not (dataset.test.labels == i).any()]
        if untested:
            raise DataError(f"{path}: the test split has no images of classes {untested}; every class needs test images")
    return Dataset(
        dataset.name,
        dataset.classes,
        _slice_per_class(dataset.train, cfg.train_per_class, dataset.num_classes, seed),
        _slice_per_class(dataset.test, cfg.test_per_class, dataset.num_classes, seed + 1),
        dataset.normalization,  # of the whole training split, whatever the slice
    )


def _is_imagefolder(path: Path) -> bool:
    return path.is_file() and path.name.endswith((".tar.gz", ".tgz")) or (path / "train").is_dir()


def _missing_message(path: Path, name: str) -> str:
    return (
        f"no {name} dataset at {path}. Point data.path (or ${DATA_ENV}) at the CIFAR-10 archive "
        "(e.g. shared/data/cifar10-jpeg.tar.gz) or an ImageFolder directory with train/<class>/ and test/<class>/"
        + (", or set data.download=true to fetch CIFAR-10 with torchvision (needs internet)" if name == "cifar10" else "")
    )


def _slice_per_class(arrays: ImageArrays, per_class: int | None, num_classes: int, seed: int) -> ImageArrays:
    if per_class is None:
        return arrays
    rng = np.random.default_rng(seed)
    keep = np.concatenate(
        [rng.permutation(np.flatnonzero(arrays.labels == c))[:per_class] for c in range(num_classes)]
    )
    keep.sort()
    return ImageArrays(arrays.images[keep], arrays.labels[keep])


# ---------------------------------------------------------------- ImageFolder (directory or .tar.gz), cached


def load_imagefolder(path: Path, normalization: Normalization | None = None) -> Dataset:
    """`train/<class>/*` and `test/<class>/*` images, decoded once and cached as uint8 arrays; normalised with
    `normalization` when given (CIFAR-10's published one), else with the training split's own statistics."""
    path = Path(path)
    if not path.exists():
        raise DataError(_missing_message(path, "imagefolder"))
    cached = cache_dir() / f"imagefolder-{_source_key(path)}.npz"
    if cached.exists():
        try:
            classes, train, test = _read_cache(cached)
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"cache file {cached} is unreadable ({err}); delete it to decode {path} again") from None
    else:
        classes, train, test = _decode(_read_tar(path) if path.is_file() else _read_dir(path), path)
        atomic_write(cached, lambda tmp: _write_npz(tmp, classes, train, test))
    return Dataset(path.name, classes, train, test, normalization or Normalization.of(train.images))


def _source_key(path: Path) -> str:
    """The cache key: the source's path, and the size and modification time of the archive or of every file in the
    directory tree (a file edited, added, removed or renamed in place changes it; nothing is read)."""
    if path.is_file():
        st = path.stat()
        ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    else:
        stats = ((str(p.relative_to(path)), p.stat()) for p in path.rglob("*") if p.is_file())
        entries = sorted((name, st.st_size, st.st_mtime_ns) for name, st in stats)
        ident = f"{path.resolve()}|{entries}"
    return hashlib.sha256(f"{DECODER}|{ident}".encode()).hexdigest()[:16]


Splits = tuple[tuple[str, ...], ImageArrays, ImageArrays]  # classes, train, test


def _write_npz(tmp: Path, classes: tuple[str, ...], train: ImageArrays, test: ImageArrays) -> None:
    with open(tmp, "wb") as fh:
        np.savez(fh, classes=np.array(classes), train_images=train.images, train_labels=train.labels,
                 test_images=test.images, test_labels=test.labels)


def _read_cache(cached: Path) -> Splits:
    with np.load(cached, allow_pickle=False) as z:
        return (tuple(str(c) for c in z["classes"]), ImageArrays(z["train_images"], z["train_labels"]),
                ImageArrays(z["test_images"], z["test_labels"]))


_MEMBER = re.compile(r"(?:^|/)(train|test)/([^/]+)/([^/]+)$")


def unsafe_member(member: tarfile.TarInfo) -> str | None:
    """Why an archive member is unsafe to read or extract (an absolute or '..' path, a link, a device), else None."""
    parts = member.name.replace("\\", "/").split("/")
    if member.name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", member.name) or ".." in parts:
        return "an absolute path or a '..' component"
    if member.issym() or member.islnk():
        return "a link"
    if not (member.isfile() or member.isdir()):
        return "a device, FIFO or other special file"
    return None


# Decompression limits of read_archive_files: one member, and all members together against the archive's own size
# (images barely compress: CIFAR-10's JPEG archive unpacks to about 1.3x its size; a decompression bomb to 100x+).
MAX_MEMBER_BYTES = 64 * 2**20
MAX_EXPANSION = 16  # total member bytes <= MAX_EXPANSION x the archive's size + MAX_MEMBER_BYTES


def read_archive_files(path: Path, hint: str = "") -> dict[str, bytes]:
    """Every plain file of a tar archive, name -> bytes, in archive order; DataError for an unsafe or repeated member,
    a member or a total beyond the decompression limits (checked on the sizes the headers declare, before reading),
    or a corrupt archive (`hint` says what to do)."""
    out = {}
    budget = MAX_EXPANSION * Path(path).stat().st_size + MAX_MEMBER_BYTES if Path(path).is_file() else 0
    total = 0
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                reason = unsafe_member(member)
                if reason:
                    raise DataError(f"{path}: member {member.name[:100]!r} is {reason}; the archive must hold only plain files")
                if not member.isfile():
                    continue
                if member.name in out:
                    raise DataError(f"{path}: member {member.name[:100]!r} appears twice; a tampered archive{hint}")
                total += member.size
                if member.size > MAX_MEMBER_BYTES or total > budget:
                    raise DataError(
                        f"{path}: member {member.name[:100]!r} would unpack to {member.size} bytes ({total} in all), beyond "
                        f"the limits ({MAX_MEMBER_BYTES} per member, {budget} in all: {MAX_EXPANSION}x the archive's "
                        f"size + {MAX_MEMBER_BYTES}); a decompression bomb or not a data archive{hint}"
                    )
                out[member.name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise DataError(f"{path}: corrupt or truncated archive ({type(err).__name__}: {err}){hint}") from None
    return out


def _read_tar(path: Path) -> list[tuple[str, str, str, bytes]]:
    """(split, class, name, bytes) of every image in the archive; DataError for any unsafe member."""
    files = read_archive_files(path, "; copy it again (shared/data/README.md gives its sha256)")
    return [
        (m[1], m[2], m[3], blob)
        for name, blob in files.items()
        if (m := _MEMBER.search(name)) and name.lower().endswith(IMAGE_SUFFIXES)
    ]


def _read_dir(path: Path) -> list[tuple[str, str, str, bytes]]:
    return [
        (p.parent.parent.name, p.parent.name, p.name, p.read_bytes())
        for split in ("train", "test")
        for p in (path / split).glob("*/*")
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]


GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # PIL modes with one grey level per pixel


def _pixels(img: Image.Image) -> np.ndarray:
    """uint8 (H, W) for a grey image (a grey mode, or a palette of greys only), else (H, W, 3) RGB."""
    if img.mode in GREY_MODES:
        return np.asarray(img.convert("L"), dtype=np.uint8)
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if img.mode == "P" and (rgb == rgb[..., :1]).all():
        return np.ascontiguousarray(rgb[..., 0])
    return rgb


def _channels_last(images: list[np.ndarray]) -> list[np.ndarray]:
    """All grey: (H, W, 1) each. Any colour: (H, W, 3) each, a grey image repeated into three equal channels (what
    RGB conversion does; nothing is lost)."""
    if all(a.ndim == 2 for a in images):
        return [a[..., None] for a in images]
    return [np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a for a in images]


def _decode(files: list[tuple[str, str, str, bytes]], source: Path) -> Splits:
    classes = tuple(sorted({cls for split, cls, _, _ in files if split == "train"}))
    if not classes:
        raise DataError(f"{source}: no images under train/<class>/ (expected an ImageFolder layout)")
    test_classes = {cls for split, cls, _, _ in files if split == "test"}
    if not test_classes:
        raise DataError(f"{source}: no images under test/<class>/")
    if not test_classes <= set(classes):
        raise DataError(f"{source}: test classes {sorted(test_classes - set(classes))} have no training folder")
    index = {c: i for i, c in enumerate(classes)}
    decoded: list[tuple[str, np.ndarray, int]] = []
    for split, cls, name, blob in sorted(files, key=lambda f: f[:3]):
        try:
            with Image.open(io.BytesIO(blob)) as img:
                decoded.append((split, _pixels(img), index[cls]))
        except (OSError, SyntaxError) as err:
            raise DataError(f"{source}: {split}/{cls}/{name} is not a readable image ({type(err).__name__})") from None
    if len(classes) < 2:
        raise DataError(f"{source}: train/ has one class folder {list(classes)}; a classification dataset needs >= 2")
    sizes = {a.shape[:2] for _, a, _ in decoded}
    if len(sizes) != 1:
        raise DataError(f"{source}: images have different sizes {sorted(sizes)}; all must share one size")
    (height, width), = sizes
    if height != width:
        raise DataError(f"{source}: images are {height}x{width} px; the ConvNet takes square images only")
    images = _channels_last([a for _, a, _ in decoded])

    def split_arrays(split: str) -> ImageArrays:
        rows = [i for i, (s, _, _) in enumerate(decoded) if s == split]
        return ImageArrays(np.stack([images[i] for i in rows]), np.asarray([decoded[i][2] for i in rows], dtype=np.int64))

    return classes, split_arrays("train"), split_arrays("test")


# ---------------------------------------------------------------- torchvision CIFAR-10


def load_torchvision_cifar10(root: Path, download: bool = False) -> Dataset:
    """torchvision's CIFAR10 under `root` (fetched there first when `download`)."""
    from torchvision.datasets import CIFAR10

    try:
        train = CIFAR10(str(root), train=True, download=download)
        test = CIFAR10(str(root), train=False, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted."
        raise DataError(f"{_missing_message(root, 'cifar10')} (torchvision: {err})") from None
    return Dataset(
        "cifar10",
        tuple(train.classes),
        ImageArrays(np.asarray(train.data, dtype=np.uint8), np.asarray(train.targets, dtype=np.int64)),
        ImageArrays(np.asarray(test.data, dtype=np.uint8), np.asarray(test.targets, dtype=np.int64)),
        CIFAR10_NORMALIZATION,
    )


# ---------------------------------------------------------------- generated data (unit tests only)


def make_tiny_dataset(per_class: int = 20, num_classes: int = 10, image_size: int = 32, seed: int = 0) -> Dataset:
    """A generated, learnable dataset (class = a colour and a stripe orientation, plus noise). Tests only."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(40, 215, size=(num_classes, 3))
    yy, xx = np.mgrid[0:image_size, 0:image_size]
    patterns = np.stack(
        [colours[c] + 30 * np.sin((xx * np.cos(c) + yy * np.sin(c)) * 0.8)[..., None] for c in range(num_classes)]
    )

    def split(n_per_class: int) -> ImageArrays:
        labels = np.repeat(np.arange(num_classes), n_per_class)
        noisy = patterns[labels] + rng.normal(0, 20, size=(len(labels), image_size, image_size, 3))
        return ImageArrays(np.clip(noisy, 0, 255).astype(np.uint8), labels.astype(np.int64))

    train, test = split(per_class), split(max(1, per_class // 2))
    return Dataset("tiny", tuple(f"class{c}" for c in range(num_classes)), train, test, Normalization.of(train.images))
