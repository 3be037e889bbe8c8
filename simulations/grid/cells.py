"""A grid's cells: one cell type, the resume rule, the function a worker runs, one collection of the results.

A cell is one `run_distillation` of one config into `<stage>/cells/<name>/` (result.json last, so a folder with
result.json is finished). A cell whose distillation diverges (non-finite losses or images) ends with failed.json
instead, naming the error; the other cells go on, and a failed cell counts as done until its failed.json is removed.
The resume rule: a finished or failed cell is kept as it is; before any work, every started cell's
folder is checked, and one that holds a run of another configuration is refused (ValueError naming the keys,
server.distill.artifacts.check_resumable); a started cell of the same configuration continues from its checkpoint.
After each cell the stage's results.csv is rewritten from every finished cell.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from common.atomic import atomic_write, save_json
from common.config import ExperimentConfig, config_to_dict
from common.holdings import split_seed
from simulations.grid.pool import Pool

EVALUATION_SPLITS = ("test", "validation")
FAILED = "failed.json"


@dataclass(frozen=True)
class GridCell:
    """One cell: its folder name, its config and its columns in the results (pipc, ipc, method, seed, ...)."""

    name: str
    cfg: ExperimentConfig
    columns: dict[str, Any]


def cell_name(pipc: int, ipc: int, variant: str, seed: int) -> str:
    return f"pipc{pipc}-ipc{ipc}-{variant.replace('+', '_').replace('@', '-at-')}-seed{seed}"


def pinned_split(base: ExperimentConfig) -> dict[str, int]:
    """The override that keeps a cell on its grid's split whatever its seed: split.seed = the base config's split seed,
    so a cell's seed varies only the distillation and the evaluation."""
    return {"split.seed": split_seed(base)}


@dataclass(frozen=True)
class CellTask:
    """What a worker needs to run a cell, picklable: the cell, its folder, the received model, the evaluation split."""

    cell: GridCell
    cell_dir: Path
    model: Path | None
    evaluate_on: str = "test"  # or "validation": the test split is then never read
    deadline: float = float("inf")  # time.time() after which the cell is not started
    threads: int | None = None  # torch threads in the worker
    archs: tuple[str, ...] = ()  # architectures the set is also evaluated on (cross_arch.json)
    info: dict[str, Any] = field(default_factory=dict)  # more cell.json fields
    progress_every: float = 120.0


def run_task(task: CellTask) -> dict[str, Any] | None:
    """Runs one cell in whichever process the pool chose; None when the deadline passed before it started."""
    if time.time() > task.deadline:
        return None
    import torch

    from common.progress import LineProgress
    from common.runtime import describe_machine, git_commit, pick_device
    from server.distill.methods import DistillDiverged
    from server.distill.run import run_distillation
    from server.server_data import distill_inputs

    if task.threads:
        torch.set_num_threads(task.threads)
    cfg, start = task.cell.cfg, time.perf_counter()
    inputs = distill_inputs(cfg, task.evaluate_on, task.model)
    save_json(task.cell_dir / "cell.json", cell_info(task.cell_dir, task.cell.name, {**task.cell.columns, **task.info},
                                                     describe_machine(pick_device(cfg.device))))
    try:
        result = run_distillation(cfg, inputs.model, inputs.public_x, inputs.public_y, inputs.eval_x, inputs.eval_y,
                                  task.cell_dir, inputs.normalization, num_classes=inputs.num_classes,
                                  progress=LineProgress(interval=task.progress_every))
    except DistillDiverged as err:
        save_json(task.cell_dir / FAILED, {"cell": task.cell.name, "error": str(err), "commit": git_commit()})
        return {"cell": task.cell.name, "failed": str(err)}
    if task.archs:
        from simulations.grid.cross_arch import cross_arch

        cross_arch(cfg, task.cell_dir, task.archs, inputs)
    return {"cell": task.cell.name, "mean": result["mean"], "std": result["std"], "seconds": time.perf_counter() - start}


