"""Per-node data archives: what one party holds, and nothing else (the deployment's Figure 1 on disk).

An archive is a gzip tar in ImageFolder layout plus `holding.json` at its root:

    holding.json                  {"format", "role", "partition_id", "classes", "train": [names], "test": [names],
                                   "holdings_sha256", "split_seed", "normalization": {"mean", "std"}}
    train/<class>/<index>.png     client: its training slice; public: the server's public subset
    test/<class>/<index>.png      client: its held-out slice;  test: the server's evaluation set

Images are PNG (lossless), named by their index in the full dataset, and read back in the order `holding.json`
lists them, so a node loads exactly the arrays the in-memory split gives (same images, labels and order).
`holdings_sha256` identifies the data/split config that cut it: a node checks it against the server's config.
`normalization` is the full dataset's (its whole training split's statistics, or CIFAR-10's published ones), written
by `feddistill partition` into every archive, so each node normalises exactly as the others do, whatever its slice.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.atomic import atomic_write
from common.config import ExperimentConfig, config_to_dict
from common.data import CIFAR10_CLASSES, DataError, ImageArrays, Normalization, read_archive_files
from common.holdings import split_seed

FORMAT = "feddistill-holding/1"
HOLDING_FILE = "holding.json"
ROLES = ("client", "public", "test")


@dataclass(frozen=True)
class NodeData:
    role: str
    partition_id: int | None
    classes: tuple[str, ...]
    train: ImageArrays
    test: ImageArrays
    normalization: Normalization
    meta: dict[str, Any]


def holdings_sha256(cfg: ExperimentConfig) -> str:
    """What decides who holds which image: the data and split sections and the split seed."""
    c = config_to_dict(cfg)
    split = {k: v for k, v in c["split"].items() if not (k == "private_pipc" and v is None)}  # the hash before nesting
    ident = {"data": {k: v for k, v in c["data"].items() if k != "path"}, "split": split, "split_seed": split_seed(cfg)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def check_sha256(path: Path, expected: str, source: str) -> None:
    """DataError when the file's sha256 is not `expected` (given by `source`: the manifest, a node_config key)."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if digest != expected.strip().lower():
        raise DataError(f"{path}: sha256 {digest[:12]}... differs from {source}'s {expected[:12]}... (another or a "
                        "changed archive; manifest.json gives each node's)")


