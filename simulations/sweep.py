"""The split-ratio benchmark: pipc x ipc x method x seed cells over one experiment config.

    feddistill sweep --config tiny [--out DIR] [key=value ...]   (grids under configs/sweeps/)

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from rich.console import Console

from common.atomic import atomic_write, load_torch, save_json
from common.config import (
    CONFIG_DIR,
    NAME_PATTERN,
    SEED_LIMIT,
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    build_config,
    config_to_dict,
    load_config,
    resolve_config_path,
)
from common.holdings import split_seed
from common.methods import MethodName
from common.models import parse_architecture
from common.progress import Progress
from simulations.progress import progress_for

SWEEP_DIR = CONFIG_DIR / "sweeps"
CROSS_ARCH = "cross_arch.json"


class SweepConfig(BaseModel):
    """A YAML grid: the experiment config every cell starts from, then the axes."""

    model_config = ConfigDict(extra="forbid", strict=True)
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
    """The base config with the sweep's overrides, the cell's axes and `extra` (command-line) overrides.

    Every cell keeps the base config's split seed (`split.seed` is pinned), so a cell's seed varies only the
    distillation and the evaluation: all cells of a pipc distil from the public subset that the cached edge
    model's federation excluded.
    """
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
    base_split_seed = split_seed(build_config(base, overrides))
    return build_config(base, {**overrides, "seed": cell.seed, "split.seed": base_split_seed})


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
    """The config a cell's edge model is trained with: the cell's, with the sweep's federation seed.

    The split seed is pinned in every cell (`cell_config`), so the federation holds out exactly the public subset
    that the cell distils from.
    """
    return build_config(config_to_dict(cfg), {"seed": federation_seed})


def edge_model_key(train_cfg: ExperimentConfig) -> str:
    """Everything that determines the received model: data, split, model, federation and the seed. A nested split
    (split.private_pipc) trains on the private pool of pipc=private_pipc, so it has that split's key."""
    c = config_to_dict(train_cfg)
    ident = {k: c[k] for k in ("data", "split", "model", "federation", "seed")}
    private_pipc = ident["split"].pop("private_pipc")
    if private_pipc is not None:
        ident["split"]["pipc"] = private_pipc
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def edge_model(train_cfg: ExperimentConfig, cache: Path, console: Console) -> Path:
    """The received model of `train_cfg`'s federation: from the cache, else trained by a Flower simulation."""
    path = cache / f"edge-pipc{train_cfg.split.pipc}-{edge_model_key(train_cfg)}.pt"
    if path.exists():
        return path
    from simulations.simulate import simulate  # Flower and Ray only when a model must be trained

    outcome = simulate(train_cfg, output_dir=cache / "federation", console=console)
    atomic_write(path, lambda tmp: shutil.copyfile(outcome.run_dir / "received_model.pt", tmp))
    return path


def run_cell(
    cfg: ExperimentConfig, model_path: Path, out_dir: Path, progress: Progress | None = None, archs: Sequence[str] = ()
) -> dict[str, Any]:
    """Distils and evaluates one cell with the cached edge model, then on each of `archs` (cross_arch.json);
    returns run_distillation's summary."""
    from common.data import to_normalized_tensor
    from common.holdings import decide_holdings, load_experiment_data
    from common.models import model_from_config
    from server.distill.run import run_distillation

    dataset = load_experiment_data(cfg)
    public = decide_holdings(cfg, dataset.train.labels).public
    model = model_from_config(cfg.model, dataset.num_classes, dataset.channels, dataset.image_size)
    model.load_state_dict(load_torch(model_path))
    norm = dataset.normalization
    test_x, test_y = to_normalized_tensor(dataset.test.images, norm), torch.as_tensor(dataset.test.labels)
    summary = run_distillation(
        cfg,
        model,
        to_normalized_tensor(dataset.train.images[public], norm),
        torch.as_tensor(dataset.train.labels[public]),
        test_x,
        test_y,
        out_dir,
        norm,
        num_classes=dataset.num_classes,
        progress=progress,
    )
    if archs:
        cross_arch(cfg, out_dir, archs, test_x, test_y, dataset.num_classes)
    return summary


