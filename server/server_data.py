"""What the server holds: its public subset, its test set, and each client's images per class (sizes bound the guard).

Two sources, the same arrays:
  - `from_dataset(cfg)`: the simulation engine; the full dataset is read and cut by `decide_holdings`, and only the
    public subset and the test set are kept;
  - `from_node_data(cfg, folder)`: a deployment; the folder `feddistill partition` wrote, of which the server opens
    only `manifest.json`, `public.tar.gz` and `test.tar.gz` (each archive checked against the manifest's sha256,
    the manifest against the server's config). Clients' archives need not be there.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import ConfigError, ExperimentConfig
from common.data import CIFAR10_CLASSES, DataError, ImageArrays, Normalization
from common.holdings import decide_holdings, load_experiment_data
from common.node_data import holdings_sha256, load_node_archive

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ServerData:
    classes: tuple[str, ...]
    public: ImageArrays
    test: ImageArrays
    client_counts: list[tuple[list[int], list[int]]]  # images per class of each client's (train, held-out) slices
    normalization: Normalization  # the dataset's, as every client applies it

    @property
    def slice_sizes(self) -> list[tuple[int, int]]:
        """(train, held-out) images of each client: the update guard's bounds."""
        return [(sum(train), sum(held)) for train, held in self.client_counts]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.test.images.shape[-1])

    @property
    def image_size(self) -> int:
        return int(self.test.images.shape[1])


def from_dataset(cfg: ExperimentConfig) -> ServerData:
    """The server's part of the full dataset, cut by the project's holdings function."""
    dataset = load_experiment_data(cfg)
    holdings = decide_holdings(cfg, dataset.train.labels)
    public = ImageArrays(dataset.train.images[holdings.public], dataset.train.labels[holdings.public])
    labels, num_classes = dataset.train.labels, dataset.num_classes
    slices = (holdings.client(k) for k in range(cfg.split.num_clients))
    counts = [tuple(np.bincount(labels[idx], minlength=num_classes).tolist() for idx in pair) for pair in slices]
    return ServerData(dataset.classes, public, dataset.test, counts, dataset.normalization)


def from_node_data(cfg: ExperimentConfig, folder: Path) -> ServerData:
    """The server's own archives (public, test) and the client slice sizes from the manifest; DataError or
    ConfigError naming the file or key when anything does not match."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise DataError(f"{folder / MANIFEST}: unreadable ({type(err).__name__}); run feddistill partition") from None
    problem = manifest_problem(manifest, cfg.split.num_clients)
    if problem:
        raise DataError(f"{folder / MANIFEST}: malformed ({problem}); run feddistill partition")
    if manifest.get("holdings_sha256") != holdings_sha256(cfg):
        raise ConfigError(f"{folder / MANIFEST}: cut for another data/split config than this run's; "
                          "run feddistill partition with this config")
    archives = manifest["archives"]
    nodes = {}
    for name in ("public", "test"):
        path = folder / archives[name]["file"]
        if not path.is_file():
            raise DataError(f"{path}: missing (the server needs public.tar.gz and test.tar.gz beside {MANIFEST})")
        if hashlib.sha256(path.read_bytes()).hexdigest() != archives[name]["sha256"]:
            raise DataError(f"{path}: sha256 differs from {MANIFEST} (a changed or corrupt archive)")
        nodes[name] = load_node_archive(path)
    classes = nodes["public"].classes
    if nodes["test"].classes != classes or (cfg.data.name == "cifar10" and classes != CIFAR10_CLASSES):
        raise DataError(f"{folder}: the archives' classes {list(nodes['test'].classes)} / {list(classes)} are not the "
                        f"configured dataset's")
    if nodes["test"].normalization != nodes["public"].normalization:
        raise DataError(f"{folder}: public.tar.gz and test.tar.gz record different normalisations; run feddistill "
                        "partition again")
    counts = []
    for k in range(cfg.split.num_clients):
        entry = archives.get(f"client-{k}")
        if entry is None:
            raise DataError(f"{folder / MANIFEST}: no client-{k} (split.num_clients={cfg.split.num_clients})")
        counts.append((list(entry["train_per_class"]), list(entry["test_per_class"])))
    return ServerData(classes, nodes["public"].train, nodes["test"].test, counts, nodes["public"].normalization)


def manifest_problem(manifest: object, num_clients: int) -> str | None:
    """What is wrong with the layout of a manifest.json for `num_clients` clients (None: nothing)."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("archives"), dict):
        return "not an object with 'archives'"
    archives = manifest["archives"]
    for name in ("public", "test", *(f"client-{k}" for k in range(num_clients))):
        entry = archives.get(name)
        if entry is None:
            return f"no {name!r} archive" + (f" (split.num_clients={num_clients})" if name.startswith("client") else "")
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not isinstance(entry.get("sha256"), str):
            return f"archive {name!r} needs 'file' and 'sha256' strings"
        if "/" in entry["file"] or entry["file"] in ("", ".", ".."):
            return f"archive {name!r}: 'file' must be a file name beside the manifest"
        for key in ("train_per_class", "test_per_class"):
            counts = entry.get(key)
            if not isinstance(counts, list) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
                return f"archive {name!r}: {key!r} must be a list of counts >= 0"
    return None
