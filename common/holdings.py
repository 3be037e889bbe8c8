"""Who holds which training images: the one place that decides it.

`decide_holdings(cfg, labels)` returns, as index arrays into the training set:
  - `public`: the server's safe subset (`pipc` images per class, or `public_ratio` of each class);
  - `validation`: `split.validation_per_class` images per class that nobody trains on (for choosing
    hyperparameters without the test set; empty by default);
  - `shards[k]`: edge client k's private shard, and `client(k)` its (train, held-out) slices.

With `split.private_pipc` (the split-ratio benchmark), the private pool and the validation slice are those of
pipc=private_pipc for every pipc, and the public subsets are nested: pipc takes the first pipc images per class of
a fixed order over that split's public draw, then over its validation slice (which loses them). Every pipc thus
shares one private pool (one received model), and a larger public subset contains every smaller one. The images of
the draw beyond pipc are held by nobody.

Every entry point (the federation, each ClientApp, the ServerApp's distillation step, `feddistill
distill`, the sweep, the evidence protocol) asks this function, and the one seed rule is `split_seed`:
`split.seed` when set, else the experiment `seed`. The same seed also picks the dataset slice
(`data.train_per_class`), so it must be passed to `load_dataset` too (`load_experiment_data`).

The private remainder is partitioned with flwr-datasets partitioners applied to a small index+label
table (never the pixels): IID, Dirichlet(alpha) label skew, and k classes per client
(`PathologicalPartitioner` in its deterministic mode: client p holds classes p..p+k-1, so every class,
hence every private image, lands in some shard). The shards are partitioned when first asked for: the
distillation side needs only `public` and `validation` and so never imports flwr-datasets.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, partial

import numpy as np

from common.config import ConfigError, ExperimentConfig, check_classes, check_partition_id, public_per_class
from common.data import Dataset, load_dataset

HOLDOUT_SEED_STRIDE = 7919  # client k's held-out slice is drawn with split_seed + 7919 * (k + 1)
VALIDATION_STREAM = 1  # the validation slice has its own random stream: (split_seed, 1)
NESTING_STREAM = 2  # the order of the nested public subsets (split.private_pipc): (split_seed, 2)


@dataclass(frozen=True)
class Holdings:
    """Disjoint index arrays (each sorted) that together cover the training set, except the images of a nested
    split's draw beyond pipc (split.private_pipc), which nobody holds."""

    seed: int
    public: np.ndarray
    validation: np.ndarray
    client_holdout: float
    partition: Callable[[], tuple[np.ndarray, ...]] = field(repr=False, compare=False)

    @cached_property
    def shards(self) -> tuple[np.ndarray, ...]:
        """Each edge client's private shard."""
        return self.partition()

    @property
    def private(self) -> np.ndarray:
        """Every image some edge client holds."""
        return np.sort(np.concatenate(self.shards)) if self.shards else np.empty(0, dtype=np.int64)

    def client(self, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Client `partition_id`'s (train, held-out evaluation) slices of its shard."""
        check_partition_id(partition_id, len(self.shards))
        return train_holdout(
            self.shards[partition_id], self.client_holdout, self.seed + HOLDOUT_SEED_STRIDE * (partition_id + 1)
        )


def split_seed(cfg: ExperimentConfig) -> int:
    """The seed that decides the holdings and the dataset slice: split.seed, else the experiment seed."""
    return cfg.split.seed if cfg.split.seed is not None else cfg.seed


def load_experiment_data(cfg: ExperimentConfig) -> Dataset:
    """The config's dataset, sliced (data.train_per_class / test_per_class) with the split seed; ConfigError when
    the split cannot work with its number of classes."""
    dataset = load_dataset(cfg.data, split_seed(cfg))
    try:
        check_classes(cfg, dataset.num_classes)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return dataset


def decide_holdings(cfg: ExperimentConfig, labels: np.ndarray) -> Holdings:
    """The public subset, the validation slice and every client's shard for `cfg` over the training labels."""
    seed = split_seed(cfg)
    split = cfg.split
    pipc = public_per_class(split, int(np.bincount(labels).min()))
    drawn = pipc if split.private_pipc is None else split.private_pipc
    public, private = split_public(labels, drawn, seed)
    validation = np.empty(0, dtype=np.int64)
    if split.validation_per_class:
        validation = draw_per_class(
            labels, private, split.validation_per_class, np.random.default_rng([seed, VALIDATION_STREAM]),
            "split.validation_per_class",
        )
        private = np.setdiff1d(private, validation)
    if split.private_pipc is not None:
        public = nested_public(labels, public, validation, pipc, np.random.default_rng([seed, NESTING_STREAM]))
        validation = np.setdiff1d(validation, public)
    if len(private):
        _check_num_clients(split.num_clients, private)  # now, not when the shards are first asked for
    partition = partial(
        partition_private, labels, private, split.num_clients, split.partition, split.alpha, split.classes_per_client,
        split.min_partition_size, seed,
    )
    return Holdings(seed, public, validation, split.client_holdout, partition)


def draw_per_class(labels: np.ndarray, pool: np.ndarray, per_class: int, rng: np.random.Generator, key: str) -> np.ndarray:
    """`per_class` random indices of each class from `pool` (sorted); ValueError naming `key` when a class has fewer."""
    num_classes = int(labels.max()) + 1
    counts = np.bincount(labels[pool], minlength=num_classes)
    if per_class > counts.min():
        raise ValueError(f"{key}={per_class}: must be <= {counts.min()} (fewest images of a class left to draw from)")
    chosen = np.concatenate(
        [rng.choice(pool[labels[pool] == c], size=per_class, replace=False) for c in range(num_classes)]
    ).astype(np.int64)
    return np.sort(chosen)


def nested_public(labels: np.ndarray, drawn: np.ndarray, validation: np.ndarray, pipc: int, rng: np.random.Generator
                  ) -> np.ndarray:
    """The first `pipc` images per class of a fixed order: `drawn` (the private pool's complement) in a random order,
    then `validation` in a random order. The order depends on the seed only, so the subsets nest as pipc grows."""
    chosen = []
    for c in range(int(labels.max()) + 1):
        order = [rng.permutation(pool[labels[pool] == c]) for pool in (drawn, validation)]
        chosen.append(np.concatenate(order)[:pipc])
    return np.sort(np.concatenate(chosen).astype(np.int64))


def split_public(labels: np.ndarray, pipc: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`pipc` random indices per class (the public subset) and the sorted rest (the private pool)."""
    public = draw_per_class(labels, np.arange(len(labels)), pipc, np.random.default_rng(seed), "split.pipc")
    return public, np.setdiff1d(np.arange(len(labels)), public)


def _check_num_clients(num_clients: int, private: np.ndarray) -> None:
    if num_clients > len(private):
        raise ValueError(f"split.num_clients={num_clients}: must be <= {len(private)} (private images)")


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
    if len(private) == 0:  # every image is public: a distillation-only config
        return tuple(np.empty(0, dtype=np.int64) for _ in range(num_clients))
    _check_num_clients(num_clients, private)
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


def train_holdout(indices: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits a client shard into (train, held-out evaluation) index arrays; at least one train image."""
    shuffled = np.random.default_rng(seed).permutation(indices)
    n_holdout = min(int(round(holdout * len(indices))), len(indices) - 1)
    return np.sort(shuffled[n_holdout:]), np.sort(shuffled[:n_holdout])