def cell_info(cell_dir: Path, name: str, columns: dict[str, Any], here: str) -> dict[str, Any]:
    """cell.json: the cell's columns and the machine it started on; a cell continued elsewhere (from its checkpoint)
    also names where it was finished."""
    started = cell_dir / "cell.json"
    info = {"cell": name, **columns, "machine": here}
    if started.is_file():
        first = json.loads(started.read_text()).get("machine", here)
        info = {**info, "machine": first, **({"finished_on": here} if first != here else {})}
    return info


def check_cells(stage_dir: Path, cells: Iterable[GridCell]) -> None:
    """The resume rule, before any work: ValueError naming the folder and the keys when the folder of a started,
    unfinished cell holds a run of another configuration."""
    from server.distill.artifacts import check_resumable

    for cell in cells:
        if not is_finished(stage_dir, cell):
            check_resumable(stage_dir / "cells" / cell.name, config_to_dict(cell.cfg))


def is_finished(stage_dir: Path, cell: GridCell) -> bool:
    """Done: its result.json, or the failed.json of a diverged distillation."""
    folder = stage_dir / "cells" / cell.name
    return (folder / "result.json").is_file() or (folder / FAILED).is_file()


def failed_cells(stage_dir: Path) -> dict[str, str]:
    """The cells whose distillation diverged: name -> error."""
    return {p.parent.name: json.loads(p.read_text())["error"] for p in sorted((stage_dir / "cells").glob(f"*/{FAILED}"))}


def run_cells(stage_dir: Path, tasks: Sequence[CellTask], pool: Pool, log: Callable[[str], None],
              write: Callable[[Path], Any]) -> bool:
    """Runs `tasks` (unfinished cells of one stage) through `pool`, calling `write(stage_dir)` after each finished
    cell; False when some did not finish: the deadline stopped them before they started, or their worker was lost
    (a Ray pool yields the error, e.g. ActorUnavailableError; the cell resumes from its checkpoint on the next run)."""
    complete = True
    for outcome in pool.imap_unordered(run_task, tasks):
        if outcome is None:
            complete = False
            continue
        if isinstance(outcome, BaseException):
            complete = False
            detail = " ".join(str(outcome).split())[:200]
            log(f"a worker was lost ({type(outcome).__name__}: {detail}); its cell stays unfinished and continues from "
                "its checkpoint when the command runs again")
            continue
        write(stage_dir)
        if "failed" in outcome:
            log(f"{outcome['cell']}: FAILED, {outcome['failed']} (recorded in its {FAILED}; remove that file to run the "
                "cell again)")
            continue
        log(f"{outcome['cell']}: {100 * outcome['mean']:.2f} ± {100 * outcome['std']:.2f} % "
            f"({outcome['seconds']:.0f} s)")
    return complete


def collect(stage_dir: Path) -> pd.DataFrame:
    """One row per finished cell: cell.json's fields, the accuracies and the timings (read from result.json)."""
    rows = []
    for result_file in sorted((stage_dir / "cells").glob("*/result.json")):
        info = json.loads((result_file.parent / "cell.json").read_text())
        result = json.loads(result_file.read_text())
        rows.append({**info, "accuracy_mean": result["mean"], "accuracy_std": result["std"],
                     "num_evaluations": len(result["accuracies"]), "accuracies": json.dumps(result["accuracies"]),
                     "distill_s": result["timings"]["distill_s"], "evaluate_s": result["timings"]["evaluate_s"]})
    return pd.DataFrame(rows)


def write_results(stage_dir: Path) -> pd.DataFrame:
    """<stage>/results.csv: every finished cell, in the layout simulations/reports/report.py reads."""
    frame = collect(stage_dir)
    atomic_write(stage_dir / "results.csv", lambda tmp: frame.to_csv(tmp, index=False))
    return frame
