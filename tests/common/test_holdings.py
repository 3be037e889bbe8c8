"""Who holds which images: disjoint, covering, deterministic, one seed rule, for every scheme."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.config import build_config
from common.holdings import decide_holdings, partition_private, split_public, split_seed, train_holdout

LABELS = np.repeat(np.arange(10), 60)
np.random.default_rng(0).shuffle(LABELS)

SCHEMES = [
    {"pipc": 5, "num_clients": 4, "partition": "iid"},
    {"pipc": 5, "num_clients": 4, "partition": "dirichlet", "alpha": 0.3},
    {"pipc": 5, "num_clients": 4, "partition": "shards", "classes_per_client": 7},
    {"pipc": None, "public_ratio": 0.1, "num_clients": 12, "partition": "shards", "classes_per_client": 2},
    {"pipc": 5, "num_clients": 4, "partition": "iid", "validation_per_class": 8},
]


def cfg_of(split: dict, seed: int = 3):
    return build_config({"seed": seed, "data": {"name": "tiny", "tiny_per_class": 60}, "split": split, "distill": {"ipc": 1}})


@pytest.mark.parametrize("split", SCHEMES,
                         ids=lambda s: f"{s['partition']}-{s['num_clients']}-{s.get('validation_per_class', 0)}")
def test_public_validation_and_shards_are_disjoint_and_cover_the_training_set(split):
    holdings = decide_holdings(cfg_of(split), LABELS)
    holders = [holdings.public, holdings.validation, *holdings.shards]
    for i, a in enumerate(holders):
        for b in holders[i + 1 :]:
            assert np.intersect1d(a, b).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate(holders)), np.arange(len(LABELS)))
    pipc = split["pipc"] if split["pipc"] is not None else 6
    assert (np.bincount(LABELS[holdings.public], minlength=10) == pipc).all()
    assert (np.bincount(LABELS[holdings.validation], minlength=10) == split.get("validation_per_class", 0)).all()


@pytest.mark.parametrize("split", SCHEMES, ids=lambda s: f"{s['partition']}-{s['num_clients']}")
def test_same_seed_same_holdings_other_seed_other_holdings(split):
    a, b, c = (decide_holdings(cfg_of(split, seed), LABELS) for seed in (3, 3, 4))
    np.testing.assert_array_equal(a.public, b.public)
    np.testing.assert_array_equal(a.validation, b.validation)
    for x, y in zip(a.shards, b.shards, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.public, c.public)


def test_split_seed_pins_the_holdings_whatever_the_experiment_seed():
    split = {**SCHEMES[4], "seed": 11}
    a, b = decide_holdings(cfg_of(split, 0), LABELS), decide_holdings(cfg_of(split, 5), LABELS)
    assert split_seed(cfg_of(split, 0)) == split_seed(cfg_of(split, 5)) == 11
    for x, y in zip([a.public, a.validation, *a.shards], [b.public, b.validation, *b.shards], strict=True):
        np.testing.assert_array_equal(x, y)
    assert split_seed(cfg_of(SCHEMES[0], 7)) == 7  # no split.seed: the experiment seed


def test_a_validation_slice_leaves_the_public_subset_as_it_was():
    plain, with_validation = decide_holdings(cfg_of(SCHEMES[0]), LABELS), decide_holdings(cfg_of(SCHEMES[4]), LABELS)
    np.testing.assert_array_equal(plain.public, with_validation.public)
    assert len(with_validation.private) == len(plain.private) - 80


def test_shards_hold_exactly_k_classes_and_dirichlet_skews_labels():
    shards = decide_holdings(cfg_of(SCHEMES[2]), LABELS)
    assert all(len(np.unique(LABELS[s])) == 7 for s in shards.shards)
    skewed = decide_holdings(cfg_of({**SCHEMES[1], "alpha": 0.1}, 0), LABELS)
    iid = decide_holdings(cfg_of(SCHEMES[0], 0), LABELS)

    def spread(holdings):  # mean over clients of the largest class share
        return np.mean([np.bincount(LABELS[s], minlength=10).max() / len(s) for s in holdings.shards])

    assert spread(skewed) > spread(iid) + 0.1


def test_client_slices_are_the_shard_split_into_train_and_holdout():
    holdings = decide_holdings(cfg_of(SCHEMES[0]), LABELS)
    for k, shard in enumerate(holdings.shards):
        train, held = holdings.client(k)
        np.testing.assert_array_equal(np.sort(np.concatenate([train, held])), shard)
        assert len(held) == round(0.1 * len(shard))
    with pytest.raises(ValueError, match="partition-id=4"):
        holdings.client(4)


def test_split_errors_name_the_key():
    with pytest.raises(ValueError, match="split.pipc=61"):
        split_public(LABELS, 61, 0)
    _, private = split_public(LABELS, 59, 0)
    with pytest.raises(ValueError, match="split.num_clients=11"):
        partition_private(LABELS, private, 11)
    with pytest.raises(ValueError, match="split.validation_per_class"):
        decide_holdings(cfg_of({**SCHEMES[4], "validation_per_class": 56}), LABELS)


def test_holdout_slice_is_disjoint_and_keeps_training_data():
    idx = np.arange(100, 150)
    train, held = train_holdout(idx, 0.2, 0)
    assert len(held) == 10 and len(train) == 40
    assert np.intersect1d(train, held).size == 0
    assert len(train_holdout(np.array([7]), 0.5, 0)[0]) == 1


def test_public_and_validation_need_no_flower() -> None:
    """The server's distillation asks only for public and validation: that must not import flwr-datasets (the GPU
    machine has no Flower); the shards are partitioned when first asked for."""
    code = (
        "import sys, numpy as np\n"
        "from common.config import load_config\n"
        "from common.holdings import decide_holdings\n"
        "cfg = load_config('quickstart', {'split.validation_per_class': 5})\n"
        "h = decide_holdings(cfg, np.repeat(np.arange(10), 100))\n"
        "assert len(h.public) == 10 * cfg.split.pipc and len(h.validation) == 50\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('flwr', 'flwr_datasets', 'datasets')]\n"
        "assert len(h.shards) == cfg.split.num_clients and 'datasets' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def nested_cfg(pipc: int, private_pipc: int | None = 10, validation: int = 8, partition: str = "iid"):
    return cfg_of({"pipc": pipc, "private_pipc": private_pipc, "validation_per_class": validation, "num_clients": 4,
                   "partition": partition})


def test_nested_public_subsets_share_one_private_pool_and_grow_by_inclusion():
    """split.private_pipc: every pipc has the private pool of pipc=private_pipc; the public subsets nest; the images
    beyond private_pipc come from the validation slice, which loses them."""
    plain = decide_holdings(nested_cfg(10, None), LABELS)
    previous = np.empty(0, dtype=np.int64)
    for pipc in (1, 3, 10, 14, 18):
        holdings = decide_holdings(nested_cfg(pipc), LABELS)
        np.testing.assert_array_equal(holdings.private, plain.private)  # one received model for every pipc
        for k in range(4):
            np.testing.assert_array_equal(holdings.shards[k], plain.shards[k])
        assert (np.bincount(LABELS[holdings.public], minlength=10) == pipc).all()
        assert np.isin(previous, holdings.public).all()  # nested
        assert np.intersect1d(holdings.public, holdings.private).size == 0
        assert np.intersect1d(holdings.validation, holdings.public).size == 0
        assert np.isin(holdings.validation, plain.validation).all()
        assert len(holdings.validation) == 10 * (8 - max(0, pipc - 10))
        previous = holdings.public
    # At pipc = private_pipc the nested split is the plain one.
    at_draw = decide_holdings(nested_cfg(10), LABELS)
    np.testing.assert_array_equal(at_draw.public, plain.public)
    np.testing.assert_array_equal(at_draw.validation, plain.validation)


def test_nested_split_beyond_its_validation_slice_is_a_config_error():
    with pytest.raises(ValueError,
                       match=r"split.pipc=19: with private_pipc=10 it must be <= private_pipc \+ validation_per_class \(18\)"):
        nested_cfg(19)
