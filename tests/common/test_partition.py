"""The public subset and private shards: disjoint, covering, deterministic, for every scheme."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import SplitConfig
from common.partition import make_split, partition_private, split_public, summary_table, train_holdout

LABELS = np.repeat(np.arange(10), 60)
np.random.default_rng(0).shuffle(LABELS)

SCHEMES = [
    SplitConfig(pipc=5, num_clients=4, partition="iid"),
    SplitConfig(pipc=5, num_clients=4, partition="dirichlet", alpha=0.3),
    SplitConfig(pipc=5, num_clients=4, partition="shards", classes_per_client=7),
    SplitConfig(pipc=None, public_ratio=0.1, num_clients=12, partition="shards", classes_per_client=2),
]


@pytest.mark.parametrize("cfg", SCHEMES, ids=lambda c: f"{c.partition}-{c.num_clients}")
def test_public_and_shards_are_disjoint_and_cover_the_training_set(cfg):
    split = make_split(LABELS, cfg, seed=3)
    holders = [split.public, *split.clients]
    for i, a in enumerate(holders):
        for b in holders[i + 1 :]:
            assert np.intersect1d(a, b).size == 0
    union = np.concatenate(holders)
    assert len(union) == len(LABELS)
    np.testing.assert_array_equal(np.sort(union), np.arange(len(LABELS)))
    pipc = cfg.pipc if cfg.pipc is not None else 6
    assert (np.bincount(LABELS[split.public], minlength=10) == pipc).all()


@pytest.mark.parametrize("cfg", SCHEMES, ids=lambda c: f"{c.partition}-{c.num_clients}")
def test_same_seed_same_split_other_seed_other_split(cfg):
    a, b, c = make_split(LABELS, cfg, 3), make_split(LABELS, cfg, 3), make_split(LABELS, cfg, 4)
    np.testing.assert_array_equal(a.public, b.public)
    for x, y in zip(a.clients, b.clients):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.public, c.public)


def test_shards_hold_exactly_k_classes_and_dirichlet_skews_labels():
    shards = make_split(LABELS, SCHEMES[2], 0)
    assert all(len(np.unique(LABELS[s])) == 7 for s in shards.clients)
    skewed = make_split(LABELS, SplitConfig(pipc=5, num_clients=4, partition="dirichlet", alpha=0.1), 0)
    iid = make_split(LABELS, SCHEMES[0], 0)

    def spread(split):  # mean over clients of the largest class share
        return np.mean([np.bincount(LABELS[s], minlength=10).max() / len(s) for s in split.clients])

    assert spread(skewed) > spread(iid) + 0.1


def test_split_errors_name_the_key():
    with pytest.raises(ValueError, match="split.pipc=61"):
        split_public(LABELS, 61, 0)
    _, private = split_public(LABELS, 59, 0)
    with pytest.raises(ValueError, match="split.num_clients=11"):
        partition_private(LABELS, private, 11)


def test_holdout_slice_is_disjoint_and_keeps_training_data():
    idx = np.arange(100, 150)
    train, held = train_holdout(idx, 0.2, 0)
    assert len(held) == 10 and len(train) == 40
    assert np.intersect1d(train, held).size == 0
    assert len(train_holdout(np.array([7]), 0.5, 0)[0]) == 1


def test_summary_table_counts_every_holder():
    from rich.console import Console

    split = make_split(LABELS, SCHEMES[0], 0)
    table = summary_table(LABELS, split, [f"c{i}" for i in range(10)])
    assert table.row_count == 1 + 4
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    assert "public" in text and "client 3" in text and str(len(split.clients[0])) in text
