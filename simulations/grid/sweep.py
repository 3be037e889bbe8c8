"""A sweep grid: pipc x ipc x method x seed cells over one experiment config (configs/grids/, no `kind`).

    feddistill sweep --config tiny-sweep [--out DIR] [--workers N] [--address HOST:PORT] [key=value ...]

Each pipc has its own private split, hence its own received model: trained federatedly (Flower simulation) once and
kept under `<out>/edge_models/federation/` (simulations/grid/edge.py); every method and ipc of that pipc reuses it.
The cells run through the grid's pool and resume rule (simulations/grid/cells.py) into `<out>/cells/<cell>/`; after
every cell the collected results are rewritten to `<out>/results.csv` and `<out>/results.json`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from rich.console import Console

from common.atomic import atomic_write, save_json
from common.config import (
    NAME_PATTERN,
    SEED_LIMIT,
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    build_config,
    config_to_dict,
    load_config,
)
from common.methods import MethodName
from common.models import parse_architecture
from simulations.commands.progress import progress_for
from simulations.grid.cells import CellTask, GridCell, cell_name, check_cells, collect, is_finished, pinned_split, run_cells
from simulations.grid.edge import received_model
from simulations.grid.pool import open_pool
from simulations.grid.protocol import grid_path, read_grid, validation_error

COLUMNS = ["cell", "pipc", "ipc", "method", "seed", "accuracy_mean", "accuracy_std", "num_evaluations", "accuracies"]


class SweepConfig(BaseModel):
    """A YAML grid: the experiment config every cell starts from, then the axes."""

    model_config = ConfigDict(extra="forbid", strict=True)
    kind: Literal["sweep"] = "sweep"
    name: str = Field("sweep", pattern=f"^{NAME_PATTERN.pattern}$")  # names the sweep folder
    base: str = "quickstart"  # experiment config (name under configs/ or a path)
    overrides: dict[str, Any] = Field(default_factory=dict)  # dotted keys applied to the base
    pipc: list[int] = Field(min_length=1)
    ipc: list[int] = Field(min_length=1)
    methods: list[MethodName] = Field(min_length=1)
    seeds: list[Annotated[int, Field(ge=0, lt=SEED_LIMIT)]] = Field(default_factory=lambda: [0], min_length=1)
    # Architectures the synthetic sets are also evaluated on (feddistill evaluate --arch syntax), e.g.
    # [resnet18, "convnet:norm=batchnorm"]: each cell's cross_arch.json, a second table in the report.
    archs: list[str] = Field(default_factory=list)
    resources: dict[str, float] = Field(default_factory=dict)  # per cell on Ray, e.g. {num_cpus: 1, num_gpus: 0.5}

    @field_validator("archs")
    @classmethod
    def _known_archs(cls, archs: list[str]) -> list[str]:
        for spec in archs:
            parse_architecture(spec, ModelConfig())
        return archs


@dataclass(frozen=True)
class Cell:
    pipc: int
    ipc: int
    method: str
    seed: int

    @property
    def name(self) -> str:
        return cell_name(self.pipc, self.ipc, self.method, self.seed)


def load_sweep(name_or_path: str | Path) -> SweepConfig:
    path = grid_path(name_or_path)
    try:
        return SweepConfig.model_validate(read_grid(path))
    except ValidationError as err:
        raise validation_error(path, err) from None


def cell_config(sweep: SweepConfig, cell: Cell, extra: dict[str, Any] | None = None) -> ExperimentConfig:
    """The base config with the sweep's overrides, the cell's axes and `extra` (command-line) overrides, on the base
    config's split (grid.cells.pinned_split): all cells of a pipc distil from the public subset that the cached edge
    model's federation excluded."""
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
    }
    return build_config(base, {**overrides, "seed": cell.seed, **pinned_split(build_config(base, overrides))})


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


def federation_config(cfg: ExperimentConfig, federation_seed: int) -> ExperimentConfig:
    """The config a cell's edge model is trained with: the cell's, with the sweep's federation seed."""
    return build_config(config_to_dict(cfg), {"seed": federation_seed})


def write_results(out_dir: Path) -> pd.DataFrame:
    """<out>/results.csv and results.json: one row per finished cell, the sweep's columns."""
    table = collect(out_dir).reindex(columns=COLUMNS)
    atomic_write(out_dir / "results.csv", lambda tmp: table.to_csv(tmp, index=False))
    save_json(out_dir / "results.json", table.to_dict(orient="records"))
    return table


def run_sweep(sweep: SweepConfig, out_dir: Path, extra: dict[str, Any] | None = None, console: Console | None = None,
              progress_every: float = 30.0, workers: int = 1, address: str | None = None) -> pd.DataFrame:
    """Runs every unfinished cell (`workers` at a time, on Ray at `address` if given); returns the collected results.
    Outside a terminal, progress is a plain line per task at most every `progress_every` seconds."""
    console = console or Console()
    out_dir = Path(out_dir).resolve()
    todo, skipped = cells(sweep, extra)
    save_json(out_dir / "sweep.json", sweep.model_dump(mode="json") | {"extra_overrides": extra or {}})
    for cell, reason in skipped:
        console.print(f"[yellow]skipped[/] {cell.name}: {reason}", highlight=False)
    grid = [GridCell(c.name, cell_config(sweep, c, extra), {"pipc": c.pipc, "ipc": c.ipc, "method": c.method, "seed": c.seed})
            for c in todo]
    check_cells(out_dir, grid)  # before any work
    unfinished = [c for c in grid if not is_finished(out_dir, c)]
    if len(unfinished) < len(grid):
        console.print(f"resuming: {len(grid) - len(unfinished)} of {len(grid)} cells already finished")
    cache = out_dir / "edge_models" / "federation"
    tasks = []
    for cell in unfinished:
        run = received_model(federation_config(cell.cfg, sweep.seeds[0]), [cache], cache, console.print)
        model = run / "received_model.pt"
        tasks.append(CellTask(cell, out_dir / "cells" / cell.name, model, archs=tuple(sweep.archs),
                              info={"edge_model": os.path.relpath(model, out_dir)}, progress_every=progress_every))
    with progress_for(console, progress_every) as progress, \
            open_pool(min(workers, max(len(tasks), 1)), address, sweep.resources) as pool:
        task = f"sweep {sweep.name}"
        done = len(grid) - len(unfinished)
        progress.start(task, len(grid), done)
        start = time.perf_counter()

        def finished(out: Path) -> None:
            nonlocal done
            done += 1
            progress.advance(task, done, {"seconds": time.perf_counter() - start})
            write_results(out)

        run_cells(out_dir, tasks, pool, lambda line: console.print(line, highlight=False), finished)
        progress.finish(task)
    return write_results(out_dir)
