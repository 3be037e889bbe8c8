"""The server's safe public subset and the private edge shards, as index arrays into the training set.

The private remainder is partitioned with flwr-datasets partitioners applied to a small index+label
table (never the pixels): IID, Dirichlet(alpha) label skew, and k classes per client
(`PathologicalPartitioner` in its deterministic mode: client p holds classes p..p+k-1, so every class,
hence every private image, lands in some shard).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rich.table import Table

from common.config import SplitConfig, public_per_class


@dataclass(frozen=True)
class Split:
    """`public`: indices of the server's safe subset; `clients[k]`: indices of client k's private shard."""

    public: np.ndarray
    clients: tuple[np.ndarray, ...]

    @property
    def private(self) -> np.ndarray:
        return np.sort(np.concatenate(self.clients)) if self.clients else np.empty(0, dtype=np.int64)


def split_public(labels: np.ndarray, pipc: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`pipc` random indices per class (the public subset) and the sorted rest (the private pool)."""
    rng = np.random.default_rng(seed)
    num_classes = int(labels.max()) + 1
    counts = np.bincount(labels, minlength=num_classes)
    if pipc > counts.min():
        raise ValueError(f"split.pipc={pipc}: must be <= {counts.min()} (fewest training images in a class)")
    public = np.concatenate(
        [rng.choice(np.flatnonzero(labels == c), size=pipc, replace=False) for c in range(num_classes)]
    ).astype(np.int64)
    public.sort()
    private = np.setdiff1d(np.arange(len(labels)), public)
    return public, private


def partition_private(
    labels: np.ndarray,
    private: np.ndarray,
    num_clients: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    classes_per_client: int = 2,
    min_partition_size: int = 1,
    seed: int = 0,
) -> tuple[np.ndarray, ...]:
    """Partitions the private indices over `num_clients` shards (each sorted); their union is `private`."""
    if num_clients > len(private):
        raise ValueError(f"split.num_clients={num_clients}: must be <= {len(private)} (private images)")
    from datasets import Dataset as TableDataset  # heavy import, only where partitioning happens
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    order = np.random.default_rng(seed).permutation(private)  # IidPartitioner shards contiguously
    table = TableDataset.from_dict({"idx": order, "label": labels[order]})
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_clients)
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    elif scheme == "shards":
        partitioner = PathologicalPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            num_classes_per_partition=classes_per_client,
            class_assignment_mode="deterministic",
            shuffle=True,
            seed=seed,
        )
    else:
        raise ValueError(f"split.partition={scheme!r}: must be one of iid, dirichlet, shards")
    partitioner.dataset = table
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Dirichlet's "min_partition_size not met, retrying"
        try:
            shards = tuple(
                np.sort(np.asarray(partitioner.load_partition(k)["idx"], dtype=np.int64)) for k in range(num_clients)
            )
        except ValueError as err:
            raise ValueError(f"split.partition={scheme!r} cannot partition {len(private)} images: {err}") from None
    covered = np.concatenate(shards)
    if len(covered) != len(private) or not np.array_equal(np.sort(covered), np.sort(private)):
        raise ValueError(
            f"split.partition={scheme!r}: shards cover {len(np.unique(covered))} of {len(private)} private images"
        )
    return shards


def make_split(labels: np.ndarray, cfg: SplitConfig, seed: int) -> Split:
    """The public subset and the private shards for a split config (cfg.seed overrides `seed`)."""
    seed = cfg.seed if cfg.seed is not None else seed
    per_class = int(np.bincount(labels).min())
    public, private = split_public(labels, public_per_class(cfg, per_class), seed)
    clients = partition_private(
        labels,
        private,
        cfg.num_clients,
        cfg.partition,
        cfg.alpha,
        cfg.classes_per_client,
        cfg.min_partition_size,
        seed,
    )
    return Split(public, clients)


def train_holdout(indices: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits a client shard into (train, held-out evaluation) index arrays; at least one train image."""
    shuffled = np.random.default_rng(seed).permutation(indices)
    n_holdout = min(int(round(holdout * len(indices))), len(indices) - 1)
    return np.sort(shuffled[n_holdout:]), np.sort(shuffled[:n_holdout])


def summary_table(labels: np.ndarray, split: Split, classes: Sequence[str]) -> Table:
    """Images per class for the public subset and every client (a rich Table)."""
    table = Table(title="Images per class: server public subset and private edge shards")
    table.add_column("holder", no_wrap=True)
    for name in classes:
        table.add_column(name[:5], justify="right", no_wrap=True)
    table.add_column("total", justify="right", no_wrap=True)
    rows = [("public", split.public)] + [(f"client {k}", idx) for k, idx in enumerate(split.clients)]
    for holder, idx in rows:
        counts = np.bincount(labels[idx], minlength=len(classes))
        table.add_row(holder, *(str(c) for c in counts), str(len(idx)))
    return table
