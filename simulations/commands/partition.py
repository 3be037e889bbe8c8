"""`feddistill partition`: one archive per party, cut by the project's holdings function.

    feddistill partition --config quickstart --out data/nodes [key=value ...]

writes `client-<k>.tar.gz` (client k's training and held-out slices), `public.tar.gz` (the server's safe subset),
`test.tar.gz` (the server's evaluation set) and `manifest.json` (per archive: sha256 and images per class; the
config, its holdings hash and the split seed), and `label_distribution.json` / `.png` (each client's images per
class, common/label_distribution.py). A SuperNode is then given only its own archive
(`--node-config "partition-id=K num-partitions=N data-path=/data/client-K.tar.gz"`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import save_json
from common.config import ExperimentConfig, config_to_dict
from common.data import ImageArrays
from common.holdings import decide_holdings, load_experiment_data, split_seed
from common.label_distribution import label_distribution, write_label_distribution
from common.node_data import holdings_sha256, write_node_archive

MANIFEST = "manifest.json"


def _take(arrays: ImageArrays, idx: np.ndarray) -> tuple[ImageArrays, np.ndarray]:
    return ImageArrays(arrays.images[idx], arrays.labels[idx]), idx


def _counts(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(labels, minlength=num_classes).tolist()


def partition(cfg: ExperimentConfig, out: Path) -> dict[str, Any]:
    """Writes every party's archive and the manifest under `out`; returns the manifest."""
    out = Path(out)
    dataset = load_experiment_data(cfg)
    holdings = decide_holdings(cfg, dataset.train.labels)
    meta = {"holdings_sha256": holdings_sha256(cfg), "split_seed": split_seed(cfg)}
    empty = (ImageArrays(dataset.test.images[:0], dataset.test.labels[:0]), np.zeros(0, dtype=np.int64))
    parties: dict[str, tuple[str, int | None, tuple[ImageArrays, np.ndarray], tuple[ImageArrays, np.ndarray]]] = {}
    for k in range(cfg.split.num_clients):
        train_idx, holdout_idx = holdings.client(k)
        parties[f"client-{k}"] = ("client", k, _take(dataset.train, train_idx), _take(dataset.train, holdout_idx))
    parties["public"] = ("public", None, _take(dataset.train, holdings.public), empty)
    parties["test"] = ("test", None, empty, _take(dataset.test, np.arange(len(dataset.test))))
    archives = {}
    for name, (role, partition_id, train, test) in parties.items():
        sha = write_node_archive(out / f"{name}.tar.gz", role, dataset.classes, dataset.normalization, train, test,
                                 {**meta, "partition_id": partition_id})
        archives[name] = {"file": f"{name}.tar.gz", "sha256": sha, "role": role, "partition_id": partition_id,
                          "train_per_class": _counts(train[0].labels, dataset.num_classes),
                          "test_per_class": _counts(test[0].labels, dataset.num_classes)}
    manifest = {"config": config_to_dict(cfg), **meta, "classes": list(dataset.classes),
                "normalization": dataset.normalization.to_json(), "archives": archives}
    save_json(out / MANIFEST, manifest)
    clients = [(archives[f"client-{k}"]["train_per_class"], archives[f"client-{k}"]["test_per_class"])
               for k in range(cfg.split.num_clients)]
    write_label_distribution(out, label_distribution(cfg, dataset.classes, clients, archives["public"]["train_per_class"]))
    return manifest
