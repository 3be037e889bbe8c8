"""What the server does after the last federated round (the seam between federation and distillation)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from common.config import ConfigError, ExperimentConfig, build_config, config_to_dict
from common.progress import LineProgress
from common.runtime import pick_device
from server.server_data import ServerData, as_inputs

log = logging.getLogger("flwr.feddistill")


def distill_methods(cfg: ExperimentConfig) -> list[str]:
    """The baselines, then the configured method (each once)."""
    return list(dict.fromkeys([*cfg.distill.baselines, cfg.distill.method]))


def check_before_federation(cfg: ExperimentConfig) -> None:
    """ConfigError before any round when the distillation after the last one could not start (distill.dsa_strategy)."""
    if not cfg.distill.enabled:
        return
    from server.distill.dsa import parse_strategy

    try:
        parse_strategy(cfg.distill.dsa_strategy)
    except ValueError as err:
        raise ConfigError(f"distill.{err}") from None


def after_federation(
    cfg: ExperimentConfig, model: nn.Module, data: ServerData, run_dir: Path
) -> dict[str, dict[str, Any]] | None:
    """When cfg.distill.enabled, distils from the received model, the public subset and the test set.

    Runs distill.baselines and then distill.method, each into `<run_dir>/distill/<method>/`. The public
    subset is `data.public` (never in any client's shard). Images are passed normalised, (N, C, H, W) float32
    on the config's device, labels int64 (N,).
    Returns {method: run_distillation's summary}, or None when disabled.
    """
    if not cfg.distill.enabled:
        log.info("distill.enabled is false: no server-side distillation after federation")
        return None
    from server.distill.run import run_distillation  # lazy: the federation must not depend on distillation

    device = pick_device(cfg.device)
    inputs = as_inputs(data.public, data.test, data.normalization, data.num_classes, model.to(device), device)
    results = {}
    for method in distill_methods(cfg):
        method_cfg = build_config(config_to_dict(cfg), {"distill.method": method})
        out_dir = Path(run_dir) / "distill" / method.replace("+", "_")
        log.info("distilling (%s) from the received model and %d public images into %s", method, len(inputs.public_y),
                 out_dir)
        results[method] = run_distillation(method_cfg, inputs.model, inputs.public_x, inputs.public_y, inputs.eval_x,
                                           inputs.eval_y, out_dir, inputs.normalization, num_classes=inputs.num_classes,
                                           progress=LineProgress(log.info))
    return results
