"""One edge client's private shard (train slice + held-out slice), loaded once per process.

The shard is client k of `common.holdings.decide_holdings`; the server's public subset is in no shard. A node
given its own archive (`feddistill partition`, node_config `data-path`) loads only that; under the simulation
engine the full dataset is read to cut the shard out of it and is not kept. The per-process cache holds shards,
keyed by everything that selects them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import ExperimentConfig, check_partition_id
from common.data import DataError, Normalization, load_dataset, resolve_data_path
from common.holdings import decide_holdings, split_seed
from common.node_data import check_dataset_classes, check_sha256, holdings_sha256, is_node_archive, load_node_archive
from common.protocol import DATA_PATH_KEY, DATA_SHA256_KEY


@dataclass(frozen=True)
class Shard:
    """uint8 images (N, H, W, C) and int64 labels of one client's train and held-out slices, and the dataset's
    normalisation (of the whole training split, the same on every node)."""

    partition_id: int
    train_images: np.ndarray
    train_labels: np.ndarray
    holdout_images: np.ndarray
    holdout_labels: np.ndarray
    num_classes: int
    normalization: Normalization

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[-1])

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[1])


_SHARDS: dict[str, Shard] = {}


def shard_key(cfg: ExperimentConfig, partition_id: int, data_path: str | None) -> str:
    data = cfg.data.model_dump(mode="json")
    if cfg.data.name != "tiny":
        data["path"] = str(resolve_data_path(data_path or cfg.data.path))
    return json.dumps(
        {"data": data, "split": cfg.split.model_dump(mode="json"), "seed": split_seed(cfg), "partition": partition_id},
        sort_keys=True,
    )


def shard_from_archive(cfg: ExperimentConfig, partition_id: int, path: Path, sha256: str | None = None) -> Shard:
    """This node's own archive (feddistill partition) as its whole shard: no global split is computed or read.

    DataError when its sha256 is not `sha256` (node_config data-sha256, from manifest.json: without it the node can
    only trust what the archive says of itself), or it belongs to another client, was cut for another data/split
    config, or has classes other than the configured dataset's."""
    if sha256 is not None:
        check_sha256(path, sha256, f"node_config {DATA_SHA256_KEY}")
    node = load_node_archive(path)
    if node.role != "client" or node.partition_id != partition_id:
        raise DataError(f"{path}: the archive of {node.role} {node.partition_id}, not of client {partition_id} "
                        "(node_config partition-id)")
    if node.meta.get("holdings_sha256") != holdings_sha256(cfg):
        raise DataError(f"{path}: cut for another data/split config than the server's (holdings hash differs); "
                        "run feddistill partition with the server's config")
    check_dataset_classes(cfg, node.classes, path)
    return Shard(partition_id, node.train.images, node.train.labels, node.test.images, node.test.labels,
                 len(node.classes), node.normalization)


def load_shard(cfg: ExperimentConfig, partition_id: int, data_path: str | Path | None = None,
               data_sha256: str | None = None) -> Shard:
    """Client `partition_id`'s shard, from the cache when this process loaded it before.

    `data_path` (a node's own data location) wins over cfg.data.path and $FEDDISTILL_DATA. When it is the node's
    own archive (feddistill partition), that archive is the whole shard; otherwise the shard is cut out of the
    full dataset in memory (the simulation engine).
    """
    check_partition_id(partition_id, cfg.split.num_clients)
    path = str(data_path) if data_path else None
    key = shard_key(cfg, partition_id, path)
    if key not in _SHARDS and path and is_node_archive(Path(path)):
        _SHARDS[key] = shard_from_archive(cfg, partition_id, Path(path), data_sha256)
    if key not in _SHARDS:
        data_cfg = cfg.data.model_copy(update={"path": path}) if path else cfg.data
        fallback = None if path or cfg.data.name == "tiny" or cfg.data.download else resolve_data_path(cfg.data.path)
        if fallback is not None and not fallback.exists():
            raise DataError(
                f"no {DATA_PATH_KEY!r} in this node's node_config and no dataset at {fallback}: give the SuperNode its "
                f'own archive of feddistill partition (--node-config "... {DATA_PATH_KEY}=\\"/data/client-{partition_id}'
                '.tar.gz\\"") or the full dataset ($FEDDISTILL_DATA)'
            )
        dataset = load_dataset(data_cfg, split_seed(cfg))
        train_idx, holdout_idx = decide_holdings(cfg, dataset.train.labels).client(partition_id)
        images, labels = dataset.train.images, dataset.train.labels
        _SHARDS[key] = Shard(
            partition_id=partition_id,
            train_images=images[train_idx],
            train_labels=labels[train_idx],
            holdout_images=images[holdout_idx],
            holdout_labels=labels[holdout_idx],
            num_classes=dataset.num_classes,
            normalization=dataset.normalization,
        )
    return _SHARDS[key]


def clear_cache() -> None:
    _SHARDS.clear()
