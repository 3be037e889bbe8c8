"""Resuming a federated run folder: the last round whose checkpoint and metrics.jsonl line were both written.

RoundRecorder writes checkpoints/round_XXXX.pt first and metrics.jsonl second (both atomically), so a
crash leaves at worst a checkpoint without its line; that round is then run again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.atomic import load_torch
from common.config import ConfigError, ExperimentConfig, load_config

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"


def checkpoint_path(run_dir: Path, server_round: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"round_{server_round:04d}.pt"


@dataclass(frozen=True)
class ResumePoint:
    """Where a run continues: after `round`, from `state` (the global state_dict), with its earlier metrics lines."""

    round: int
    state: dict[str, torch.Tensor]
    lines: list[dict[str, Any]]


def load_run_config(run_dir: Path) -> ExperimentConfig:
    """The config a run folder was started with (RUN_DIR/config.yaml); ConfigError naming the file."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no {CONFIG_FILE} there (not a run folder of feddistill simulate)")
    return load_config(path.resolve())


def find_resume_point(run_dir: Path, rounds: int) -> ResumePoint:
    """The last complete round of `run_dir`; ValueError naming the file when it is unreadable or tampered with."""
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        raise ValueError(f"--resume {run_dir}: no {METRICS_FILE} (the run did not finish its round 0)")
    try:
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise ValueError(f"{metrics}: not valid JSON lines ({err})") from None
    if not all(isinstance(line, dict) and type(line.get("round")) is int and line["round"] >= 0 for line in lines):
        raise ValueError(f"{metrics}: every line must be a JSON object with an integer 'round' >= 0")
    done = [line["round"] for line in lines if checkpoint_path(run_dir, line["round"]).is_file()]
    if not done or done != list(range(len(done))):
        raise ValueError(f"--resume {run_dir}: rounds {done} have checkpoints and metrics lines; expected 0, 1, ...")
    last = done[-1]
    if last > rounds:
        raise ValueError(f"--resume {run_dir}: it reached round {last} but federation.rounds={rounds}")
    state = load_torch(checkpoint_path(run_dir, last))
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{checkpoint_path(run_dir, last)}: not a state_dict of tensors")
    return ResumePoint(last, state, lines[: last + 1])
