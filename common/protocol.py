"""The server-to-client contract: what a round's ConfigRecord holds, and how a client reads it.

The server is the one source of the experiment config. Every train/evaluate message carries
  - "experiment": the resolved ExperimentConfig as JSON (data, split, model, seed: what selects the
    client's shard and builds the model), and
  - the round's training settings as explicit keys (`round_settings`, written with common.training's
    SETTINGS_KEYS: "lr" already decayed for this round, "local-epochs", ...); these win over the JSON.
So `flwr run`, `run_simulation` (whose run_config is empty) and a deployment all configure clients
the same way, and a SuperNode needs no config file. Only data locations are the node's own
(node_config "data-path", else $FEDDISTILL_DATA, else data.path from the server's config).

Plain mappings in, plain dicts out: this module does not import Flower.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from common.config import ExperimentConfig, build_config, check_partition_id, config_to_dict
from common.training import TrainSettings, settings_to_config

EXPERIMENT_KEY = "experiment"
PARTITION_ID_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"
DATA_PATH_KEY = "data-path"  # optional node_config entry (deployment): where this node's dataset is
EVAL_BATCH_KEY = "eval-batch-size"  # the batch size of a client's evaluation
DATA_SHA256_KEY = "data-sha256"  # optional node_config entry: the sha256 manifest.json gives this node's archive


def round_lr(cfg: ExperimentConfig, server_round: int) -> float:
    """lr of round r (1-based) = federation.lr * federation.lr_decay ** (r - 1)."""
    return cfg.federation.lr * cfg.federation.lr_decay ** max(0, server_round - 1)


def round_settings(cfg: ExperimentConfig, server_round: int) -> TrainSettings:
    """The local training of `server_round`: the federation config's settings, lr decayed for the round."""
    fed = cfg.federation
    return TrainSettings(epochs=fed.local_epochs, batch_size=fed.batch_size, optimizer=fed.optimizer,
                         lr=round_lr(cfg, server_round), momentum=fed.momentum, weight_decay=fed.weight_decay)


def round_config(cfg: ExperimentConfig, server_round: int) -> dict[str, str | int | float]:
    """The values a client needs for `server_round` (put into the message's ConfigRecord)."""
    return {
        EXPERIMENT_KEY: json.dumps(config_to_dict(cfg), sort_keys=True),
        **settings_to_config(round_settings(cfg, server_round)),
        EVAL_BATCH_KEY: cfg.federation.eval_batch_size,
    }


def read_experiment(config: Mapping[str, Any]) -> ExperimentConfig:
    """The ExperimentConfig a server sent; ValueError naming the key when it is missing or invalid."""
    raw = config.get(EXPERIMENT_KEY)
    if not isinstance(raw, str):
        raise ValueError(f"the round's config lacks {EXPERIMENT_KEY!r} (the experiment config as JSON)")
    try:
        return build_config(json.loads(raw))
    except (json.JSONDecodeError, ValueError) as err:
        raise ValueError(f"{EXPERIMENT_KEY!r} in the round's config is not a valid experiment config: {err}") from None


def read_partition(node_config: Mapping[str, Any], num_clients: int) -> int:
    """This node's partition id, checked against the config's split.num_clients."""
    for key in (PARTITION_ID_KEY, NUM_PARTITIONS_KEY):
        if key not in node_config:
            raise ValueError(
                f"node_config lacks {key!r}: start each SuperNode with "
                f"--node-config \"partition-id=K num-partitions={num_clients}\""
            )
    try:
        partition_id, num_partitions = int(node_config[PARTITION_ID_KEY]), int(node_config[NUM_PARTITIONS_KEY])
    except (TypeError, ValueError):
        raise ValueError(
            f"node_config partition-id={node_config[PARTITION_ID_KEY]!r} / "
            f"num-partitions={node_config[NUM_PARTITIONS_KEY]!r}: must be integers"
        ) from None
    if num_partitions != num_clients:
        raise ValueError(
            f"node_config num-partitions={num_partitions} != split.num_clients={num_clients}: run one SuperNode per "
            f"edge client (flwr run --federation-config \"num-supernodes={num_clients}\", or set split.num_clients)"
        )
    check_partition_id(partition_id, num_clients, "node_config partition-id")
    return partition_id
