"""Distil, checkpoint, save and evaluate over several seeds; the entry point used by the CLI and the ServerApp."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from common.atomic import atomic_write
from common.config import ExperimentConfig, config_to_dict
from common.methods import method
from common.runtime import pick_device
from server.distill.artifacts import load_checkpoint, save_checkpoint, save_grid, save_result, save_synthetic
from server.distill.evaluate import evaluate_synthetic, mean_std
from server.distill.methods import DistillState, SyntheticSet, distill

_SHOWN = ("loss", "dm", "dkkt", "share_dkkt", "dkkt_weight", "stat_rel", "primal", "lambda_mean", "lambda_zeros")
HISTORY = "history.jsonl"  # one line per logged iteration: every loss term, gradient norms and shares, lambda, seconds


def _format(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={metrics[k]:.4g}" for k in _SHOWN if k in metrics)


def _finished_seed(seed_dir: Path, method: str, seed: int) -> dict[str, Any] | None:
    """The result.json of a seed an earlier call completed (with its synthetic set), else None."""
    path = seed_dir / "result.json"
    if not (path.is_file() and (seed_dir / "synthetic.pt").is_file()):
        return None
    result = json.loads(path.read_text())
    return result if (result.get("method"), result.get("seed")) == (method, seed) else None


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
    show_progress: bool = True,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """For seeds cfg.seed + k (k < cfg.distill.num_seeds): distil, checkpoint every checkpoint_every
    iterations, save out_dir/seed_<k>/{synthetic.pt,.json,.png,result.json}, evaluate with
    cfg.evaluation.num_nets nets; writes and returns out_dir/result.json (mean +- std over seeds x nets).
    num_classes defaults to max test label + 1.

    Resumes what an interrupted call with the same arguments left: a seed with its result.json is kept, a seed
    with a checkpoint continues from it (same final images as an uninterrupted run on the CPU)."""
    out_dir = Path(out_dir)
    device = pick_device(cfg.device)
    num_classes = int(test_y.max()) + 1 if num_classes is None else num_classes
    full_config = config_to_dict(cfg)
    dcfg = cfg.distill
    public_x, public_y = public_x.to(device), public_y.to(device)
    test_x, test_y = test_x.to(device), test_y.to(device)
    per_seed: list[dict[str, Any]] = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"),
    )
    with Progress(*columns, disable=not show_progress) as progress:
        for k in range(dcfg.num_seeds):
            seed = cfg.seed + k
            seed_dir = out_dir / f"seed_{k}"
            finished = _finished_seed(seed_dir, dcfg.method, seed)
            if finished is not None:
                per_seed.append(finished)
                continue
            resume = load_checkpoint(seed_dir, dcfg.method, seed) if method(dcfg.method).optimises else None
            task = progress.add_task(f"{dcfg.method} seed {seed}", total=max(dcfg.iterations, 1), stats="",
                                     completed=resume.iteration if resume else 0)

            history = read_history(seed_dir, resume.iteration if resume else 0)
            elapsed = history[-1]["seconds"] if history else 0.0
            start = time.perf_counter()

            def on_iteration(it: int, metrics: dict[str, float], current: SyntheticSet, task: int = task,
                             history: list = history, seed_dir: Path = seed_dir, begun: float = elapsed - start) -> None:
                progress.update(task, completed=it, stats=_format(metrics))
                history.append({"iteration": it, **metrics, "seconds": round(begun + time.perf_counter(), 3)})
                text = "".join(json.dumps(line) + "\n" for line in history)
                atomic_write(seed_dir / HISTORY, lambda tmp: tmp.write_text(text))

            def on_checkpoint(state: DistillState, seed_dir: Path = seed_dir, seed: int = seed) -> None:
                labels = torch.arange(num_classes).repeat_interleave(dcfg.ipc)
                meta = {"method": dcfg.method, "seed": seed, "ipc": dcfg.ipc, "config": full_config}
                save_checkpoint(state, labels, seed_dir, meta)

            syn = distill(model, public_x, public_y, dcfg, cfg.model, num_classes, seed, device, on_iteration,
                          checkpoint=on_checkpoint, resume=resume)
            distill_s = time.perf_counter() - start
            progress.update(task, completed=max(dcfg.iterations, 1))
            syn.config = full_config
            save_synthetic(syn, seed_dir, iteration=dcfg.iterations if method(dcfg.method).optimises else 0)
            save_grid(syn.images, syn.labels, seed_dir / "synthetic.png", num_classes)

            eval_task = progress.add_task(f"evaluate seed {seed}", total=cfg.evaluation.num_nets, stats="")
            start = time.perf_counter()
            # All nets of this seed in one call: batched on CUDA (evaluate.py), one after another on the CPU.
            accuracies = evaluate_synthetic(
                syn.images, syn.labels, test_x, test_y, cfg.evaluation, cfg.model,
                eval_seeds(seed, cfg.evaluation.num_nets), device, num_classes, dcfg.dsa_strategy,
            )
            progress.update(eval_task, completed=len(accuracies), stats=f"acc={sum(accuracies) / len(accuracies):.4f}")
            evaluate_s = time.perf_counter() - start
            mean, std = mean_std(accuracies)
            seed_result = {
                "method": dcfg.method,
                "ipc": dcfg.ipc,
                "seed": seed,
                "accuracies": accuracies,
                "mean": mean,
                "std": std,
                "timings": {"distill_s": distill_s, "evaluate_s": evaluate_s},
            }
            save_result(seed_dir / "result.json", seed_result)
            per_seed.append(seed_result)

    all_acc = [a for r in per_seed for a in r["accuracies"]]
    mean, std = mean_std(all_acc)
    result = {
        "method": dcfg.method,
        "ipc": dcfg.ipc,
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
        "config": full_config,
    }
    save_result(out_dir / "result.json", result)
    return result