def cross_arch(cfg: ExperimentConfig, out_dir: Path, archs: Sequence[str], test_x: torch.Tensor, test_y: torch.Tensor,
               num_classes: int) -> dict[str, Any]:
    """The cell's synthetic set (seed_0) trained on each architecture with the cell's protocol and evaluation
    seeds; out_dir/cross_arch.json (archs already there are kept)."""
    from common.runtime import pick_device
    from server.distill.artifacts import load_synthetic
    from server.distill.evaluate import evaluate_synthetic, mean_std
    from server.distill.run import eval_seeds

    path = out_dir / CROSS_ARCH
    done = json.loads(path.read_text()) if path.is_file() else {}
    syn = load_synthetic(out_dir / "seed_0")
    for spec in archs:
        if spec in done:
            continue
        accuracies = evaluate_synthetic(syn.images, syn.labels, test_x, test_y, cfg.evaluation,
                                        parse_architecture(spec, cfg.model), eval_seeds(cfg.seed, cfg.evaluation.num_nets),
                                        pick_device(cfg.device), num_classes, cfg.distill.dsa_strategy)
        mean, std = mean_std(accuracies)
        done[spec] = {"accuracies": accuracies, "mean": mean, "std": std}
        save_json(path, done)
    return done


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
    sweep: SweepConfig, out_dir: Path, extra: dict[str, Any] | None = None, console: Console | None = None,
    progress_every: float = 30.0,
) -> pd.DataFrame:
    """Runs every unfinished cell; returns the collected results table. Outside a terminal, progress is a plain
    line per task at most every `progress_every` seconds."""
    console = console or Console()
    out_dir = Path(out_dir).resolve()
    todo, skipped = cells(sweep, extra)
    save_json(out_dir / "sweep.json", sweep.model_dump(mode="json") | {"extra_overrides": extra or {}})
    for cell, reason in skipped:
        console.print(f"[yellow]skipped[/] {cell.name}: {reason}", highlight=False)
    from server.distill.artifacts import check_resumable

    for cell in todo:  # a started or finished cell counts only for the same configuration: refused before any work
        check_resumable(out_dir / "cells" / cell.name, config_to_dict(cell_config(sweep, cell, extra)))
    finished = [c for c in todo if (out_dir / "cells" / c.name / "result.json").exists()]
    if finished:
        console.print(f"resuming: {len(finished)} of {len(todo)} cells already finished")
    with progress_for(console, progress_every) as progress:
        task = f"sweep {sweep.name}"
        progress.start(task, len(todo), len(finished))
        done = len(finished)
        for cell in todo:
            cell_dir = out_dir / "cells" / cell.name
            if (cell_dir / "result.json").exists():
                continue
            cfg = cell_config(sweep, cell, extra)
            start = time.perf_counter()
            model_path = edge_model(federation_config(cfg, sweep.seeds[0]), out_dir / "edge_models", console)
            save_json(cell_dir / "cell.json", {"cell": cell.name, "pipc": cell.pipc, "ipc": cell.ipc,
                                               "method": cell.method, "seed": cell.seed,
                                               "edge_model": model_path.name})
            summary = run_cell(cfg, model_path, cell_dir, progress, sweep.archs)
            write_results(out_dir)
            done += 1
            progress.advance(task, done, {"last_accuracy": 100 * summary["mean"], "seconds": time.perf_counter() - start})
            console.print(f"{cell.name}: {100 * summary['mean']:.2f} +- {100 * summary['std']:.2f} % "
                          f"({time.perf_counter() - start:.0f} s)", highlight=False)
        progress.finish(task)
    return write_results(out_dir)
