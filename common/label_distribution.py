"""Who holds which labels: `label_distribution.json` and `label_distribution.png` beside a run or a partition.

Written by every federation run (its edge clients' shards, as the holdings or a deployment's manifest give them) and
by `feddistill partition` (the archives it wrote). The JSON holds, per client, the images per class of its train and
held-out slices, the server's public subset, and the partitioner's parameters. The figure is drawn by flwr-datasets'
own `flwr_datasets.visualization.plot_label_distributions`. That function takes a `Partitioner` and counts the labels
of each `load_partition(k)`; `FixedPartitioner` serves the shards already decided (common/holdings.py) as contiguous
row ranges of a label table, so the plot shows exactly these counts and nothing is partitioned again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, Features
from flwr_datasets.partitioner import Partitioner
from flwr_datasets.visualization import plot_label_distributions
from matplotlib.figure import Figure

from common.atomic import atomic_write, save_json
from common.config import ExperimentConfig

FILE_STEM = "label_distribution"


def partition_parameters(cfg: ExperimentConfig) -> dict[str, Any]:
    """The partitioner and its parameters, as the config names them (those the scheme uses)."""
    split = cfg.split
    params: dict[str, Any] = {"scheme": split.partition, "num_clients": split.num_clients,
                              "split_seed": split.seed if split.seed is not None else cfg.seed}
    if split.partition == "dirichlet":
        params.update(alpha=split.alpha, min_partition_size=split.min_partition_size)
    elif split.partition == "shards":
        params["classes_per_client"] = split.classes_per_client
    return params


def label_distribution(
    cfg: ExperimentConfig,
    classes: Sequence[str],
    clients: Sequence[tuple[Sequence[int], Sequence[int]]],
    public: Sequence[int],
) -> dict[str, Any]:
    """The JSON record: `clients[k]` = (train, held-out) images per class of client k; `public` the server's."""
    return {
        "classes": list(classes),
        "partition": partition_parameters(cfg),
        "clients": [
            {"client": k, "train": [int(x) for x in train], "held_out": [int(x) for x in held],
             "total": int(sum(train) + sum(held))}
            for k, (train, held) in enumerate(clients)
        ],
        "public": [int(x) for x in public],
    }


def write_label_distribution(folder: Path, distribution: dict[str, Any]) -> tuple[Path, Path]:
    """Writes `label_distribution.json` and `.png` (each client's whole shard, per class) into `folder`."""
    folder = Path(folder)
    json_path = save_json(folder / f"{FILE_STEM}.json", distribution)
    counts = np.array([[t + h for t, h in zip(c["train"], c["held_out"], strict=True)] for c in distribution["clients"]],
                      dtype=np.int64)
    scheme = distribution["partition"]["scheme"]
    figure = plot_counts(counts, distribution["classes"], f"Images per class of each edge client ({scheme})")
    png_path = atomic_write(folder / f"{FILE_STEM}.png",
                            lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    return json_path, png_path


class FixedPartitioner(Partitioner):
    """Partitions already decided: partition k is rows [sum(sizes[:k]), sum(sizes[:k+1])) of the assigned table."""

    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__()
        self._bounds = np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64))])

    @property
    def num_partitions(self) -> int:
        return len(self._bounds) - 1

    def load_partition(self, partition_id: int) -> Dataset:
        return self.dataset.select(range(int(self._bounds[partition_id]), int(self._bounds[partition_id + 1])))


def plot_counts(counts: np.ndarray, classes: Sequence[str], title: str) -> Figure:
    """A stacked bar per client (x) of its images per class (counts: clients x classes), drawn by flwr-datasets'
    plot_label_distributions over a label table with one row per image."""
    labels = np.concatenate([np.repeat(np.arange(len(classes)), row) for row in counts]) if counts.size else []
    table = Dataset.from_dict({"label": np.asarray(labels, dtype=np.int64)},
                              features=Features({"label": ClassLabel(names=list(classes))}))
    partitioner = FixedPartitioner(counts.sum(axis=1))
    partitioner.dataset = table
    axis = Figure(figsize=(max(4.0, 0.6 * len(counts) + 2.5), 4.0)).subplots()
    plot_label_distributions(partitioner, label_name="label", plot_type="bar", size_unit="absolute", axis=axis,
                             title=title, legend=True, legend_title="class")
    axis.set_xlabel("edge client (partition id)")
    return axis.figure
