"""What the server holds: its public subset, its test set, and each client's images per class (sizes bound the guard).

Two sources, the same arrays:
  - `from_dataset(cfg)`: the simulation engine; the full dataset is read and cut by `decide_holdings`, and only the
    public subset and the test set are kept;
  - `from_node_data(cfg, folder)`: a deployment; the folder `feddistill partition` wrote, of which the server opens
    only `manifest.json`, `public.tar.gz` and `test.tar.gz` (each archive checked against the manifest's sha256,
    the manifest against the server's config). Clients' archives need not be there.

`distill_inputs(cfg, evaluate_on, model_path)` is what every distillation driver starts from: the public subset and
the evaluation split as normalised tensors, the normalisation and the received model, built in one place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.atomic import load_torch
from common.config import ConfigError, ExperimentConfig
from common.data import DataError, Dataset, ImageArrays, Normalization, to_normalized_tensor
from common.holdings import decide_holdings, load_experiment_data, split_seed
from common.models import model_from_config
from common.node_data import check_dataset_classes, check_sha256, holdings_sha256, load_node_archive

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


@dataclass(frozen=True)
class DistillInputs:
    """What a distillation starts from: public and evaluation images (normalised, N x C x H x W) with their labels."""

    public_x: torch.Tensor
    public_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    normalization: Normalization
    num_classes: int
    model: nn.Module | None  # the received model, None when no path was given


_LOADED: dict[str, Dataset] = {}  # the last dataset this process loaded, by its data config and split seed


def experiment_data(cfg: ExperimentConfig) -> Dataset:
    """load_experiment_data, kept in memory for the next call with the same data and split seed (a grid worker runs
    many cells of one dataset)."""
    key = json.dumps([cfg.data.model_dump(mode="json"), split_seed(cfg)], sort_keys=True)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = load_experiment_data(cfg)
    return _LOADED[key]


def distill_inputs(cfg: ExperimentConfig, evaluate_on: str = "test", model_path: Path | None = None,
                   dataset: Dataset | None = None, device: torch.device | str = "cpu") -> DistillInputs:
    """The public subset of `cfg` and its evaluation split ("test", or "validation": the slice nobody holds, and the
    test split is then never read) as tensors on `device`, with the received model at `model_path` when given
    (DataError when it is not a state_dict of cfg.model)."""
    dataset = dataset or experiment_data(cfg)
    holdings = decide_holdings(cfg, dataset.train.labels)
    if evaluate_on == "test":
        evaluation = dataset.test
    elif evaluate_on == "validation":
        if not cfg.split.validation_per_class:
            raise ConfigError("evaluating on the validation slice needs split.validation_per_class >= 1")
        evaluation = ImageArrays(dataset.train.images[holdings.validation], dataset.train.labels[holdings.validation])
    else:
        raise ValueError(f"evaluate_on={evaluate_on!r}: must be 'test' or 'validation'")
    model = None
    if model_path is not None:
        model = model_from_config(cfg.model, dataset.num_classes, dataset.channels, dataset.image_size)
        try:
            model.load_state_dict(load_torch(model_path))
        except (RuntimeError, TypeError, AttributeError) as err:
            detail = " ".join(str(err).split())[:300]
            raise DataError(f"{model_path}: not a state_dict of the configured model.* ({detail})") from None
    public = ImageArrays(dataset.train.images[holdings.public], dataset.train.labels[holdings.public])
    return as_inputs(public, evaluation, dataset.normalization, dataset.num_classes, model, device)


def as_inputs(public: ImageArrays, evaluation: ImageArrays, normalization: Normalization, num_classes: int,
              model: nn.Module | None = None, device: torch.device | str = "cpu") -> DistillInputs:
    """The images as normalised float32 tensors (N, C, H, W) and int64 labels on `device`."""
    return DistillInputs(
        to_normalized_tensor(public.images, normalization, device), torch.as_tensor(public.labels, device=device),
        to_normalized_tensor(evaluation.images, normalization, device), torch.as_tensor(evaluation.labels, device=device),
        normalization, num_classes, model,
    )


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
        check_sha256(path, archives[name]["sha256"], MANIFEST)
        nodes[name] = load_node_archive(path)
    classes = nodes["public"].classes
    if nodes["test"].classes != classes:
        raise DataError(f"{folder}: test.tar.gz's classes {list(nodes['test'].classes)} are not public.tar.gz's {list(classes)}")
    check_dataset_classes(cfg, classes, folder)
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
