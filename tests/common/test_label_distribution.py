"""The label distribution beside a run or a partition: the JSON holds the given counts, and the figure is drawn by
flwr-datasets' plot_label_distributions from exactly those counts."""

from __future__ import annotations

import json

import numpy as np
from flwr_datasets.metrics import compute_counts

from common.config import load_config
from common.label_distribution import FixedPartitioner, label_distribution, plot_counts, write_label_distribution

CLASSES = ("cat", "dog", "ship")


def test_fixed_partitioner_serves_the_decided_shards_to_flwr_datasets_counting():
    counts = np.array([[3, 0, 1], [0, 0, 0], [2, 5, 4]])
    figure = plot_counts(counts, CLASSES, "t")  # flwr-datasets' own plot: the labels it counted are ours
    assert figure.axes[0].get_title() == "t"
    labels = np.concatenate([np.repeat(np.arange(3), row) for row in counts])
    from datasets import ClassLabel, Dataset, Features

    partitioner = FixedPartitioner(counts.sum(axis=1))
    partitioner.dataset = Dataset.from_dict({"label": labels}, features=Features({"label": ClassLabel(names=list(CLASSES))}))
    assert partitioner.num_partitions == 3
    assert compute_counts(partitioner, "label").to_numpy().tolist() == counts.tolist()


def test_the_json_records_each_clients_slices_and_the_partitioner(tmp_path):
    cfg = load_config("quickstart", {"split.partition": "dirichlet", "split.alpha": 0.3, "split.num_clients": 2})
    record = label_distribution(cfg, CLASSES, [([1, 2, 0], [0, 1, 0]), ([0, 0, 4], [0, 0, 1])], [5, 5, 5])
    json_path, png_path = write_label_distribution(tmp_path, record)
    saved = json.loads(json_path.read_text())
    assert saved["partition"] == {"scheme": "dirichlet", "num_clients": 2, "split_seed": cfg.seed, "alpha": 0.3,
                                  "min_partition_size": cfg.split.min_partition_size}
    assert saved["clients"][1] == {"client": 1, "train": [0, 0, 4], "held_out": [0, 0, 1], "total": 5}
    assert saved["public"] == [5, 5, 5] and saved["classes"] == list(CLASSES)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