def check_dataset_classes(cfg: ExperimentConfig, classes: tuple[str, ...], where: Path) -> None:
    """DataError when archives cut for a cifar10 config hold other classes."""
    if cfg.data.name == "cifar10" and tuple(classes) != CIFAR10_CLASSES:
        raise DataError(f"{where}: classes {list(classes)} differ from the configured dataset's {list(CIFAR10_CLASSES)}")


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_node_archive(
    path: Path, role: str, classes: tuple[str, ...], normalization: Normalization, train: tuple[ImageArrays, np.ndarray],
    test: tuple[ImageArrays, np.ndarray], meta: dict[str, Any],
) -> str:
    """Writes one party's archive atomically; `train`/`test` are (arrays, their indices in the full split),
    `normalization` the full dataset's.

    Returns the archive's sha256."""
    if role not in ROLES:
        raise ValueError(f"role={role!r}: must be one of {', '.join(ROLES)}")
    entries: dict[str, list[str]] = {}
    blobs: list[tuple[str, bytes]] = []
    for split, (arrays, indices) in (("train", train), ("test", test)):
        names = [f"{split}/{classes[label]}/{index:06d}.png" for label, index in zip(arrays.labels, indices, strict=True)]
        entries[split] = names
        blobs += [(name, _png(image)) for name, image in zip(names, arrays.images, strict=True)]
    holding = {"format": FORMAT, "role": role, "classes": list(classes), **entries,
               "normalization": normalization.to_json(), **meta}

    def write(tmp: Path) -> None:
        with tarfile.open(tmp, "w:gz") as tar:
            for name, blob in [(HOLDING_FILE, json.dumps(holding, indent=1).encode()), *blobs]:
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))

    atomic_write(path, write)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def is_node_archive(path: Path) -> bool:
    """Whether `path` is an archive with a holding.json at its root (read lazily: only the first member)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with tarfile.open(path, "r:*") as tar:
            first = tar.next()
            return first is not None and first.name == HOLDING_FILE
    except (tarfile.TarError, EOFError, zlib.error, OSError):
        return False


def load_node_archive(path: Path) -> NodeData:
    """One party's archive, its images in holding.json's order; DataError naming the file for anything wrong."""
    path = Path(path)
    files = read_archive_files(path, "; write it again with feddistill partition")
    try:
        holding = json.loads(files[HOLDING_FILE])
    except (KeyError, json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise DataError(f"{path}: no readable {HOLDING_FILE} (write node archives with feddistill partition)") from None
    if not isinstance(holding, dict) or holding.get("format") != FORMAT or holding.get("role") not in ROLES:
        raise DataError(f"{path}: {HOLDING_FILE} is not a {FORMAT} description")
    problem = _holding_problem(holding)
    if problem:
        raise DataError(f"{path}: {HOLDING_FILE} is malformed: {problem}; write it again with feddistill partition")
    classes = tuple(holding["classes"])
    index = {c: i for i, c in enumerate(classes)}

    def read(split: str) -> ImageArrays:
        images, labels = [], []
        for name in holding[split]:
            if name not in files:
                raise DataError(f"{path}: {HOLDING_FILE} lists {name}, which the archive lacks")
            cls = name.split("/")[1]
            if cls not in index:
                raise DataError(f"{path}: {name} is of class {cls!r}, not one of {list(classes)}")
            try:
                with Image.open(io.BytesIO(files[name])) as img:
                    array = np.asarray(img, dtype=np.uint8)
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                raise DataError(f"{path}: {name} is not a readable image ({type(err).__name__})") from None
            images.append(array[..., None] if array.ndim == 2 else array)
            labels.append(index[cls])
        if not images:
            return ImageArrays(np.zeros((0, 0, 0, 0), dtype=np.uint8), np.zeros(0, dtype=np.int64))
        if len({image.shape for image in images}) > 1:
            raise DataError(f"{path}: the {split} images differ in size or channels; write it again with feddistill partition")
        return ImageArrays(np.stack(images), np.asarray(labels, dtype=np.int64))

    if "normalization" not in holding:
        raise DataError(f"{path}: {HOLDING_FILE} records no normalization (an older feddistill partition); "
                        "run feddistill partition again")
    try:
        normalization = Normalization.from_json(holding["normalization"])
    except DataError as err:
        raise DataError(f"{path}: {HOLDING_FILE}'s {err}") from None
    meta = {k: v for k, v in holding.items() if k not in ("train", "test", "classes", "normalization")}
    return NodeData(holding["role"], holding.get("partition_id"), classes, read("train"), read("test"), normalization,
                    meta)


def _holding_problem(holding: dict[str, Any]) -> str | None:
    """What is wrong with the types of a holding.json's entries (None: nothing)."""
    def strings(value: object) -> bool:
        return isinstance(value, list) and all(isinstance(x, str) for x in value)

    if not strings(holding.get("classes")) or not holding["classes"] or len(set(holding["classes"])) != len(holding["classes"]):
        return "'classes' must be a non-empty list of distinct names"
    for split in ("train", "test"):
        if not strings(holding.get(split)) or not all(name.count("/") == 2 for name in holding[split]):
            return f"{split!r} must be a list of '{split}/<class>/<file>' names"
    partition_id = holding.get("partition_id")
    if partition_id is not None and (not isinstance(partition_id, int) or isinstance(partition_id, bool) or partition_id < 0):
        return "'partition_id' must be null or an integer >= 0"
    return None
