"""A cell's synthetic set evaluated on other architectures than the one it was distilled for (cross_arch.json)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.atomic import save_json
from common.config import ExperimentConfig
from common.models import parse_architecture
from server.server_data import DistillInputs

CROSS_ARCH = "cross_arch.json"


def cross_arch(cfg: ExperimentConfig, out_dir: Path, archs: Sequence[str], inputs: DistillInputs) -> dict[str, Any]:
    """The cell's synthetic set (seed_0) trained on each architecture with the cell's protocol and evaluation seeds,
    tested on the cell's evaluation split; out_dir/cross_arch.json (archs already there are kept)."""
    from common.runtime import pick_device
    from server.distill.artifacts import load_synthetic
    from server.distill.evaluate import NetProtocol, evaluate_synthetic, mean_std
    from server.distill.run import eval_seeds

    path = out_dir / CROSS_ARCH
    done = json.loads(path.read_text()) if path.is_file() else {}
    syn = load_synthetic(out_dir / "seed_0")
    for spec in archs:
        if spec in done:
            continue
        protocol = NetProtocol(cfg.evaluation, parse_architecture(spec, cfg.model), inputs.num_classes,
                               pick_device(cfg.device), cfg.distill.dsa_strategy)
        accuracies = evaluate_synthetic(syn.images, syn.labels, inputs.eval_x, inputs.eval_y, protocol,
                                        eval_seeds(cfg.seed, cfg.evaluation.num_nets))
        mean, std = mean_std(accuracies)
        done[spec] = {"accuracies": accuracies, "mean": mean, "std": std}
        save_json(path, done)
    return done
