"""The received models of a grid: one cache of finished federations, found by what determines them.

A federation's run folder (written by simulations.commands.simulate) records its config; `edge_model_key` of that config names
the model. `received_model` takes a finished run of the same key from any of its homes, else trains one (continuing
an interrupted run of that key), so every cell of a private split shares one received model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from common.config import ConfigError, ExperimentConfig, config_to_dict


def edge_model_key(train_cfg: ExperimentConfig) -> str:
    """Everything that determines the received model: data, split, model, federation and the seed. A nested split
    (split.private_pipc) trains on the private pool of pipc=private_pipc, so it has that split's key."""
    c = config_to_dict(train_cfg)
    ident = {k: c[k] for k in ("data", "split", "model", "federation", "seed")}
    private_pipc = ident["split"].pop("private_pipc")
    if private_pipc is not None:
        ident["split"]["pipc"] = private_pipc
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def received_model(cfg: ExperimentConfig, homes: Sequence[Path], train_into: Path | None,
                   log: Callable[[str], None] = print) -> Path:
    """The run folder of a finished federation of `cfg` under any of `homes` (the latest), else one trained into
    `train_into`, continuing the latest interrupted run of the same key there; ConfigError when there is none to take
    and `train_into` is None."""
    from server.resume import load_run_config

    key = edge_model_key(cfg)
    runs = sorted(p.parent for home in homes for p in Path(home).glob("*/config.yaml"))
    matching = [r for r in runs if edge_model_key(load_run_config(r)) == key]
    finished = [r for r in matching if (r / "received_model.pt").is_file()]
    if finished:
        return finished[-1]
    if train_into is None:
        raise ConfigError(f"no finished federation of {cfg.name} under {', '.join(map(str, homes))}: "
                          "run the edge stage first")
    from simulations.commands.simulate import simulate  # Flower and Ray only when a model must be trained

    resume = next((r for r in reversed(matching) if r.parent == Path(train_into)), None)
    log(f"edge: training the federation of {cfg.name} (key {key})" + (f", resuming {resume}" if resume else ""))
    return simulate(cfg, output_dir=train_into, resume=resume).run_dir
