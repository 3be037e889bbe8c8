"""The evidence protocol's stages over a protocol grid (simulations/grid/protocol.py), each resumable.

  edge       the received model: a real federation of the config (Flower simulation), reused when a finished run of
             the same data/split/model/federation/seed lies under OUT/edge/ (or the reused folder's), continued when
             one was interrupted
  calibrate  dkkt_ratio grid x calibration ipcs, one seed, evaluated on the validation slice (never the test set);
             the best mean validation accuracy over those ipcs fixes dkkt_ratio for the table
  balance    DM and DKKT gradient norms, the auto weight and lambda at each ipc with that ratio
             (simulations/benchmarks/dkkt_balance.py)
  curve      DM's validation accuracy against its iterations; the converged count is `dm@conv`'s
  table      every variant x ipc x pipc x seed with that ratio, evaluated once on the test set
  report     OUT/table.md (protocol, commit, seconds per row), results.csv, plots, Figures 2 and 3

The cells of calibrate and table run through one pool (simulations/grid/pool.py): in this process, on local
processes, or on Ray; this process chooses the ratio, measures the balance and DM's curve, and reports.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from common.atomic import atomic_write, save_json
from common.config import ConfigError, ExperimentConfig, config_to_dict, same_configuration
from common.holdings import decide_holdings
from common.runtime import describe_machine, git_commit, pick_device
from server.server_data import distill_inputs, experiment_data
from simulations.grid.cells import CellTask, GridCell, check_cells, is_finished, run_cells, write_results
from simulations.grid.edge import edge_model_key, received_model
from simulations.grid.pool import open_pool
from simulations.grid.protocol import (
    VARIANTS,
    Protocol,
    TableFilter,
    base_config,
    calibration_cells,
    cell_config,
    model_independent_keys,
    table_cells,
)


class CellsUnfinished(Exception):
    """Cells left unfinished: --max-minutes is spent (stop before the next cell) or a worker was lost; everything
    finished so far is on disk."""


@dataclass(frozen=True)
class Context:
    protocol: Protocol
    out: Path
    deadline: float = float("inf")
    workers: int = 1
    threads: int | None = None
    address: str | None = None

    def log(self, text: str) -> None:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}", flush=True)

    def check_time(self) -> None:
        if time.time() > self.deadline:
            raise CellsUnfinished

    @property
    def reuse(self) -> Path | None:
        return Path(self.protocol.reuse) if self.protocol.reuse else None


# ---------------------------------------------------------------- edge


def edge_stage(ctx: Context, cfg: ExperimentConfig, train: bool) -> Path:
    """OUT/edge_model.json and the received model's path: a finished federation of cfg, else (`train`) train or
    continue one."""
    homes = [ctx.out / "edge"] + ([ctx.reuse / "edge"] if ctx.reuse else [])
    try:
        run = received_model(cfg, homes, None, ctx.log)
    except ConfigError:
        if not train:
            raise
        ctx.check_time()
        run = received_model(cfg, homes, ctx.out / "edge", ctx.log)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    info = {"run": os.path.relpath(run, ctx.out), "config_key": edge_model_key(cfg), "rounds": lines[-1]["round"],
            "test_accuracy": lines[-1]["test_accuracy"], "seconds": lines[-1]["elapsed"],
            "num_clients": cfg.split.num_clients, "pipc": cfg.split.pipc}
    save_json(ctx.out / "edge_model.json", info)
    ctx.log(f"edge: received model {run / 'received_model.pt'}: test accuracy {info['test_accuracy']:.4f} after "
            f"{info['rounds']} rounds ({info['seconds'] / 60:.0f} min)")
    return run / "received_model.pt"


# ---------------------------------------------------------------- cells


REUSED_FILES = ("result.json", "seed_0/result.json", "seed_0/history.jsonl", "seed_0/synthetic.json")


def reuse_cell(ctx: Context, stage: str, cell: GridCell, cell_dir: Path) -> bool:
    """Takes a finished cell of the same name and configuration from the reused protocol's folder: its results and
    history (the synthetic set stays there; cell.json says where). False when there is none."""
    if ctx.reuse is None:
        return False
    source = ctx.reuse / stage / "cells" / cell.name
    if not (source / "result.json").is_file():
        return False
    old = json.loads((source / "result.json").read_text())
    if not same_configuration(old["config"], config_to_dict(cell.cfg), model_independent_keys(cell.cfg)):
        return False
    for relative in ("cell.json", *REUSED_FILES[1:]):
        if (source / relative).is_file():
            (cell_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / relative, cell_dir / relative)
    info = json.loads((cell_dir / "cell.json").read_text())
    save_json(cell_dir / "cell.json", {**info, "reused_from": os.path.relpath(source, cell_dir)})
    atomic_write(cell_dir / "result.json", lambda tmp: shutil.copyfile(source / "result.json", tmp))  # last: finished
    return True


def run_stage(ctx: Context, stage: str, cells: Sequence[GridCell], model: Path, evaluate_on: str) -> pd.DataFrame:
    """Runs the unfinished cells of a stage through the pool (taking reusable ones first); OUT/<stage>/results.csv.
    CellsUnfinished when the deadline left some unstarted or a worker was lost."""
    stage_dir = ctx.out / stage
    check_cells(stage_dir, cells)
    tasks = []
    for cell in cells:
        cell_dir = stage_dir / "cells" / cell.name
        if is_finished(stage_dir, cell):
            continue
        if reuse_cell(ctx, stage, cell, cell_dir):
            ctx.log(f"{stage} {cell.name}: reused from {ctx.protocol.reuse}")
            continue
        tasks.append(CellTask(cell, cell_dir, model, evaluate_on, ctx.deadline, ctx.threads))
    complete = True
    if tasks:
        with open_pool(min(ctx.workers, len(tasks)), ctx.address, ctx.protocol.resources) as pool:
            complete = run_cells(stage_dir, tasks, pool, lambda line: ctx.log(f"{stage} {line}"), write_results)
    results = write_results(stage_dir)
    if not complete:
        raise CellsUnfinished
    return results


def calibrate_stage(ctx: Context, extra: dict[str, Any], model: Path) -> float:
    """The dkkt_ratio with the best mean validation accuracy over the calibration ipcs (seed 0); OUT/calibration.json."""
    cells = calibration_cells(ctx.protocol, extra)
    if not cells[0].cfg.split.validation_per_class:
        raise ConfigError("calibration needs split.validation_per_class >= 1: it never evaluates on the test set")
    results = run_stage(ctx, "calibration", cells, model, "validation")
    tuned = results[results["method"] == "dm+dkkt"]
    means = tuned.groupby("ratio")["accuracy_mean"].mean()
    best = float(means.idxmax())
    validation = len(decide_holdings(cells[0].cfg, experiment_data(cells[0].cfg).train.labels).validation)
    save_json(ctx.out / "calibration.json", {
        "chosen_dkkt_ratio": best, "evaluated_on": f"validation slice ({validation} training images nobody holds)",
        "mean_validation_accuracy_by_ratio": {f"{r:g}": float(m) for r, m in means.items()},
        "dm_validation_accuracy_by_ipc": {int(r["ipc"]): float(r["accuracy_mean"])
                                          for _, r in results[results["method"] == "dm"].iterrows()},
    })
    ctx.log(f"calibrate: dkkt_ratio={best:g} (mean validation accuracy by ratio: "
            + ", ".join(f"{r:g}: {100 * m:.2f} %" for r, m in means.items()) + ")")
    return best


def balance_stage(ctx: Context, extra: dict[str, Any], ratio: float | None, model: Path) -> None:
    """OUT/balance.json and balance.md: gradient norms and shares of DM and DKKT at each table ipc (dm+dkkt, seed 0)."""
    from simulations.benchmarks.dkkt_balance import markdown, measure

    protocol = ctx.protocol
    rows = []
    for ipc in protocol.balance_ipcs:
        ctx.check_time()
        cfg = cell_config(protocol, extra, VARIANTS["dm+dkkt"], ipc, protocol.seeds[0],
                          {"distill.dkkt_ratio": ratio} if ratio is not None else {})
        inputs = distill_inputs(cfg, model_path=model)
        rows.append(measure(cfg, inputs.model, inputs.public_x, inputs.public_y, inputs.num_classes, ipc,
                            protocol.balance_iterations, protocol.balance_iterations // 3, protocol.seeds[0]))
        ctx.log(f"balance ipc {ipc}: DKKT/DM gradient {rows[-1]['ratio_weighted']:.3g}, weight {rows[-1]['dkkt_weight']:.3g}")
    table = markdown(rows, cfg.distill.dkkt_ratio)
    save_json(ctx.out / "balance.json", {"dkkt_ratio": cfg.distill.dkkt_ratio, "results": rows, "table": table})
    atomic_write(ctx.out / "balance.md", lambda tmp: tmp.write_text(table + "\n"))


# ---------------------------------------------------------------- DM's validation curve


CONVERGED_GAIN = 0.005  # DM has converged where doubling its iterations gains less than this (0.5 points)


def curve_stage(ctx: Context, extra: dict[str, Any]) -> dict[int, int]:
    """DM's validation accuracy against its iteration count (seed 0) at each curve pipc and ipc: one run per curve,
    its set evaluated on the validation slice at each point (OUT/curve/<pipc>-<ipc>/); OUT/curve.json with each ipc's
    converged count (the first point after which the next gains < 0.5 points, the largest over the curve pipcs).
    Returns {ipc: iterations}."""
    protocol = ctx.protocol
    seed = protocol.seeds[0]
    points: list[dict[str, Any]] = []
    for pipc in protocol.curve_pipcs:
        for ipc, iterations in protocol.curve.items():
            if ipc > pipc:
                continue
            cfg = cell_config(protocol, extra, VARIANTS["dm"], ipc, seed,
                              {"split.pipc": pipc, "distill.iterations": max(iterations)})
            points += dm_curve(ctx, cfg, iterations, ctx.out / "curve" / f"pipc{pipc}-ipc{ipc}")
    frame = pd.DataFrame(points)
    chosen = {}
    for ipc, group in frame.groupby("ipc"):
        per_pipc = [converged_at(g.sort_values("iterations")) for _, g in group.groupby("pipc")]
        chosen[int(ipc)] = max(per_pipc)
    save_json(ctx.out / "curve.json", {
        "rule": f"the first iteration count after which doubling gains < {100 * CONVERGED_GAIN:g} points of validation "
                "accuracy (dm, seed 0, the evaluation protocol of the table), the largest over the curve pipcs",
        "evaluated_on": "the validation slice (training images nobody holds)",
        "converged_iterations": {str(k): v for k, v in chosen.items()}, "points": points,
    })
    atomic_write(ctx.out / "curve.csv", lambda tmp: frame.to_csv(tmp, index=False))
    plot_curve(frame, chosen, ctx.out / "dm_curve.png")
    ctx.log("curve: DM converged at " + ", ".join(f"ipc {k}: {v} iterations" for k, v in chosen.items()))
    return chosen


def converged_at(curve: pd.DataFrame) -> int:
    """The first iteration count whose successor gains less than CONVERGED_GAIN; the last one when none does."""
    its, acc = curve["iterations"].tolist(), curve["accuracy_mean"].tolist()
    for k in range(len(its) - 1):
        if acc[k + 1] - acc[k] < CONVERGED_GAIN:
            return int(its[k])
    return int(its[-1])


def dm_curve(ctx: Context, cfg: ExperimentConfig, iterations: Sequence[int], out: Path) -> list[dict[str, Any]]:
    """One DM run to max(iterations) (resumable from its checkpoint), the set at each point evaluated on the
    validation slice; each point's result in out/it<N>.json."""
    from server.distill.artifacts import load_checkpoint, save_checkpoint
    from server.distill.evaluate import NetProtocol, evaluate_synthetic, mean_std
    from server.distill.methods import distill
    from server.distill.run import eval_seeds

    wanted = sorted(iterations)
    files = {n: out / f"it{n}.json" for n in wanted}
    if not all(f.is_file() for f in files.values()):
        ctx.check_time()
        inputs = distill_inputs(cfg, "validation")
        device = pick_device(cfg.device)
        seed, dcfg = cfg.seed, cfg.distill
        protocol = NetProtocol(cfg.evaluation, cfg.model, inputs.num_classes, device, dcfg.dsa_strategy)
        start = time.perf_counter()
        snapshots: dict[int, torch.Tensor] = {}

        def on_iteration(it: int, metrics: dict[str, float], current: Any) -> None:
            if it in files and not files[it].is_file():
                snapshots[it] = current.images

        def on_checkpoint(state: Any) -> None:
            labels = torch.arange(inputs.num_classes).repeat_interleave(dcfg.ipc)
            save_checkpoint(state, labels, out, {"method": "dm", "seed": seed, "ipc": dcfg.ipc, "config": config_to_dict(cfg)})
            for it, images in sorted(snapshots.items()):  # evaluate what the checkpoint now covers
                accuracies = evaluate_synthetic(images, labels, inputs.eval_x, inputs.eval_y, protocol,
                                                eval_seeds(seed, cfg.evaluation.num_nets))
                mean, std = mean_std(accuracies)
                save_json(files[it], {"pipc": cfg.split.pipc, "ipc": dcfg.ipc, "iterations": it, "seed": seed,
                                      "accuracies": accuracies, "accuracy_mean": mean, "accuracy_std": std,
                                      "validation_images": len(inputs.eval_y), "commit": git_commit(),
                                      "machine": describe_machine(device), "date": time.strftime("%Y-%m-%d"),
                                      "seconds_so_far": round(time.perf_counter() - start, 1)})
                ctx.log(f"curve pipc {cfg.split.pipc} ipc {dcfg.ipc}: {it} iterations: {100 * mean:.2f} ± {100 * std:.2f} %")
            snapshots.clear()

        if any(n % dcfg.checkpoint_every for n in wanted):
            raise ConfigError(f"curve points {wanted} must be multiples of distill.checkpoint_every={dcfg.checkpoint_every}")
        distill(None, inputs.public_x, inputs.public_y, dcfg, cfg.model, inputs.num_classes, seed, device, on_iteration,
                checkpoint=on_checkpoint, resume=load_checkpoint(out, "dm", seed))
    return [json.loads(f.read_text()) for f in files.values()]


