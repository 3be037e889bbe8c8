"""The ClientApp's handlers (without a Flower runtime): what they need, what they reply, what they refuse."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from common.config import build_config
from common.data import DataError, load_dataset
from common.holdings import decide_holdings
from common.models import build_model
from common.protocol import EXPERIMENT_KEY, read_experiment, round_config, round_lr, round_settings
from common.records import model_to_record
from common.training import settings_from_config
from edge_client.client_app import evaluate_reply, train_reply
from edge_client.shard import load_shard
from server.boundary import evaluate_reply_problems, model_spec, train_reply_problems

TINY = {
    "name": "tiny-client",
    "device": "cpu",
    "data": {"name": "tiny"},
    "split": {"pipc": 2, "num_clients": 2},
    "model": {"width": 8},
    "federation": {"rounds": 1, "batch_size": 32, "lr": 0.05, "lr_decay": 0.5},
    "distill": {"ipc": 1},
}


def tiny_cfg(**overrides):
    return build_config(TINY, overrides)


def message_content(cfg, server_round=1, model=None, **config_changes) -> RecordDict:
    model = model or build_model(width=cfg.model.width)
    config = {**round_config(cfg, server_round), "server-round": server_round, **config_changes}
    return RecordDict({"arrays": model_to_record(model), "config": ConfigRecord(config)})


NODE = {"partition-id": 1, "num-partitions": 2}


def test_train_reply_holds_only_the_model_arrays_and_scalar_metrics():
    cfg = tiny_cfg()
    reply = train_reply(message_content(cfg), NODE)
    assert set(reply.keys()) == {"arrays", "metrics"}
    assert train_reply_problems(reply, model_spec(build_model(width=8))) == []
    shard = load_shard(cfg, 1)
    assert reply["metrics"]["num-examples"] == len(shard.train_labels)


def test_evaluate_reply_uses_the_held_out_slice():
    cfg = tiny_cfg()
    reply = evaluate_reply(message_content(cfg), NODE)
    assert set(reply.keys()) == {"metrics"}
    assert evaluate_reply_problems(reply) == []
    assert reply["metrics"]["num-examples"] == len(load_shard(cfg, 1).holdout_labels) > 0


def test_the_shard_is_client_k_of_the_split_and_never_public():
    cfg = tiny_cfg()
    dataset = load_dataset(cfg.data, cfg.seed)
    holdings = decide_holdings(cfg, dataset.train.labels)
    shard = load_shard(cfg, 0)
    assert len(shard.train_labels) + len(shard.holdout_labels) == len(holdings.shards[0])
    public = {dataset.train.images[i].tobytes() for i in holdings.public}
    mine = {img.tobytes() for img in np.concatenate([shard.train_images, shard.holdout_images])}
    assert not public & mine
    assert load_shard(cfg, 0) is shard  # cached per process


@pytest.mark.parametrize(
    "change, key",
    [
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"batch-size": 0}, "batch-size"),
        ({"local-epochs": -1}, "local-epochs"),
        ({"lr": 0.0}, "lr"),
    ],
)
def test_train_refuses_a_round_config_it_cannot_honour(change, key):
    with pytest.raises(ValueError, match=key):
        train_reply(message_content(tiny_cfg(), **change), NODE)


@pytest.mark.parametrize(
    "node, key",
    [
        ({"partition-id": 2, "num-partitions": 2}, "partition-id"),
        ({"partition-id": 0, "num-partitions": 3}, "num-partitions"),
        ({"num-partitions": 2}, "partition-id"),
    ],
)
def test_train_refuses_a_node_config_that_does_not_fit_the_split(node, key):
    with pytest.raises(ValueError, match=key):
        train_reply(message_content(tiny_cfg()), node)


def test_train_refuses_arrays_that_do_not_match_the_model():
    cfg = tiny_cfg()
    with pytest.raises(ValueError, match="arrays"):
        train_reply(message_content(cfg, model=build_model(width=4)), NODE)


def test_train_refuses_a_message_without_the_experiment_config():
    content = message_content(tiny_cfg())
    del content["config"][EXPERIMENT_KEY]
    with pytest.raises(ValueError, match=EXPERIMENT_KEY):
        train_reply(content, NODE)


def test_round_config_decays_the_lr_and_round_trips_the_experiment():
    cfg = tiny_cfg()
    assert round_lr(cfg, 1) == pytest.approx(0.05)
    assert round_lr(cfg, 3) == pytest.approx(0.05 * 0.25)
    config = round_config(cfg, 3)
    assert config["lr"] == pytest.approx(0.0125)
    assert read_experiment(config) == cfg
    assert json.loads(config[EXPERIMENT_KEY])["model"]["width"] == 8


def test_the_training_settings_a_client_reads_are_those_the_server_decided():
    cfg = tiny_cfg(**{"federation.local_epochs": 3, "federation.optimizer": "adam", "federation.weight_decay": 0.0})
    settings = settings_from_config(round_config(cfg, 2))
    assert settings == round_settings(cfg, 2)
    assert (settings.epochs, settings.batch_size, settings.optimizer, settings.lr) == (3, 32, "adam", pytest.approx(0.025))


def test_a_node_with_neither_a_data_path_nor_a_dataset_is_told_to_get_its_archive(monkeypatch, tmp_path):
    monkeypatch.delenv("FEDDISTILL_DATA", raising=False)
    monkeypatch.setenv("FEDDISTILL_CACHE", str(tmp_path))  # nothing at the default data location either
    cfg = build_config({**TINY, "data": {"name": "cifar10", "path": None}})
    with pytest.raises(DataError, match=r"^no 'data-path' in this node's node_config .*client-1\.tar\.gz"):
        train_reply(message_content(cfg), NODE)
