"""The split-ratio benchmark: pipc x ipc x method x seed cells over one experiment config.

    feddistill sweep --config tiny [--out DIR] [key=value ...]   (grids under simulations/configs/sweeps/)

The edge model is trained federatedly (Flower simulation) once per private split and cached under
`<out>/edge_models/`, keyed by everything that determines it (data, split, model, federation, seed); every
method and ipc of that pipc reuses it. Each cell writes `<out>/cells/<cell>/result.json` atomically when it
finishes, so an interrupted sweep resumes by skipping finished cells. After every cell the collected
results are rewritten to `<out>/results.csv` and `<out>/results.json`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from common.atomic import atomic_write, load_torch, save_json
from common.config import (
    CONFIG_DIR,
    NAME_PATTERN,
    SEED_LIMIT,
    ConfigError,
    ExperimentConfig,
    build_config,
    config_to_dict,
    load_config,
    resolve_config_path,
)

Method = Literal["random", "dm", "dsv", "dm+dkkt"]
SWEEP_DIR = CONFIG_DIR / "sweeps"


class SweepConfig(BaseModel):
    """A YAML grid: the experiment config every cell starts from, then the axes."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field("sweep", pattern=f"^{NAME_PATTERN.pattern}$")  # names the sweep folder
    base: str = "quickstart"  # experiment config (name under simulations/configs/ or a path)
    overrides: dict[str, Any] = Field(default_factory=dict)  # dotted keys applied to the base
    pipc: list[int] = Field(min_length=1)
    ipc: list[int] = Field(min_length=1)
    methods: list[Method] = Field(min_length=1)
    seeds: list[Annotated[int, Field(ge=0, lt=SEED_LIMIT)]] = Field(default_factory=lambda: [0], min_length=1)


@dataclass(frozen=True)
class Cell:
    pipc: int
    ipc: int
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"pipc{self.pipc}-ipc{self.ipc}-{self.method.replace('+', '_')}-seed{self.seed}"


def load_sweep(name_or_path: str | Path) -> SweepConfig:
    path = resolve_config_path(name_or_path, SWEEP_DIR)
    try:
        return SweepConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"sweep {path}: cannot be read as YAML ({' '.join(str(err).split())})") from None
    except ValidationError as err:
        lines = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"sweep {path.name}: " + "; ".join(lines)) from None


def cell_config(sweep: SweepConfig, cell: Cell, extra: dict[str, Any] | None = None) -> ExperimentConfig:
    """The base config with the sweep's overrides, the cell's axes and `extra` (command-line) overrides."""
    base = config_to_dict(load_config(sweep.base))
    overrides = {
        **sweep.overrides,
        **(extra or {}),
        "split.pipc": cell.pipc,
        "split.public_ratio": None,
        "distill.ipc": cell.ipc,
        "distill.method": cell.method,
        "distill.num_seeds": 1,
        "distill.enabled": False,
        "seed": cell.seed,
    }
    return build_config(base, overrides)


def cells(sweep: SweepConfig, extra: dict[str, Any] | None = None) -> tuple[list[Cell], list[tuple[Cell, str]]]:
    """The runnable cells and the (cell, reason) pairs whose config is invalid (e.g. ipc > pipc with real init)."""
    runnable, skipped = [], []
    for pipc in sweep.pipc:
        for ipc in sweep.ipc:
            for method in sweep.methods:
                for seed in sweep.seeds:
                    cell = Cell(pipc, ipc, method, seed)
                    try:
                        cell_config(sweep, cell, extra)
                    except ConfigError as err:
                        skipped.append((cell, str(err)))
                    else:
                        runnable.append(cell)
    return runnable, skipped


def edge_model_key(cfg: ExperimentConfig, federation_seed: int) -> str:
    """Everything that determines the received model: data, split, model, federation and the seed."""
    c = config_to_dict(cfg)
    ident = {k: c[k] for k in ("data", "split", "model", "federation")} | {"seed": federation_seed}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def edge_model(cfg: ExperimentConfig, federation_seed: int, cache: Path, console: Console) -> Path:
    """The received model for cfg's private split: from the cache, else trained by a Flower simulation."""
    path = cache / f"edge-pipc{cfg.split.pipc}-{edge_model_key(cfg, federation_seed)}.pt"
    if path.exists():
        return path
    from simulations.simulate import simulate  # Flower and Ray only when a model must be trained

    train_cfg = build_config(config_to_dict(cfg), {"seed": federation_seed})
    outcome = simulate(train_cfg, output_dir=cache / "federation", console=console)
    atomic_write(path, lambda tmp: shutil.copyfile(outcome.run_dir / "received_model.pt", tmp))
    return path