def plot_curve(frame: pd.DataFrame, chosen: dict[int, int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ipcs = sorted(frame["ipc"].unique())
    fig, axes = plt.subplots(1, len(ipcs), figsize=(4.5 * len(ipcs), 3.4), squeeze=False)
    for ax, ipc in zip(axes[0], ipcs, strict=True):
        for pipc, g in frame[frame["ipc"] == ipc].groupby("pipc"):
            g = g.sort_values("iterations")
            ax.errorbar(g["iterations"], 100 * g["accuracy_mean"], yerr=100 * g["accuracy_std"], marker="o", capsize=3,
                        label=f"pipc {pipc}")
        ax.axvline(chosen[ipc], color="grey", linestyle=":", label=f"chosen: {chosen[ipc]}")
        ax.set(xscale="log", xlabel="DM iterations", ylabel="validation accuracy (%)", title=f"dm, ipc {ipc}")
        ax.legend(fontsize=8)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


# ---------------------------------------------------------------- driver


def run(protocol: Protocol, out: Path, stages: Sequence[str], extra: dict[str, Any], max_minutes: float | None = None,
        workers: int = 1, threads: int | None = None, only: TableFilter | None = None, address: str | None = None) -> int:
    """Runs `stages` of `protocol` into `out`; `only` restricts the table to the cells it keeps (None: every cell)."""
    from simulations.grid.report import report_stage

    deadline = time.time() + 60 * max_minutes if max_minutes else float("inf")
    ctx = Context(protocol, out.resolve(), deadline, workers, threads, address)
    cfg = base_config(protocol, extra)
    try:
        model = edge_stage(ctx, cfg, train="edge" in stages)
        experiment_data(cfg)  # before any worker starts: they read the cache it fills
        ratio = None
        calibration = ctx.out / "calibration.json"
        reused = ctx.reuse / "calibration.json" if ctx.reuse else None
        if not calibration.is_file() and reused is not None and reused.is_file():
            save_json(calibration, {**json.loads(reused.read_text()), "reused_from": os.path.relpath(reused, ctx.out)})
        if "calibrate" in stages and not calibration.is_file():
            ratio = calibrate_stage(ctx, extra, model)
        if calibration.is_file():
            ratio = json.loads(calibration.read_text())["chosen_dkkt_ratio"]
        if "balance" in stages and protocol.balance_ipcs and not (ctx.out / "balance.json").is_file():
            balance_stage(ctx, extra, ratio, model)
        conv = None
        if protocol.curve and "curve" in stages:
            conv = curve_stage(ctx, extra)
        curve = next((d / "curve.json" for d in (ctx.out, ctx.reuse or ctx.out) if (d / "curve.json").is_file()), None)
        if curve is not None:
            conv = {int(k): v for k, v in json.loads(curve.read_text())["converged_iterations"].items()}
        if "table" in stages:
            if ratio is None:
                raise ConfigError("the table needs the calibrated dkkt_ratio: run the calibrate stage first")
            cells = [c for c in table_cells(protocol, extra, ratio, conv) if only is None or only.keeps(c.columns)]
            run_stage(ctx, "table", cells, model, "test")
    except CellsUnfinished:
        ctx.log(f"stopped with cells unfinished (--max-minutes {max_minutes} spent, or a worker lost: see above); run "
                "the same command again to continue")
    if "report" in stages and (ctx.out / "edge_model.json").is_file():
        report_stage(ctx, cfg)
    return 0
