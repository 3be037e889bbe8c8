"""The evidence protocol for the paper's claim (DM + DKKT vs DM with few public images), resumable, in stages.

    python -m simulations.evidence --preset cpu --out docs/results/cpu-pipc50 [--stages ...] [--max-minutes M]

Stages, each skipping what an earlier call finished (so the protocol can run in pieces):
  edge       the received model: a real federation of the config (Flower simulation), reused when a finished run of
             the same data/split/model/federation/seed lies under OUT/edge/, continued when one was interrupted
  calibrate  dkkt_ratio grid x calibration ipcs, one seed, evaluated on the validation slice (never the test set);
             the best mean validation accuracy over those ipcs fixes dkkt_ratio for the table
  balance    DM and DKKT gradient norms, the auto weight and lambda at each ipc with that ratio (simulations/dkkt_balance.py)
  table      every variant x ipc x seed with that ratio, evaluated once on the test set
  report     OUT/table.md (protocol, commit, seconds per row), results.csv, plots, Figures 2 and 3

Every cell is `run_distillation` into OUT/<stage>/cells/<cell>/ (result.json, history.jsonl, synthetic.pt/png).
`--workers N` runs the cells of the calibrate and table stages in N processes at once (a GPU runs ConvNet-3 steps
launch-bound, so several processes share it well); this process chooses the ratio, measures the balance and reports.
Presets: `cpu` (reduced scale for 2 CPU cores; every table states it), `gpu` (the paper-scale protocol on CUDA, same
split and received model), `tiny` (generated data, for tests).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from common.atomic import atomic_write, load_torch, save_json
from common.config import ConfigError, ExperimentConfig, config_to_dict, load_config, parse_overrides, same_configuration
from common.data import Dataset, ImageArrays, to_normalized_tensor
from common.holdings import decide_holdings, load_experiment_data, split_seed
from common.methods import METHODS
from common.progress import LineProgress
from common.runtime import describe_machine, git_commit, pick_device
from common.models import model_from_config
from simulations.sweep import edge_model_key

STAGES = ("edge", "calibrate", "balance", "curve", "table", "report")


@dataclass(frozen=True)
class Variant:
    """A row of the table: a method plus what it changes (e.g. init=lambda)."""

    name: str
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)


VARIANTS = {
    v.name: v
    for v in (
        Variant("random", "random"),
        Variant("dm", "dm"),
        Variant("dsv", "dsv"),
        Variant("dm+dkkt", "dm+dkkt"),
        Variant("random@lambda", "random", {"distill.init": "lambda"}),
        Variant("dm@lambda", "dm", {"distill.init": "lambda"}),
        Variant("dm+dkkt@lambda", "dm+dkkt", {"distill.init": "lambda"}),
        # The control for the step size: DM alone with its image step scaled by (1 + dkkt_ratio), the largest
        # step dm+dkkt can take (set per table in `table_cells`). If it matches dm+dkkt, DKKT adds only step.
        Variant("dm@step", "dm"),
        # Ablations of dm+dkkt: the DM-then-DKKT schedule (DM alone for the first half), without the augmented view
        # (the KKT terms on the synthetic images only), and the CPU savings undone
        # (DM's batch_real 256, i.e. every public image in each step at pipc <= 256; the DKKT term on every synthetic
        # image): what the savings cost.
        Variant("dm+dkkt@late", "dm+dkkt", {"distill.dkkt_from": 0.5}),
        Variant("dm+dkkt@noaug", "dm+dkkt", {"distill.aug_weight": 0.0}),
        Variant("dm@full", "dm", {"distill.batch_real": 256}),
        Variant("dm+dkkt@full", "dm+dkkt", {"distill.batch_real": 256, "distill.dkkt_candidates": 0}),
        # DM run to convergence: the iteration count DM's validation curve chose at that ipc (the curve stage; set per
        # table in `table_cells`), the baseline the headline gain is measured against.
        Variant("dm@conv", "dm"),
        # Which part of L_DKKT carries the gain: the primal cross-entropy alone, the stationarity term alone (both
        # views; the auto weight holds the DKKT share of the image gradient at dkkt_ratio either way).
        Variant("dm+primal", "dm+dkkt", {"distill.stat_weight": 0.0}),
        Variant("dm+stat", "dm+dkkt", {"distill.primal_weight": 0.0}),
    )
}


@dataclass(frozen=True)
class Protocol:
    """What the evidence runs: the experiment config, the scale per ipc, the grids."""

    config: str
    overrides: dict[str, Any]
    per_ipc: dict[int, dict[str, Any]]  # ipc -> overrides at that ipc (iterations, evaluation epochs, ...)
    table_ipcs: tuple[int, ...]
    seeds: tuple[int, ...]
    variants: tuple[str, ...]
    single_seed_ipcs: tuple[int, ...]  # ipcs run with the first seed only (the most expensive)
    single_seed_variants: tuple[str, ...]
    calibration_ipcs: tuple[int, ...]
    ratio_grid: tuple[float, ...]
    balance_ipcs: tuple[int, ...]
    balance_iterations: int
    # The split-ratio axis: public images per class of the table's cells (empty: the config's pipc only), nested
    # (split.private_pipc) so that one received model serves them all.
    pipcs: tuple[int, ...] = ()
    private_pipc: int | None = None
    only_at: dict[str, tuple[int, ...]] = field(default_factory=dict)  # variant -> the pipcs it runs at (default: all)
    # DM's validation curve (the curve stage): ipc -> iteration counts whose sets are evaluated, at each curve pipc.
    curve: dict[int, tuple[int, ...]] = field(default_factory=dict)
    curve_pipcs: tuple[int, ...] = ()
    # Folders of another protocol's finished results whose matching pieces are taken instead of run again: the
    # received model (edge stage), calibration.json, and table cells of the same name and configuration.
    reuse: str | None = None
    # Folders of `feddistill audit` runs over this protocol's cells (their summary.csv rows, keyed by cell name, become
    # the table's leakage columns).
    audits: tuple[str, ...] = ()

    def cell_overrides(self, ipc: int, extra: dict[str, Any]) -> dict[str, Any]:
        """The preset's overrides, its scale at `ipc`, then the caller's key=value overrides (which win)."""
        return {**self.overrides, **self.per_ipc.get(ipc, {}), **extra, "distill.ipc": ipc}


# The paper-scale protocol on CUDA (the `gpu` preset, below).
_GPU = Protocol(
    config="cpu_pipc50",
    overrides={"device": "cuda", "distill.log_every": 100, "distill.checkpoint_every": 500,
               "evaluation.num_nets": 5, "evaluation.epochs": 1000, "distill.batch_real": 256,
               "distill.lambda_fit_steps": 300},
    per_ipc={1: {"distill.iterations": 3000}, 10: {"distill.iterations": 5000}, 50: {"distill.iterations": 2000}},
    table_ipcs=(1, 10, 50),
    seeds=(0, 1, 2),
    variants=("random", "dm", "dm+dkkt", "dm@step", "dsv", "random@lambda", "dm@lambda", "dm+dkkt@lambda"),
    single_seed_ipcs=(),
    single_seed_variants=(),
    calibration_ipcs=(1, 10),
    ratio_grid=(0.1, 0.3, 1.0, 3.0),
    balance_ipcs=(1, 10, 50),
    balance_iterations=30,
)

# The split-ratio benchmark on 2 CPU cores (docs/results/split-ratio-cpu): the cpu preset's scale, split and
# received model (its pipc-50 cells are reused), at pipc 5 .. 100 with nested public subsets; DM's iteration count
# chosen on its validation curve (dm@conv); ablations of L_DKKT's parts at pipc 10 and 50.
_SPLIT_RATIO_CPU = Protocol(
    config="cpu_pipc50",
    overrides={"device": "cpu", "distill.log_every": 10, "distill.checkpoint_every": 50, "evaluation.num_nets": 2,
               "distill.lambda_fit_steps": 300, "split.private_pipc": 50},
    per_ipc={
        1: {"distill.iterations": 200, "distill.batch_real": 16, "evaluation.epochs": 300},
        10: {"distill.iterations": 150, "distill.batch_real": 16, "evaluation.epochs": 150, "distill.dkkt_candidates": 20},
        50: {"distill.iterations": 100, "distill.batch_real": 50, "evaluation.epochs": 100, "distill.dkkt_candidates": 20},
    },
    table_ipcs=(10, 1, 50),
    seeds=(0, 1, 2),
    variants=("random", "dm", "dm+dkkt", "dm@conv", "dm+dkkt@lambda", "dsv", "dm+primal", "dm+stat"),
    single_seed_ipcs=(50,),
    single_seed_variants=("random", "dm", "dm+dkkt"),
    calibration_ipcs=(1, 10),
    ratio_grid=(0.1, 0.3, 1.0, 3.0),
    balance_ipcs=(),
    balance_iterations=30,
    pipcs=(10, 20, 50, 100, 5),
    private_pipc=50,
    only_at={"dm+primal": (10, 50), "dm+stat": (10, 50)},
    curve={10: (150, 300, 600, 1200), 1: (200, 400, 800, 1600)},
    curve_pipcs=(50, 10),
    reuse="docs/results/cpu-pipc50",
    audits=("docs/results/audit/cpu-pipc50-ipc10", "docs/results/audit/split-ratio-cpu"),
)

PRESETS = {
    # 2 CPU cores: fewer iterations and evaluation epochs than the paper (20k / 1000), fewer real images per DM step,
    # 2 evaluation nets per seed. Every table written from it says so.
    "cpu": Protocol(
        config="cpu_pipc50",
        overrides={"device": "cpu", "distill.log_every": 10, "distill.checkpoint_every": 50, "evaluation.num_nets": 2,
                   "distill.lambda_fit_steps": 300},
        per_ipc={
            1: {"distill.iterations": 200, "distill.batch_real": 16, "evaluation.epochs": 300},
            10: {"distill.iterations": 150, "distill.batch_real": 16, "evaluation.epochs": 150, "distill.dkkt_candidates": 20},
            50: {"distill.iterations": 100, "distill.batch_real": 50, "evaluation.epochs": 100, "distill.dkkt_candidates": 20},
        },
        table_ipcs=(1, 10, 50),
        seeds=(0, 1, 2),
        variants=("random", "dm", "dm+dkkt", "dm@step", "dsv", "random@lambda", "dm@lambda", "dm+dkkt@lambda",
                  "dm+dkkt@late", "dm+dkkt@noaug", "dm@full", "dm+dkkt@full"),
        single_seed_ipcs=(50,),
        single_seed_variants=("random", "dm+dkkt", "random@lambda"),
        calibration_ipcs=(1, 10),
        ratio_grid=(0.1, 0.3, 1.0, 3.0),
        balance_ipcs=(1, 10, 50),
        balance_iterations=30,
    ),
    # A CUDA machine: the paper-scale protocol (DM's 1000-epoch evaluation, 5 nets, 5,000 iterations as the DM
    # anchors of RESEARCH.md section 8) on the same split and received model as `cpu` (train the edge model where Flower
    # is installed; the GPU machine has none). Run it repeatedly with --max-minutes 9 until every stage is done.
    "gpu": _GPU,
    "split-ratio-cpu": _SPLIT_RATIO_CPU,
    # The split-ratio slice a GPU session runs first (docs/benchmarks.md): ipc 10 at pipc 50 and 10, dm, its step
    # control and dm+dkkt at the gpu preset's paper scale (5,000 iterations, whole pool per DM step, 5 nets x 1,000
    # epochs), 3 seeds, on the same nested split and received model; dkkt_ratio from the gpu preset's calibration.
    "split-ratio-gpu": replace(
        _SPLIT_RATIO_CPU, overrides={**_GPU.overrides, "split.private_pipc": 50}, per_ipc=_GPU.per_ipc, table_ipcs=(10,),
        single_seed_ipcs=(), variants=("dm", "dm+dkkt", "dm@step"), pipcs=(50, 10), only_at={}, curve={},
        curve_pipcs=(), reuse="docs/results/gpu-pipc50",
    ),
    # The same benchmark on a non-IID received model (10 clients, Dirichlet alpha 0.1 over the same private pool):
    # dm+dkkt at three pipcs; the model-free columns (random, dm, dm@conv) are the IID table's cells (DM never reads
    # the received model), dkkt_ratio and DM's iteration counts too.
    "split-ratio-cpu-dirichlet": replace(
        _SPLIT_RATIO_CPU, overrides={**_SPLIT_RATIO_CPU.overrides, "split.partition": "dirichlet", "split.alpha": 0.1},
        table_ipcs=(10,), single_seed_ipcs=(), variants=("random", "dm", "dm@conv", "dm+dkkt"), pipcs=(10, 50, 100),
        only_at={}, curve={}, curve_pipcs=(), reuse="docs/results/split-ratio-cpu", audits=(),
    ),
    "tiny": Protocol(
        config="quickstart",
        overrides={"device": "cpu", "data.name": "tiny", "data.tiny_per_class": 12, "data.train_per_class": None,
                   "data.test_per_class": None, "model.width": 8, "split.pipc": 2, "split.validation_per_class": 2,
                   "split.num_clients": 2, "federation.rounds": 1, "federation.batch_size": 16,
                   "federation.local_epochs": 1, "distill.enabled": False, "distill.baselines": [],
                   "distill.iterations": 4, "distill.log_every": 2, "distill.checkpoint_every": 2,
                   "distill.batch_real": 2, "distill.lambda_fit_steps": 5, "evaluation.epochs": 3,
                   "evaluation.num_nets": 1, "evaluation.batch_size": 16},
        per_ipc={},
        table_ipcs=(1, 2),
        seeds=(0, 1),
        variants=("random", "dm", "dm+dkkt", "dm@lambda", "dm+dkkt@late"),
        single_seed_ipcs=(2,),
        single_seed_variants=("random", "dm+dkkt"),
        calibration_ipcs=(1,),
        ratio_grid=(0.3, 1.0),
        balance_ipcs=(1, 2),
        balance_iterations=4,
    ),
}
# The split-ratio form of `tiny` (nested pipcs, DM's curve, dm@conv and the ablation columns), for tests.
PRESETS["tiny-split"] = replace(
    PRESETS["tiny"], overrides={**PRESETS["tiny"].overrides, "split.private_pipc": 2}, table_ipcs=(1,), seeds=(0, 1),
    variants=("random", "dm", "dm+dkkt", "dm@conv", "dm+primal", "dm+stat"), single_seed_ipcs=(), balance_ipcs=(),
    pipcs=(1, 2, 3), private_pipc=2, only_at={"dm+primal": (2,), "dm+stat": (2,)}, curve={1: (2, 4, 6)}, curve_pipcs=(2,),
)


class OutOfTime(Exception):
    """--max-minutes is spent: stop before the next cell (everything finished so far is on disk)."""


class Incomplete(Exception):
    """A stage has cells that other workers have not finished yet."""


@dataclass
class Context:
    protocol: Protocol
    out: Path
    deadline: float
    shard: tuple[int, int] = (0, 1)  # (this worker's index, number of workers): it runs cells i with i % n == index

    def mine(self, index: int) -> bool:
        return index % self.shard[1] == self.shard[0]

    def log(self, text: str) -> None:
        worker = f"[worker {self.shard[0]}/{self.shard[1]}] " if self.shard[1] > 1 else ""
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {worker}{text}"
        print(line, flush=True)

    def check_time(self) -> None:
        if time.time() > self.deadline:
            raise OutOfTime


def base_config(protocol: Protocol, extra: dict[str, Any]) -> ExperimentConfig:
    return load_config(protocol.config, {**protocol.overrides, **extra})


# ---------------------------------------------------------------- edge


def edge_stage(ctx: Context, cfg: ExperimentConfig, train: bool) -> Path:
    """OUT/edge_model.json and the received model's path: a finished federation of cfg, else (`train`) train or
    continue one."""
    from server.resume import load_run_config

    key = edge_model_key(cfg)
    homes = [ctx.out] + ([Path(ctx.protocol.reuse)] if ctx.protocol.reuse else [])
    runs = sorted(p.parent for home in homes for p in (home / "edge").glob("*/config.yaml"))
    matching = [r for r in runs if edge_model_key(load_run_config(r)) == key]
    finished = [r for r in matching if (r / "received_model.pt").is_file()]
    if not finished:
        if not train:
            raise ConfigError(f"no finished federation of {cfg.name} under {ctx.out / 'edge'}: run the edge stage first")
        ctx.check_time()
        from simulations.simulate import simulate

        resume = matching[-1] if matching else None
        ctx.log(f"edge: training the federation of {cfg.name} (key {key})" + (f", resuming {resume}" if resume else ""))
        finished = [simulate(cfg, output_dir=ctx.out / "edge", resume=resume).run_dir]
    run = finished[-1]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    info = {"run": os.path.relpath(run, ctx.out), "config_key": key, "rounds": lines[-1]["round"],
            "test_accuracy": lines[-1]["test_accuracy"], "seconds": lines[-1]["elapsed"],
            "num_clients": cfg.split.num_clients, "pipc": cfg.split.pipc}
    save_json(ctx.out / "edge_model.json", info)
    ctx.log(f"edge: received model {run / 'received_model.pt'}: test accuracy {info['test_accuracy']:.4f} after "
            f"{info['rounds']} rounds ({info['seconds'] / 60:.0f} min)")
    return run / "received_model.pt"


def load_model(cfg: ExperimentConfig, dataset: Dataset, path: Path) -> torch.nn.Module:
    model = model_from_config(cfg.model, dataset.num_classes, dataset.channels, dataset.image_size)
    model.load_state_dict(load_torch(path))
    return model


# ---------------------------------------------------------------- cells


def validation_split(cfg: ExperimentConfig, dataset: Dataset) -> ImageArrays:
    """The validation slice (nobody's images); ConfigError when the config has none."""
    if not cfg.split.validation_per_class:
        raise ConfigError("calibration needs split.validation_per_class >= 1: it never evaluates on the test set")
    idx = decide_holdings(cfg, dataset.train.labels).validation
    return ImageArrays(dataset.train.images[idx], dataset.train.labels[idx])


def run_cells(ctx: Context, stage: str, cells: list[tuple[str, ExperimentConfig, dict[str, Any]]], model: torch.nn.Module,
              dataset: Dataset, evaluation: ImageArrays) -> pd.DataFrame:
    """Runs the unfinished cells of a stage (name, config, columns) and rewrites OUT/<stage>/results.csv after each."""
    from server.distill.run import run_distillation

    stage_dir = ctx.out / stage
    norm = dataset.normalization
    eval_x, eval_y = to_normalized_tensor(evaluation.images, norm), torch.as_tensor(evaluation.labels)
    publics: dict[int, tuple[np.ndarray, torch.Tensor, torch.Tensor]] = {}  # pipc -> the public subset, as tensors
    for index, (name, cfg, columns) in enumerate(cells):
        cell_dir = stage_dir / "cells" / name
        if ctx.mine(index) and not (cell_dir / "result.json").is_file():
            if reuse_cell(ctx, stage, name, cfg, cell_dir):
                ctx.log(f"{stage} {name}: reused from {ctx.protocol.reuse}")
                continue
            ctx.check_time()
            public = decide_holdings(cfg, dataset.train.labels).public
            if cfg.split.pipc not in publics:
                publics[cfg.split.pipc] = (public, to_normalized_tensor(dataset.train.images[public], norm),
                                           torch.as_tensor(dataset.train.labels[public]))
            if not np.array_equal(public, publics[cfg.split.pipc][0]):
                raise RuntimeError(f"{name}: its public subset differs from the stage's (the split seed must be fixed)")
            _, public_x, public_y = publics[cfg.split.pipc]
            start = time.perf_counter()
            save_json(cell_dir / "cell.json", cell_info(cell_dir, name, columns, describe_machine(pick_device(cfg.device))))
            result = run_distillation(cfg, model, public_x, public_y, eval_x, eval_y, cell_dir, norm,
                                      num_classes=dataset.num_classes, progress=LineProgress(interval=120.0))
            ctx.log(f"{stage} {name}: {100 * result['mean']:.2f} ± {100 * result['std']:.2f} % "
                    f"({time.perf_counter() - start:.0f} s)")
        write_results(stage_dir)
    return write_results(stage_dir)


# Split keys that decide only how the private pool is partitioned over clients (never the public subset, the
# validation slice or the dataset slice): only the received model depends on them.
PRIVATE_ONLY = ("num_clients", "partition", "alpha", "classes_per_client", "min_partition_size", "client_holdout")


def model_independent_keys(cfg: ExperimentConfig) -> set[str]:
    """The keys a cell of `cfg` does not depend on: what only the received model depends on (the federation and how
    the private pool is partitioned) when its method never reads the model; none otherwise."""
    if METHODS[cfg.distill.method].needs_model(cfg.distill.init):
        return set()
    return {f"split.{k}" for k in PRIVATE_ONLY} | {f"federation.{k}" for k in type(cfg.federation).model_fields}


REUSED_FILES = ("result.json", "seed_0/result.json", "seed_0/history.jsonl", "seed_0/synthetic.json")


def reuse_cell(ctx: Context, stage: str, name: str, cfg: ExperimentConfig, cell_dir: Path) -> bool:
    """Takes a finished cell of the same name and configuration from the reused protocol's folder: its results and
    history (the synthetic set stays there; cell.json says where). False when there is none."""
    if ctx.protocol.reuse is None:
        return False
    source = Path(ctx.protocol.reuse) / stage / "cells" / name
    if not (source / "result.json").is_file():
        return False
    old = json.loads((source / "result.json").read_text())
    if not same_configuration(old["config"], config_to_dict(cfg), model_independent_keys(cfg)):
        return False
    for relative in ("cell.json", *REUSED_FILES[1:]):
        if (source / relative).is_file():
            (cell_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / relative, cell_dir / relative)
    info = json.loads((cell_dir / "cell.json").read_text())
    save_json(cell_dir / "cell.json", {**info, "reused_from": os.path.relpath(source, cell_dir)})
    atomic_write(cell_dir / "result.json", lambda tmp: shutil.copyfile(source / "result.json", tmp))  # last: finished
    return True


def cell_info(cell_dir: Path, name: str, columns: dict[str, Any], here: str) -> dict[str, Any]:
    """cell.json: the cell's columns and the machine it started on; a cell continued elsewhere (from its checkpoint)
    also names where it was finished."""
    started = cell_dir / "cell.json"
    info = {"cell": name, **columns, "machine": here}
    if started.is_file():
        first = json.loads(started.read_text()).get("machine", here)
        info = {**info, "machine": first, **({"finished_on": here} if first != here else {})}
    return info


def write_results(stage_dir: Path) -> pd.DataFrame:
    """OUT/<stage>/results.csv: one row per finished cell, in the layout simulations/report.py reads."""
    rows = []
    for result_file in sorted((stage_dir / "cells").glob("*/result.json")):
        info = json.loads((result_file.parent / "cell.json").read_text())
        result = json.loads(result_file.read_text())
        rows.append({**info, "accuracy_mean": result["mean"], "accuracy_std": result["std"],
                     "num_evaluations": len(result["accuracies"]), "accuracies": json.dumps(result["accuracies"]),
                     "distill_s": result["timings"]["distill_s"], "evaluate_s": result["timings"]["evaluate_s"]})
    frame = pd.DataFrame(rows)
    atomic_write(stage_dir / "results.csv", lambda tmp: frame.to_csv(tmp, index=False))
    return frame


def cell_config(protocol: Protocol, extra: dict[str, Any], variant: Variant, ipc: int, seed: int,
                more: dict[str, Any] | None = None) -> ExperimentConfig:
    """The config of one cell; the split seed stays the base config's, so every cell shares the edge model's split."""
    base = base_config(protocol, extra)
    return load_config(protocol.config, {
        **protocol.cell_overrides(ipc, extra), **variant.overrides, **(more or {}),
        "distill.method": variant.method, "distill.num_seeds": 1, "distill.enabled": False, "seed": seed,
        "split.seed": split_seed(base),
    })


def calibrate_stage(ctx: Context, extra: dict[str, Any], model: torch.nn.Module, dataset: Dataset) -> float:
    """The dkkt_ratio with the best mean validation accuracy over the calibration ipcs (seed 0); OUT/calibration.json."""
    protocol = ctx.protocol
    seed = protocol.seeds[0]
    cells = []
    for ipc in protocol.calibration_ipcs:
        cells.append((f"ipc{ipc}-dm-seed{seed}", cell_config(protocol, extra, VARIANTS["dm"], ipc, seed),
                      {"ipc": ipc, "method": "dm", "ratio": None, "seed": seed}))
        for ratio in protocol.ratio_grid:
            cfg = cell_config(protocol, extra, VARIANTS["dm+dkkt"], ipc, seed, {"distill.dkkt_ratio": ratio})
            cells.append((f"ipc{ipc}-dm_dkkt-ratio{ratio:g}-seed{seed}", cfg,
                          {"ipc": ipc, "method": "dm+dkkt", "ratio": ratio, "seed": seed}))
    validation = validation_split(cells[0][1], dataset)
    results = run_cells(ctx, "calibration", cells, model, without_test(dataset), validation)
    if len(results) < len(cells):
        raise Incomplete(f"calibration: {len(results)} of {len(cells)} cells finished")
    tuned = results[results["method"] == "dm+dkkt"]
    means = tuned.groupby("ratio")["accuracy_mean"].mean()
    best = float(means.idxmax())
    save_json(ctx.out / "calibration.json", {
        "chosen_dkkt_ratio": best, "evaluated_on": f"validation slice ({len(validation)} training images nobody holds)",
        "mean_validation_accuracy_by_ratio": {f"{r:g}": float(m) for r, m in means.items()},
        "dm_validation_accuracy_by_ipc": {int(r["ipc"]): float(r["accuracy_mean"]) for _, r in results[results["method"] == "dm"].iterrows()},
    })
    ctx.log(f"calibrate: dkkt_ratio={best:g} (mean validation accuracy by ratio: "
            + ", ".join(f"{r:g}: {100 * m:.2f} %" for r, m in means.items()) + ")")
    return best


def balance_stage(ctx: Context, extra: dict[str, Any], ratio: float | None, model: torch.nn.Module, dataset: Dataset) -> None:
    """OUT/balance.json and balance.md: gradient norms and shares of DM and DKKT at each table ipc (dm+dkkt, seed 0)."""
    from simulations.dkkt_balance import markdown, measure

    protocol = ctx.protocol
    rows = []
    for ipc in protocol.balance_ipcs:
        ctx.check_time()
        cfg = cell_config(protocol, extra, VARIANTS["dm+dkkt"], ipc, protocol.seeds[0],
                          {"distill.dkkt_ratio": ratio} if ratio is not None else {})
        public = decide_holdings(cfg, dataset.train.labels).public
        rows.append(measure(cfg, model, to_normalized_tensor(dataset.train.images[public], dataset.normalization),
                            torch.as_tensor(dataset.train.labels[public]), dataset.num_classes, ipc,
                            protocol.balance_iterations, protocol.balance_iterations // 3, protocol.seeds[0]))
        ctx.log(f"balance ipc {ipc}: DKKT/DM gradient {rows[-1]['ratio_weighted']:.3g}, weight {rows[-1]['dkkt_weight']:.3g}")
    table = markdown(rows, cfg.distill.dkkt_ratio)
    save_json(ctx.out / "balance.json", {"dkkt_ratio": cfg.distill.dkkt_ratio, "results": rows, "table": table})
    atomic_write(ctx.out / "balance.md", lambda tmp: tmp.write_text(table + "\n"))


def without_test(dataset: Dataset) -> Dataset:
    """The dataset with its test split removed: what the calibration stage is given, so it cannot read it."""
    empty = ImageArrays(dataset.test.images[:0], dataset.test.labels[:0])
    return Dataset(dataset.name, dataset.classes, dataset.train, empty, dataset.normalization)


FIRST_VARIANTS = ("random", "dm", "dm+dkkt", "dm@step")  # the paper's comparison and its control, every seed first


def runs_at(protocol: Protocol, name: str, pipc: int | None, ipc: int) -> bool:
    """Whether variant `name` has a cell at (pipc, ipc): ipc <= pipc (init=real), the variant's pipcs, and no `dm@conv`
    where ipc = pipc (DM's loss is 0 there: `dm`'s cell shows that its set stays random's)."""
    if pipc is None:
        return True
    return ipc <= pipc and pipc in protocol.only_at.get(name, (pipc,)) and not (name == "dm@conv" and ipc == pipc)


def table_cells(protocol: Protocol, extra: dict[str, Any], ratio: float, conv_iterations: dict[int, int] | None = None
                ) -> list[tuple[str, ExperimentConfig, dict[str, Any]]]:
    """Every (variant, ipc, pipc, seed) of the table with the calibrated ratio, in the order that answers the paper's
    question first: random, dm and dm+dkkt at every multi-seed ipc (in the preset's order), seed and pipc; then each
    other variant the same way, one variant after another; then the single-seed ipcs (the most expensive). A partial
    run is a complete comparison for the columns it has. `conv_iterations` (ipc -> DM's converged iteration count,
    from the curve stage) is needed for `dm@conv`."""
    multi = [ipc for ipc in protocol.table_ipcs if ipc not in protocol.single_seed_ipcs]
    pipcs = protocol.pipcs or (None,)
    first = [n for n in protocol.variants if n in FIRST_VARIANTS]
    tiers = [first] + [[n] for n in protocol.variants if n not in FIRST_VARIANTS]
    order = [(ipc, seed, pipc, name) for tier in tiers for ipc in multi for seed in protocol.seeds for pipc in pipcs
             for name in tier]
    order += [(ipc, protocol.seeds[0], pipc, name) for ipc in protocol.single_seed_ipcs for pipc in pipcs
              for name in protocol.single_seed_variants]
    cells = []
    for ipc, seed, pipc, name in order:
        if not runs_at(protocol, name, pipc, ipc):
            continue
        more = {"distill.dkkt_ratio": ratio, **({"split.pipc": pipc} if pipc is not None else {})}
        cfg = cell_config(protocol, extra, VARIANTS[name], ipc, seed, more)
        if name == "dm@step":
            cfg = cell_config(protocol, extra, VARIANTS[name], ipc, seed, {**more, "distill.lr_img": cfg.distill.lr_img * (1 + ratio)})
        if name == "dm@conv":
            if not conv_iterations or ipc not in conv_iterations:
                continue  # the curve stage has not chosen this ipc's count yet
            cfg = cell_config(protocol, extra, VARIANTS[name], ipc, seed, {**more, "distill.iterations": conv_iterations[ipc]})
        cells.append((cell_name(cfg.split.pipc, ipc, name, seed), cfg,
                      {"pipc": cfg.split.pipc, "ipc": ipc, "method": name, "seed": seed}))
    return cells


def cell_name(pipc: int, ipc: int, variant: str, seed: int) -> str:
    return f"pipc{pipc}-ipc{ipc}-{variant.replace('+', '_').replace('@', '-at-')}-seed{seed}"


# ---------------------------------------------------------------- DM's validation curve


CONVERGED_GAIN = 0.005  # DM has converged where doubling its iterations gains less than this (0.5 points)


def curve_stage(ctx: Context, extra: dict[str, Any], dataset: Dataset) -> dict[int, int]:
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
            points += dm_curve(ctx, cfg, dataset, iterations, ctx.out / "curve" / f"pipc{pipc}-ipc{ipc}")
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


def dm_curve(ctx: Context, cfg: ExperimentConfig, dataset: Dataset, iterations: Sequence[int], out: Path) -> list[dict[str, Any]]:
    """One DM run to max(iterations) (resumable from its checkpoint), the set at each point evaluated on the
    validation slice; each point's result in out/it<N>.json."""
    from server.distill.artifacts import load_checkpoint, save_checkpoint
    from server.distill.evaluate import evaluate_synthetic, mean_std
    from server.distill.methods import distill
    from server.distill.run import eval_seeds

    wanted = sorted(iterations)
    files = {n: out / f"it{n}.json" for n in wanted}
    if not all(f.is_file() for f in files.values()):
        ctx.check_time()
        holdings = decide_holdings(cfg, dataset.train.labels)
        norm = dataset.normalization
        public_x = to_normalized_tensor(dataset.train.images[holdings.public], norm)
        public_y = torch.as_tensor(dataset.train.labels[holdings.public])
        val_x = to_normalized_tensor(dataset.train.images[holdings.validation], norm)
        val_y = torch.as_tensor(dataset.train.labels[holdings.validation])
        device = pick_device(cfg.device)
        seed, dcfg = cfg.seed, cfg.distill
        start = time.perf_counter()
        snapshots: dict[int, torch.Tensor] = {}

        def on_iteration(it: int, metrics: dict[str, float], current: Any) -> None:
            if it in files and not files[it].is_file():
                snapshots[it] = current.images

        def on_checkpoint(state: Any) -> None:
            labels = torch.arange(dataset.num_classes).repeat_interleave(dcfg.ipc)
            save_checkpoint(state, labels, out, {"method": "dm", "seed": seed, "ipc": dcfg.ipc, "config": config_to_dict(cfg)})
            for it, images in sorted(snapshots.items()):  # evaluate what the checkpoint now covers
                accuracies = evaluate_synthetic(images, labels, val_x, val_y, cfg.evaluation, cfg.model,
                                                eval_seeds(seed, cfg.evaluation.num_nets), device, dataset.num_classes,
                                                dcfg.dsa_strategy)
                mean, std = mean_std(accuracies)
                save_json(files[it], {"pipc": cfg.split.pipc, "ipc": dcfg.ipc, "iterations": it, "seed": seed,
                                      "accuracies": accuracies, "accuracy_mean": mean, "accuracy_std": std,
                                      "validation_images": len(val_y), "commit": git_commit(),
                                      "machine": describe_machine(device), "date": time.strftime("%Y-%m-%d"),
                                      "seconds_so_far": round(time.perf_counter() - start, 1)})
                ctx.log(f"curve pipc {cfg.split.pipc} ipc {dcfg.ipc}: {it} iterations: {100 * mean:.2f} ± {100 * std:.2f} %")
            snapshots.clear()

        if any(n % dcfg.checkpoint_every for n in wanted):
            raise ConfigError(f"curve points {wanted} must be multiples of distill.checkpoint_every={dcfg.checkpoint_every}")
        distill(None, public_x, public_y, dcfg, cfg.model, dataset.num_classes, seed, device, on_iteration,
                checkpoint=on_checkpoint, resume=load_checkpoint(out, "dm", seed))
    return [json.loads(f.read_text()) for f in files.values()]


def plot_curve(frame: pd.DataFrame, chosen: dict[int, int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ipcs = sorted(frame["ipc"].unique())
    fig, axes = plt.subplots(1, len(ipcs), figsize=(4.5 * len(ipcs), 3.4), squeeze=False)
    for ax, ipc in zip(axes[0], ipcs):
        for pipc, g in frame[frame["ipc"] == ipc].groupby("pipc"):
            g = g.sort_values("iterations")
            ax.errorbar(g["iterations"], 100 * g["accuracy_mean"], yerr=100 * g["accuracy_std"], marker="o", capsize=3,
                        label=f"pipc {pipc}")
        ax.axvline(chosen[ipc], color="grey", linestyle=":", label=f"chosen: {chosen[ipc]}")
        ax.set(xscale="log", xlabel="DM iterations", ylabel="validation accuracy (%)", title=f"dm, ipc {ipc}")
        ax.legend(fontsize=8)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


# ---------------------------------------------------------------- report


def protocol_header(protocol: Protocol, preset: str, cfg: ExperimentConfig, edge: dict[str, Any], ratio: float | None,
                    cell_results: list[Path]) -> str:
    scale = "; ".join(
        f"ipc {ipc}: {o.get('distill.iterations', cfg.distill.iterations)} iterations, batch_real "
        f"{o.get('distill.batch_real', cfg.distill.batch_real)}, DKKT candidates/it "
        f"{o.get('distill.dkkt_candidates', 0) or 'all'}, {o.get('evaluation.epochs', cfg.evaluation.epochs)} evaluation epochs"
        for ipc, o in protocol.per_ipc.items()
    )
    cells = sorted({json.loads(p.read_text()).get("commit") or "unrecorded" for p in cell_results})
    machines = sorted({json.loads((p.parent / "cell.json").read_text()).get("machine") or "CPU: 2 cores (dev VM, model unrecorded)"
                       for p in cell_results})
    reused = sum("reused_from" in json.loads((p.parent / "cell.json").read_text()) for p in cell_results)
    if protocol.pipcs:
        split = (f"pipc {', '.join(map(str, sorted(protocol.pipcs)))} public images per class, nested (each pipc's public "
                 f"subset contains the smaller ones; split.private_pipc={protocol.private_pipc}): the private pool is the "
                 f"complement of the pipc-{protocol.private_pipc} draw and the validation slice at every pipc, so one "
                 f"received model serves every column and no public image was ever private (pipc > {protocol.private_pipc} "
                 "takes its extra images from the validation slice, which nobody trained on)")
    else:
        split = f"pipc {cfg.split.pipc} public images per class"
    partition = cfg.split.partition + (f" (alpha {cfg.split.alpha:g})" if cfg.split.partition == "dirichlet" else "")
    return "\n".join([
        f"Preset `{preset}` of `python -m simulations.evidence`: cells made at commit {', '.join(cells)}; this report at "
        f"{git_commit()}, {time.strftime('%Y-%m-%d')}; cells ran on {'; '.join(machines) or 'no machine yet'}"
        + (f"; {reused} cells reused from `{protocol.reuse}` (same name and configuration; cell.json `reused_from`)."
           if reused else "."),
        f"CIFAR-10 (JPEG copy), {split}; the received model: a Flower federation of {edge['num_clients']} {partition} "
        f"edge clients on the whole private pool, {edge['rounds']} rounds, test accuracy {100 * edge['test_accuracy']:.2f} %.",
        f"Scale (reduced, not the paper's 20k iterations / 1000 epochs): {scale}; {cfg.evaluation.num_nets} evaluation nets "
        f"per seed; mean ± std over every net of every seed (seeds {', '.join(map(str, protocol.seeds))}; "
        f"ipc {', '.join(map(str, protocol.single_seed_ipcs))}: seed {protocol.seeds[0]} only). Distillation in "
        f"{cfg.distill.precision}{', compiled' if cfg.distill.compile else ', eager'}, evaluation in "
        f"{cfg.evaluation.precision}{', compiled' if cfg.evaluation.compile else ', eager'} (docs/benchmarks.md, "
        "\"Distillation modes\": on a CPU without bf16 units bf16 is a slowdown).",
        f"dkkt_weight auto, dkkt_ratio {ratio:g} (chosen on the validation slice, calibration.json)" if ratio is not None
        else "dkkt_ratio: not calibrated yet",
    ])


def curve_statement(out: Path) -> str | None:
    """How `dm@conv`'s iteration counts were chosen (OUT/curve.json), for the table's header."""
    path = out / "curve.json"
    if not path.is_file():
        return None
    curve = json.loads(path.read_text())
    chosen = ", ".join(f"ipc {k}: {v}" for k, v in curve["converged_iterations"].items())
    return (f"DM's iteration count (`dm@conv`): chosen on DM's validation curve (`dm_curve.png`, `curve.csv`), "
            f"{curve['rule']}: {chosen} iterations; evaluated on {curve['evaluated_on']}. The gain below against "
            "`dm@conv` is the headline: against a DM that has converged.")


def variant_legend(protocol: Protocol) -> str:
    """What each column that is not a plain method changes."""
    changed = {"dm@step": "dm with the image learning rate x (1 + dkkt_ratio)",
               "dm@conv": "dm with the iteration count DM's validation curve chose",
               **{v.name: f"{v.method} with " + ", ".join(f"{k.split('.')[-1]}={val}" for k, val in v.overrides.items())
                  for v in VARIANTS.values() if v.overrides}}
    return "Columns: " + "; ".join(f"`{name}` = {changed[name]}" for name in protocol.variants if name in changed) + "."


def edge_traffic(ctx: Context, edge: dict[str, Any]) -> tuple[int | None, str]:
    """Bytes the server received from the edge in the received model's federation and where the figure comes from:
    its metrics.jsonl, or (a run from before bytes were counted) the received model's tensors once per training reply."""
    from server.traffic import bytes_received

    run = ctx.out / edge["run"]
    total = bytes_received(run)
    if total is not None:
        return total, f"recorded in `{edge['run']}/metrics.jsonl` (every reply of every round, deflated)"
    weights = sum(t.numel() * t.element_size() for t in load_torch(run / "received_model.pt").values())
    total = weights * edge["num_clients"] * edge["rounds"]
    return total, (f"computed, not recorded (the federation predates byte counting): {weights / 1e6:.2f} MB of weights "
                   f"(the received model's tensors) per training reply × {edge['num_clients']} clients × {edge['rounds']} rounds; the "
                   "evaluation replies carry only metrics")


def synthetic_sizes(table_dir: Path, results: pd.DataFrame) -> dict[int, dict[str, int]]:
    """ipc -> the size of one distilled set of that ipc (the first dm+dkkt cell's seed; every method's set of an ipc
    has the same shape)."""
    from server.distill.artifacts import synthetic_bytes
    from simulations.report import set_dir

    sizes = {}
    for _, row in results[results["method"] == "dm+dkkt"].iterrows():
        seed_dir = set_dir(table_dir / "cells" / row["cell"]) / f"seed_{row['seed']}"
        if int(row["ipc"]) not in sizes and (seed_dir / "synthetic.pt").is_file():
            sizes[int(row["ipc"])] = synthetic_bytes(seed_dir)
    return sizes


def audit_summary(protocol: Protocol, results: pd.DataFrame) -> pd.DataFrame:
    """The rows of the protocol's audit folders (summary.csv) whose set is one of the table's cells (planted
    controls included)."""
    frames = [pd.read_csv(path) for d in protocol.audits if (path := Path(d) / "summary.csv").is_file()]
    if not frames:
        return pd.DataFrame()
    summary = pd.concat(frames).drop_duplicates("set", keep="last")
    return summary[summary["set"].str.split("+").str[0].isin(set(results["cell"]))]


def report_stage(ctx: Context, preset: str, cfg: ExperimentConfig) -> None:
    from simulations.report import (audit_table, markdown_table, paired_gains, plot_accuracy_vs_pipc, plot_history,
                                    plot_method_bars, render, traffic_table)

    table_dir = ctx.out / "table"
    results = write_results(table_dir)
    if results.empty:
        ctx.log("report: no finished table cell yet")
        return
    edge = json.loads((ctx.out / "edge_model.json").read_text())
    calibration = ctx.out / "calibration.json"
    ratio = json.loads(calibration.read_text())["chosen_dkkt_ratio"] if calibration.is_file() else None
    seconds = results.groupby(["ipc", "pipc", "method"]).agg(
        done=("seed", "count"), distill_s=("distill_s", "mean"), evaluate_s=("evaluate_s", "mean")).reset_index()
    timing = ["| ipc | pipc | method | seeds done | distillation s / seed | evaluation s / seed |", "|---|---|---|---|---|---|"]
    for _, row in seconds.iterrows():
        timing.append(f"| {row['ipc']} | {row['pipc']} | {row['method']} | {row['done']} | {row['distill_s']:.0f} | "
                      f"{row['evaluate_s']:.0f} |")
    protocol = ctx.protocol
    title = (f"DM + DKKT against DM at pipc {', '.join(map(str, sorted(protocol.pipcs)))}" if protocol.pipcs
             else f"DM + DKKT against DM with {cfg.split.pipc} public images per class")
    cpu_hours = (results["distill_s"].sum() + results["evaluate_s"].sum()) / 3600
    audit = audit_summary(protocol, results)
    text = "\n\n".join(filter(None, [
        f"# {title} (preset `{preset}`)",
        protocol_header(protocol, preset, cfg, edge, ratio, sorted(table_dir.glob("cells/*/result.json"))),
        curve_statement(ctx.out),
        "Test accuracy (%):", markdown_table(results), variant_legend(protocol),
        paired_gains(results, "dm+dkkt", ("random", "dm", "dm@conv", "dm@step")),
        audit_table(audit) if not audit.empty else None,
        traffic_table(edge_traffic(ctx, edge), synthetic_sizes(table_dir, results)),
        f"Time per cell (with --workers, several cells shared the machine at once); {len(results)} cells, "
        f"{cpu_hours:.1f} hours of cell time in all:", "\n".join(timing),
    ])) + "\n"
    atomic_write(ctx.out / "table.md", lambda tmp: tmp.write_text(text))
    atomic_write(ctx.out / "results.csv", lambda tmp: results.to_csv(tmp, index=False))
    if protocol.pipcs:
        plot_accuracy_vs_pipc(results, ctx.out / "accuracy_vs_pipc.png",
                              (f"received model ({100 * edge['test_accuracy']:.1f} %)", 100 * edge["test_accuracy"]))
    else:
        plot_method_bars(results, ctx.out / "accuracy.png")
    history = sorted((table_dir / "cells").glob("*-dm_dkkt-seed0/seed_0/history.jsonl"))
    if history:
        plot_history(history[0], ctx.out / "loss_terms.png")
    render(table_dir, ctx.out / "figures")
    ctx.log(f"report: {ctx.out / 'table.md'}")


# ---------------------------------------------------------------- driver


def fan_out(ctx: Context, preset: str, stage: str, workers: int, threads: int, overrides: Sequence[str]) -> None:
    """Runs `stage` in `workers` processes of this module (worker k takes every workers-th cell) and waits for them;
    an interrupted wait stops them (each keeps what it finished and its checkpoints)."""
    minutes = [] if ctx.deadline == float("inf") else ["--max-minutes", f"{max(0.0, (ctx.deadline - time.time()) / 60):.3f}"]
    procs = [subprocess.Popen([sys.executable, "-m", "simulations.evidence", "--preset", preset, "--out", str(ctx.out),
                               "--stages", stage, "--threads", str(threads), "--shard", f"{k}/{workers}", *minutes,
                               *overrides])
             for k in range(workers)]
    try:
        codes = [proc.wait() for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    if any(codes):
        raise ConfigError(f"{stage}: worker exit codes {codes}")


@dataclass(frozen=True)
class TableFilter:
    """Which of the table's cells a run takes (empty: all): by variant, ipc, pipc and seed."""

    variants: tuple[str, ...] = ()
    ipcs: tuple[int, ...] = ()
    pipcs: tuple[int, ...] = ()
    seeds: tuple[int, ...] = ()

    def keeps(self, columns: dict[str, Any]) -> bool:
        wanted = {"method": self.variants, "ipc": self.ipcs, "pipc": self.pipcs, "seed": self.seeds}
        return all(not values or columns[key] in values for key, values in wanted.items())

    def argv(self) -> list[str]:
        """The same filter as command-line options (for the worker processes)."""
        flags = {"--variants": self.variants, "--ipcs": self.ipcs, "--pipcs": self.pipcs, "--seeds": self.seeds}
        return [arg for flag, values in flags.items() if values for arg in (flag, *map(str, values))]


def run(preset: str, out: Path, stages: Sequence[str], overrides: Sequence[str], max_minutes: float | None,
        workers: int = 1, shard: tuple[int, int] = (0, 1), threads: int = 2, only: TableFilter = TableFilter()) -> int:
    """Runs `stages` of `preset` into `out`; `only` restricts the table to the cells it keeps."""
    protocol = PRESETS[preset]
    extra = parse_overrides(list(overrides))
    ctx = Context(protocol, out.resolve(), time.time() + 60 * max_minutes if max_minutes else float("inf"), shard)
    is_worker = shard[1] > 1
    cfg = base_config(protocol, extra)
    try:
        model_path = edge_stage(ctx, cfg, train="edge" in stages and not is_worker)
        dataset = load_experiment_data(cfg)  # before any worker starts: they read the cache it fills
        model = load_model(cfg, dataset, model_path)
        ratio = None
        calibration = ctx.out / "calibration.json"
        reused = Path(protocol.reuse) / "calibration.json" if protocol.reuse else None
        if not calibration.is_file() and reused is not None and reused.is_file():
            save_json(calibration, {**json.loads(reused.read_text()), "reused_from": os.path.relpath(reused, ctx.out)})
        if "calibrate" in stages and not calibration.is_file():
            if workers > 1:
                fan_out(ctx, preset, "calibrate", workers, threads, overrides)
            ratio = calibrate_stage(ctx, extra, model, dataset)
        if calibration.is_file():
            ratio = json.loads(calibration.read_text())["chosen_dkkt_ratio"]
        if "balance" in stages and protocol.balance_ipcs and not is_worker and not (ctx.out / "balance.json").is_file():
            balance_stage(ctx, extra, ratio, model, dataset)
        conv = None
        if protocol.curve and "curve" in stages and not is_worker:
            conv = curve_stage(ctx, extra, without_test(dataset))
        curve = next((d / "curve.json" for d in (ctx.out, Path(protocol.reuse or ctx.out)) if (d / "curve.json").is_file()), None)
        if curve is not None:
            conv = {int(k): v for k, v in json.loads(curve.read_text())["converged_iterations"].items()}
        if "table" in stages:
            if ratio is None:
                raise ConfigError("the table needs the calibrated dkkt_ratio: run the calibrate stage first")
            if workers > 1:
                fan_out(ctx, preset, "table", workers, threads, [*only.argv(), *overrides])
            cells = [c for c in table_cells(protocol, extra, ratio, conv) if only.keeps(c[2])]
            run_cells(ctx, "table", cells, model, dataset, dataset.test)
    except OutOfTime:
        ctx.log(f"stopped: --max-minutes {max_minutes} spent; run the same command again to continue")
    except Incomplete as why:
        ctx.log(f"{why}; the other workers finish the rest")
    if "report" in stages and not is_worker and (ctx.out / "edge_model.json").is_file():
        report_stage(ctx, preset, cfg)
    return 0


def parse_shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    try:
        shard = (int(index), int(count))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected INDEX/COUNT, e.g. 0/4") from None
    if not 0 <= shard[0] < shard[1]:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: needs 0 <= INDEX < COUNT")
    return shard


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--max-minutes", type=float, help="start no new cell after this many minutes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--workers", type=int, default=1, help="processes that run the cells of a stage at once")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), help=argparse.SUPPRESS)  # set by --workers
    parser.add_argument("--variants", nargs="+", default=[], choices=sorted(VARIANTS), help="table: only these variants")
    parser.add_argument("--ipcs", nargs="+", type=int, default=[], help="table: only these ipcs")
    parser.add_argument("--pipcs", nargs="+", type=int, default=[], help="table: only these pipcs")
    parser.add_argument("--seeds", nargs="+", type=int, default=[], help="table: only these distillation seeds")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every config (e.g. data.path=...)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    torch.set_num_threads(args.threads)
    try:
        return run(args.preset, args.out, args.stages, args.overrides, args.max_minutes, args.workers, args.shard,
                   args.threads, TableFilter(tuple(args.variants), tuple(args.ipcs), tuple(args.pipcs), tuple(args.seeds)))
    except ConfigError as err:
        print(f"error: {err}")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
