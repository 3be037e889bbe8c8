"""The edge ClientApp: trains the global ConvNet on this node's private shard and replies with weights + scalars.

A reply holds exactly one ArrayRecord ("arrays": the model's state_dict) and one MetricRecord
("metrics": scalars); never images, labels or anything else (the server enforces this, see
server/boundary.py). The experiment config arrives in every message (common/protocol.py).
With DP on, Flower's fixedclipping_mod clips each update to the server's clipping norm before it leaves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common.config import ExperimentConfig
from common.data import to_normalized_tensor
from common.models import build_model
from common.protocol import DATA_PATH_KEY, DATA_SHA256_KEY, EVAL_BATCH_KEY, read_experiment, read_partition
from common.records import load_record_into, model_to_record
from common.runtime import pick_device
from common.training import evaluate, settings_from_config, train_local
from edge_client.shard import Shard, load_shard


def dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's fixedclipping_mod for train messages that carry a clipping norm (DP on); the rest pass through."""
    config = msg.content.get("config")
    if msg.metadata.message_type == MessageType.TRAIN and isinstance(config, ConfigRecord) and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[dp_clipping_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(content=train_reply(msg.content, context.node_config), reply_to=msg)


@app.evaluate()
def evaluate_holdout(msg: Message, context: Context) -> Message:
    return Message(content=evaluate_reply(msg.content, context.node_config), reply_to=msg)


def _unpack(content: RecordDict, node_config: Mapping[str, Any]) -> tuple[ExperimentConfig, ConfigRecord, Shard, torch.nn.Module]:
    """The experiment config, the round's config, this node's shard and the global model loaded from the message."""
    config = content.get("config")
    if not isinstance(config, ConfigRecord):
        raise ValueError("the message lacks its ConfigRecord 'config'")
    arrays = content.get("arrays")
    if not isinstance(arrays, ArrayRecord):
        raise ValueError("the message lacks the global model's ArrayRecord 'arrays'")
    cfg = read_experiment(config)
    partition_id = read_partition(node_config, cfg.split.num_clients)
    shard = load_shard(cfg, partition_id, node_config.get(DATA_PATH_KEY) or None,
                       str(node_config[DATA_SHA256_KEY]) if node_config.get(DATA_SHA256_KEY) else None)
    model = build_model(shard.num_classes, shard.channels, shard.image_size, cfg.model.width, cfg.model.depth, cfg.model.norm)
    try:
        load_record_into(model, arrays)
    except ValueError as err:
        raise ValueError(f"'arrays' does not fit this client's model (model.* config): {err}") from None
    return cfg, config, shard, model


def _round_seed(cfg: ExperimentConfig, config: ConfigRecord, partition_id: int) -> int:
    server_round = int(config.get("server-round", 0))
    return cfg.seed * 1_000_003 + server_round * 1009 + partition_id


def train_reply(content: RecordDict, node_config: Mapping[str, Any]) -> RecordDict:
    """Local training for one round; raises ValueError naming the key of a config it cannot honour."""
    cfg, config, shard, model = _unpack(content, node_config)
    settings = settings_from_config(config)
    device = pick_device(cfg.device)
    model.to(device)
    x = to_normalized_tensor(shard.train_images, shard.normalization, device)
    y = torch.as_tensor(shard.train_labels, device=device)
    result = train_local(model, x, y, settings, seed=_round_seed(cfg, config, shard.partition_id))
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "train_loss": float(result.loss),
            "train_accuracy": float(result.accuracy),
            "train_seconds": float(result.seconds),
        }
    )
    return RecordDict({"arrays": model_to_record(model), "metrics": metrics})


def evaluate_reply(content: RecordDict, node_config: Mapping[str, Any]) -> RecordDict:
    """Loss and accuracy of the global model on this client's held-out slice."""
    cfg, config, shard, model = _unpack(content, node_config)
    device = pick_device(cfg.device)
    model.to(device)
    x = to_normalized_tensor(shard.holdout_images, shard.normalization, device)
    y = torch.as_tensor(shard.holdout_labels, device=device)
    batch_size = int(config.get(EVAL_BATCH_KEY, cfg.federation.eval_batch_size))
    loss, accuracy = evaluate(model, x, y, batch_size) if len(y) else (0.0, 0.0)  # the server skips 0-example replies
    metrics = MetricRecord({"num-examples": len(y), "eval_loss": float(loss), "eval_accuracy": float(accuracy)})
    return RecordDict({"metrics": metrics})
