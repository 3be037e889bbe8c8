"""Distil, checkpoint, save and evaluate over several seeds; the entry point used by the CLI and the ServerApp."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.atomic import atomic_write
from common.config import ExperimentConfig, config_hash, config_to_dict
from common.data import Normalization
from common.methods import method
from common.progress import NoProgress, Progress, format_metrics
from common.runtime import git_commit, pick_device, resolve_precision
from server.distill.artifacts import (
    check_resumable,
    load_checkpoint,
    save_checkpoint,
    save_grid,
    save_result,
    save_synthetic,
)
from server.distill.evaluate import NetProtocol, evaluate_synthetic, mean_std
from server.distill.methods import DistillState, SyntheticSet, distill

SHOWN = ("loss", "dm", "dkkt", "share_dkkt", "dkkt_weight", "stat_rel", "primal", "lambda_mean", "lambda_zeros")
HISTORY = "history.jsonl"  # one line per logged iteration: every loss term, gradient norms and shares, lambda, seconds


def _finished_seed(seed_dir: Path, method_name: str, seed: int) -> dict[str, Any] | None:
    """The result.json of a seed an earlier call completed (with its synthetic set), else None."""
    path = seed_dir / "result.json"
    if not (path.is_file() and (seed_dir / "synthetic.pt").is_file()):
        return None
    result = json.loads(path.read_text())
    return result if (result.get("method"), result.get("seed")) == (method_name, seed) else None


def read_history(seed_dir: Path, up_to: int) -> list[dict[str, float]]:
    """The logged iterations <= `up_to` of an earlier, interrupted run of this seed (empty when there is none)."""
    path = seed_dir / HISTORY
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if line["iteration"] <= up_to]


def eval_seeds(seed: int, num_nets: int) -> list[int]:
    """Seeds of the evaluation nets of distillation seed `seed`: the same for every method, so runs pair up."""
    return [1000 * seed + i for i in range(num_nets)]


def run_distillation(
    cfg: ExperimentConfig,
    model: nn.Module | None,
    public_x: torch.Tensor,
    public_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    out_dir: Path,
    normalization: Normalization,
    num_classes: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """For seeds cfg.seed + k (k < cfg.distill.num_seeds): distil, checkpoint every checkpoint_every
    iterations, save out_dir/seed_<k>/{synthetic.pt,.json,.png,history.jsonl,result.json}, evaluate with
    cfg.evaluation.num_nets nets; writes and returns out_dir/result.json (mean +- std over seeds x nets).
    `normalization` is the dataset's, that the images were normalised with (recorded, and undone for the grid).
    num_classes defaults to max test label + 1; `progress` receives the iterations and evaluations (silent if None).

    Resumes what an interrupted call with the same arguments left: a seed with its result.json is kept, a seed
    with a checkpoint continues from it (same final images as an uninterrupted run on the CPU). A folder that holds
    a run of another configuration is refused (ValueError naming the keys that differ, artifacts.check_resumable)."""
    out_dir = Path(out_dir)
    check_resumable(out_dir, config_to_dict(cfg))
    device = pick_device(cfg.device)
    num_classes = int(test_y.max()) + 1 if num_classes is None else num_classes
    progress = progress or NoProgress()
    public_x, public_y = public_x.to(device), public_y.to(device)
    test_x, test_y = test_x.to(device), test_y.to(device)
    per_seed = []
    for k in range(cfg.distill.num_seeds):
        seed_dir = out_dir / f"seed_{k}"
        finished = _finished_seed(seed_dir, cfg.distill.method, cfg.seed + k)
        if finished is None:
            syn, distill_s = _distil_seed(cfg, model, public_x, public_y, cfg.seed + k, seed_dir, normalization,
                                          num_classes, device, progress)
            finished = _evaluate_seed(cfg, syn, test_x, test_y, seed_dir, num_classes, device, distill_s, progress)
        per_seed.append(finished)
    return _summarise(cfg, per_seed, out_dir, device)


def _distil_seed(
    cfg: ExperimentConfig, model: nn.Module | None, public_x: torch.Tensor, public_y: torch.Tensor, seed: int,
    seed_dir: Path, normalization: Normalization, num_classes: int, device: torch.device, progress: Progress,
) -> tuple[SyntheticSet, float]:
    """Distils one seed (continuing from its checkpoint), saves the set, its grid and history; returns it and seconds."""
    dcfg = cfg.distill
    full_config = config_to_dict(cfg)
    optimises = method(dcfg.method).optimises
    resume = load_checkpoint(seed_dir, dcfg.method, seed) if optimises else None
    task = f"{dcfg.method} seed {seed}"
    progress.start(task, max(dcfg.iterations, 1), resume.iteration if resume else 0)
    history = read_history(seed_dir, resume.iteration if resume else 0)
    offset = (history[-1]["seconds"] if history else 0.0) - time.perf_counter()

    def on_iteration(it: int, metrics: dict[str, float], current: SyntheticSet) -> None:
        progress.advance(task, it, metrics)
        history.append({"iteration": it, **metrics, "seconds": round(offset + time.perf_counter(), 3)})
        text = "".join(json.dumps(line) + "\n" for line in history)
        atomic_write(seed_dir / HISTORY, lambda tmp: tmp.write_text(text))

    def on_checkpoint(state: DistillState) -> None:
        labels = torch.arange(num_classes).repeat_interleave(dcfg.ipc)
        save_checkpoint(state, labels, seed_dir, {"method": dcfg.method, "seed": seed, "ipc": dcfg.ipc, "config": full_config})

    start = time.perf_counter()
    syn = distill(model, public_x, public_y, dcfg, cfg.model, num_classes, seed, device, on_iteration,
                  checkpoint=on_checkpoint, resume=resume)
    distill_s = time.perf_counter() - start
    progress.finish(task, format_metrics(history[-1], SHOWN) if history else "")
    syn.config = full_config
    save_synthetic(syn, seed_dir, normalization, iteration=dcfg.iterations if optimises else 0)
    save_grid(syn.images, syn.labels, seed_dir / "synthetic.png", normalization, num_classes)
    return syn, distill_s


def _evaluate_seed(
    cfg: ExperimentConfig, syn: SyntheticSet, test_x: torch.Tensor, test_y: torch.Tensor, seed_dir: Path,
    num_classes: int, device: torch.device, distill_s: float, progress: Progress,
) -> dict[str, Any]:
    """Trains cfg.evaluation.num_nets fresh nets on the set, tests them; writes and returns seed_dir/result.json."""
    task = f"evaluate {syn.method} seed {syn.seed}"
    progress.start(task, cfg.evaluation.num_nets)
    start = time.perf_counter()
    # All nets of this seed in one call: batched on CUDA (evaluate.py), one after another on the CPU.
    accuracies = evaluate_synthetic(
        syn.images, syn.labels, test_x, test_y,
        NetProtocol(cfg.evaluation, cfg.model, num_classes, device, cfg.distill.dsa_strategy),
        eval_seeds(syn.seed, cfg.evaluation.num_nets),
        on_done=lambda done: progress.advance(task, len(done), {"accuracy": 100 * done[-1]}),
    )
    mean, std = mean_std(accuracies)
    progress.finish(task, f"accuracy {100 * mean:.2f} ± {100 * std:.2f} %")
    result = {
        "method": cfg.distill.method,
        "ipc": cfg.distill.ipc,
        "seed": syn.seed,
        "accuracies": accuracies,
        "mean": mean,
        "std": std,
        "timings": {"distill_s": distill_s, "evaluate_s": time.perf_counter() - start},
        "distill_precision": resolve_precision(device, cfg.distill.precision),  # what `auto` ran as, on this machine
    }
    save_result(seed_dir / "result.json", result)
    return result


def _summarise(cfg: ExperimentConfig, per_seed: list[dict[str, Any]], out_dir: Path, device: torch.device) -> dict[str, Any]:
    """out_dir/result.json: every evaluation of every seed pooled."""
    all_acc = [a for r in per_seed for a in r["accuracies"]]
    unrecorded = "unrecorded" if cfg.distill.precision == "auto" else cfg.distill.precision
    mean, std = mean_std(all_acc)
    result = {
        "method": cfg.distill.method,
        "ipc": cfg.distill.ipc,
        "seeds": [r["seed"] for r in per_seed],
        "num_nets": cfg.evaluation.num_nets,
        "accuracies": all_acc,
        "mean": mean,
        "std": std,
        "per_seed": per_seed,
        "timings": {
            "distill_s": sum(r["timings"]["distill_s"] for r in per_seed),
            "evaluate_s": sum(r["timings"]["evaluate_s"] for r in per_seed),
        },
        "device": str(device),
        # the seeds' precisions as distilled; a seed finished before seeds recorded it ran its config's (never `auto`)
        "distill_precision": "+".join(sorted({r.get("distill_precision", unrecorded) for r in per_seed})),
        "commit": git_commit(),
        "config": config_to_dict(cfg),
        "config_sha256": config_hash(config_to_dict(cfg)),
    }
    save_result(out_dir / "result.json", result)
    return result