def run_cell(cfg: ExperimentConfig, model_path: Path, out_dir: Path) -> dict[str, Any]:
    """Distils and evaluates one cell with the cached edge model; returns run_distillation's summary."""
    from common.data import load_dataset, to_normalized_tensor
    from common.models import build_model
    from common.partition import make_split
    from server.distill.run import run_distillation

    dataset = load_dataset(cfg.data, cfg.seed if cfg.split.seed is None else cfg.split.seed)
    split = make_split(dataset.train.labels, cfg.split, cfg.seed)
    model = build_model(dataset.num_classes, width=cfg.model.width, depth=cfg.model.depth, norm=cfg.model.norm)
    model.load_state_dict(load_torch(model_path))
    return run_distillation(
        cfg,
        model,
        to_normalized_tensor(dataset.train.images[split.public]),
        torch.as_tensor(dataset.train.labels[split.public]),
        to_normalized_tensor(dataset.test.images),
        torch.as_tensor(dataset.test.labels),
        out_dir,
        show_progress=False,
        num_classes=dataset.num_classes,
    )


def collect(out_dir: Path) -> pd.DataFrame:
    """One row per finished cell, read from the cells' result.json files."""
    rows = []
    for result_file in sorted((out_dir / "cells").glob("*/result.json")):
        info = json.loads((result_file.parent / "cell.json").read_text())
        result = json.loads(result_file.read_text())
        accuracies = [float(a) for a in result["accuracies"]]
        rows.append({**info, "accuracy_mean": result["mean"], "accuracy_std": result["std"],
                     "num_evaluations": len(accuracies), "accuracies": json.dumps(accuracies)})
    return pd.DataFrame(rows, columns=["cell", "pipc", "ipc", "method", "seed", "accuracy_mean", "accuracy_std",
                                       "num_evaluations", "accuracies"])


def write_results(out_dir: Path) -> pd.DataFrame:
    table = collect(out_dir)
    atomic_write(out_dir / "results.csv", lambda tmp: table.to_csv(tmp, index=False))
    save_json(out_dir / "results.json", table.to_dict(orient="records"))
    return table


def run_sweep(
    sweep: SweepConfig, out_dir: Path, extra: dict[str, Any] | None = None, console: Console | None = None
) -> pd.DataFrame:
    """Runs every unfinished cell; returns the collected results table."""
    console = console or Console()
    out_dir = Path(out_dir).resolve()
    todo, skipped = cells(sweep, extra)
    save_json(out_dir / "sweep.json", sweep.model_dump(mode="json") | {"extra_overrides": extra or {}})
    for cell, reason in skipped:
        console.print(f"[yellow]skipped[/] {cell.name}: {reason}", highlight=False)
    finished = [c for c in todo if (out_dir / "cells" / c.name / "result.json").exists()]
    if finished:
        console.print(f"resuming: {len(finished)} of {len(todo)} cells already finished")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[current]}"))
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"sweep {sweep.name}", total=len(todo), completed=len(finished), current="")
        for cell in todo:
            cell_dir = out_dir / "cells" / cell.name
            if (cell_dir / "result.json").exists():
                continue
            progress.update(task, current=cell.name)
            cfg = cell_config(sweep, cell, extra)
            start = time.perf_counter()
            model_path = edge_model(cfg, sweep.seeds[0], out_dir / "edge_models", console)
            save_json(cell_dir / "cell.json", {"cell": cell.name, "pipc": cell.pipc, "ipc": cell.ipc,
                                               "method": cell.method, "seed": cell.seed,
                                               "edge_model": model_path.name})
            summary = run_cell(cfg, model_path, cell_dir)
            write_results(out_dir)
            progress.console.print(
                f"{cell.name}: {100 * summary['mean']:.2f} +- {100 * summary['std']:.2f} % "
                f"({time.perf_counter() - start:.0f} s)", highlight=False,
            )
            progress.advance(task)
    return write_results(out_dir)
