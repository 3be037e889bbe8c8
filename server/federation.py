"""The server side of one federated run: federated rounds, central test evaluation, per-round records, the received model.

Run folder layout (`<output_dir>/<name>-<YYYYmmdd-HHMMSS>/`):
  config.yaml            the resolved experiment config
  metrics.jsonl          one line per round (round 0 = the initial model), see `round_line`
  checkpoints/round_XXXX.pt  the global state_dict after each round (atomic writes; `--resume` continues from the last)
  received_model.pt      the final global state_dict (torch.load(weights_only=True)); what distillation consumes
  summary.json           final test accuracy, best round, time, bytes up/down (in total and per client), and
                         (epsilon, delta) when DP is on
  label_distribution.json, label_distribution.png   images per class of every client (common/label_distribution.py)
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid
from torch import nn

from common.atomic import atomic_write, check_folder, save_json, save_torch
from common.config import ConfigError, ExperimentConfig, config_to_dict
from common.data import to_normalized_tensor
from common.label_distribution import label_distribution, write_label_distribution
from common.models import model_from_config
from common.protocol import round_lr
from common.records import load_record_into, model_to_record
from common.runtime import pick_device, seed_everything
from common.training import evaluate
from server.hooks import after_federation, check_before_federation
from server.privacy import privacy_report
from server.resume import CONFIG_FILE, METRICS_FILE, ResumePoint, checkpoint_path
from server.server_data import ServerData, from_dataset
from server.strategy import EdgeFedAvg, ReplyObserver
from server.summary import write_summary
from server.traffic import traffic_totals

log = logging.getLogger("flwr.feddistill")

OUTPUT_ENV = "FEDDISTILL_OUTPUT"  # where run folders go when the run config gives no absolute output-dir
RECEIVED_MODEL = "received_model.pt"

RoundCallback = Callable[[dict[str, Any]], None]


def resolve_run_dir(cfg: ExperimentConfig, output_dir: str | Path | None = None, run_dir: str | Path | None = None) -> Path:
    """An absolute, new run folder (not created yet; ConfigError naming the key when it cannot be one).

    `run_dir` (absolute) is used as given. Otherwise `<root>/<name>-<YYYYmmdd-HHMMSS>[-k]` with root = `output_dir`,
    else $FEDDISTILL_OUTPUT, else cfg.output_dir; a relative root is resolved against the current directory
    (which, under `flwr run`, is the SuperLink's: pass an absolute output-dir there).
    """
    if run_dir:
        path = Path(run_dir).expanduser()
        if not path.is_absolute():
            raise ConfigError(f"run-dir={str(run_dir)!r}: must be an absolute path (the app runs from another directory)")
        return check_folder(path, "run-dir")
    key = "--output-dir" if output_dir else f"${OUTPUT_ENV}" if os.environ.get(OUTPUT_ENV) else "output_dir"
    root = Path(output_dir or os.environ.get(OUTPUT_ENV) or cfg.output_dir).expanduser()
    root = check_folder(root if root.is_absolute() else (Path.cwd() / root), key)
    stem = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, k = root / stem, 1
    while path.exists():
        k += 1
        path = root / f"{stem}-{k}"
    return path.resolve()


def save_config(cfg: ExperimentConfig, run_dir: Path) -> Path:
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    return atomic_write(run_dir / CONFIG_FILE, lambda p: p.write_text(text))


@dataclass
class FederationOutcome:
    run_dir: Path
    model: nn.Module  # the received (final global) model, on CPU
    rounds: list[dict[str, Any]]  # the lines of metrics.jsonl
    distill: dict[str, Any] | None


class RoundRecorder:
    """Writes metrics.jsonl and the round's checkpoint when a round ends (called from the strategy's evaluate_fn)."""

    def __init__(
        self,
        run_dir: Path,
        cfg: ExperimentConfig,
        strategy: EdgeFedAvg,
        on_round: RoundCallback | None,
        earlier: list[dict[str, Any]] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.strategy = strategy
        self.on_round = on_round
        self.lines: list[dict[str, Any]] = list(earlier or [])  # a resumed run appends to its earlier rounds
        self.last = time.perf_counter()
        self.start = self.last - (self.lines[-1].get("elapsed", 0.0) if self.lines else 0.0)

    def end_round(self, server_round: int, state: dict[str, torch.Tensor], test: dict[str, float]) -> dict[str, Any]:
        now = time.perf_counter()
        line = round_line(self.cfg, server_round, test, self.strategy, seconds=now - self.last, elapsed=now - self.start)
        self.last = now
        self.lines.append(line)
        save_torch(checkpoint_path(self.run_dir, server_round), state)
        text = "".join(json.dumps(x, sort_keys=False) + "\n" for x in self.lines)
        atomic_write(self.run_dir / METRICS_FILE, lambda p: p.write_text(text))
        if self.on_round is not None:
            self.on_round(line)
        return line


def round_line(
    cfg: ExperimentConfig, server_round: int, test: dict[str, float], strategy: EdgeFedAvg, seconds: float, elapsed: float
) -> dict[str, Any]:
    """One metrics.jsonl record: test metrics, aggregated client metrics and reply counts of the round."""
    train = strategy.train_replies.get(server_round)
    held = strategy.evaluate_replies.get(server_round)
    line: dict[str, Any] = {
        "round": server_round,
        "test_accuracy": test["test_accuracy"],
        "test_loss": test["test_loss"],
        "lr": round_lr(cfg, server_round) if server_round > 0 else None,
        "clients_online": strategy.clients_online.get(server_round),
        "sampled": strategy.clients_sampled.get(server_round, 0),
        "replies": train.kept if train else 0,
        "rejected": len(train.rejected) if train else 0,
        "failed": len(train.failed) if train else 0,
        "clipped": train.clipped if train else 0,
    }
    for key in ("train_loss", "train_accuracy", "train_seconds"):
        line[key] = train.metrics.get(key) if train else None
    for key in ("eval_loss", "eval_accuracy"):
        line[f"client_{key}"] = held.metrics.get(key) if held else None
    line.update(strategy.traffic.round_record(server_round))
    line["seconds"] = round(seconds, 3)
    line["elapsed"] = round(elapsed, 3)
    return line


def run_federation(
    grid: Grid,
    cfg: ExperimentConfig,
    run_dir: Path,
    on_round: RoundCallback | None = None,
    observer: ReplyObserver | None = None,
    resume: ResumePoint | None = None,
    data: ServerData | None = None,
) -> FederationOutcome:
    """Runs cfg.federation.rounds rounds over the grid's nodes and writes the run folder.

    `data`: what the server holds (default: cut from the full dataset, `server_data.from_dataset`). With `resume`,
    the global model starts from its checkpoint and only the rounds after it run; metrics.jsonl keeps the earlier
    lines.
    """
    check_before_federation(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = data or from_dataset(cfg)
    public_counts = np.bincount(data.public.labels, minlength=data.num_classes)
    write_label_distribution(run_dir, label_distribution(cfg, data.classes, data.client_counts, public_counts))
    model = model_from_config(cfg.model, data.num_classes, data.channels, data.image_size)
    first_round = resume.round if resume is not None else 0
    if resume is not None:
        load_record_into(model, ArrayRecord(resume.state))
    strategy = EdgeFedAvg(cfg, model, observer, slice_sizes=data.slice_sizes, first_round=first_round)
    recorder = RoundRecorder(run_dir, cfg, strategy, on_round, resume.lines if resume is not None else None)
    log.info("run folder %s; rounds %d..%d over %d edge clients", run_dir, first_round + 1, cfg.federation.rounds,
             cfg.split.num_clients)
    result = strategy.start(
        grid=grid,
        initial_arrays=model_to_record(model),
        num_rounds=cfg.federation.rounds - first_round,
        evaluate_fn=central_evaluation(cfg, data, device, recorder, first_round, resumed=resume is not None),
        timeout=cfg.federation.round_timeout,
    )
    load_record_into(model, result.arrays)
    model.cpu()
    save_torch(run_dir / RECEIVED_MODEL, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    privacy = privacy_report(cfg)
    save_summary_json(run_dir, cfg, recorder, privacy)
    distill = after_federation(cfg, model, data, run_dir)
    write_summary(run_dir, cfg, recorder.lines, distill, privacy)
    return FederationOutcome(run_dir, model, recorder.lines, distill)


def central_evaluation(
    cfg: ExperimentConfig, data: ServerData, device: torch.device, recorder: RoundRecorder, first_round: int, resumed: bool
) -> Callable[[int, ArrayRecord], MetricRecord | None]:
    """The strategy's evaluate_fn: the global model on the server's test set after every round, recorded."""
    test_x = to_normalized_tensor(data.test.images, data.normalization, device)
    test_y = torch.as_tensor(data.test.labels, device=device)
    evaluator = model_from_config(cfg.model, data.num_classes, data.channels, data.image_size).to(device)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 and resumed:
            return None  # the resumed-from round is already recorded
        server_round += first_round
        load_record_into(evaluator, arrays)
        loss, accuracy = evaluate(evaluator, test_x, test_y, cfg.federation.eval_batch_size)
        recorder.end_round(server_round, {k: v.detach().cpu() for k, v in evaluator.state_dict().items()},
                           {"test_loss": loss, "test_accuracy": accuracy})
        return MetricRecord({"test_loss": _finite_or(loss), "test_accuracy": _finite_or(accuracy)})

    return evaluate_fn


def save_summary_json(run_dir: Path, cfg: ExperimentConfig, recorder: RoundRecorder, privacy: dict[str, Any] | None) -> None:
    """summary.json: final and best test accuracy, time, the received model's path, (epsilon, delta) with DP."""
    lines = recorder.lines
    best = max(lines, key=lambda x: x["test_accuracy"])
    save_json(
        run_dir / "summary.json",
        {
            "name": cfg.name,
            "rounds": cfg.federation.rounds,
            "num_clients": cfg.split.num_clients,
            "final_test_accuracy": lines[-1]["test_accuracy"],
            "final_test_loss": lines[-1]["test_loss"],
            "best_test_accuracy": best["test_accuracy"],
            "best_round": best["round"],
            "seconds": round(time.perf_counter() - recorder.start, 3),
            "received_model": str(run_dir / RECEIVED_MODEL),
            "traffic": traffic_totals(lines),
            "privacy": privacy,
        },
    )
    log.info("received model saved to %s (final test accuracy %.4f)", run_dir / RECEIVED_MODEL, lines[-1]["test_accuracy"])


def _finite_or(value: float, default: float = 0.0) -> float:
    return value if math.isfinite(value) else default
