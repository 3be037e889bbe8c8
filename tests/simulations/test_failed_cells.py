"""A cell whose distillation diverges is recorded as failed (failed.json, the report) and the grid goes on."""

from __future__ import annotations

from common.atomic import save_torch
from common.config import build_config, config_to_dict
from common.models import model_from_config
from simulations.grid.cells import FAILED, CellTask, GridCell, failed_cells, is_finished, run_cells, run_task
from simulations.grid.pool import SerialPool
from simulations.grid.report import failed_statement
from simulations.grid.sweep import cell_config, cells, load_sweep


def test_a_diverged_cell_is_recorded_as_failed_and_the_others_run(tmp_path):
    sweep = load_sweep("tiny-sweep")
    random_cell, dm_cell = cells(sweep)[0][:2]
    diverging = build_config(config_to_dict(cell_config(sweep, dm_cell)), {"distill.lr_img": 1e38})
    grid = [GridCell(dm_cell.name, diverging, {"method": "dm"}),
            GridCell(random_cell.name, cell_config(sweep, random_cell), {"method": "random"})]
    model = tmp_path / "model.pt"
    save_torch(model, model_from_config(grid[0].cfg.model, 10, 3, 32).state_dict())
    stage = tmp_path / "stage"
    lines: list[str] = []
    complete = run_cells(stage, [CellTask(c, stage / "cells" / c.name, model, threads=1) for c in grid], SerialPool(),
                         lines.append, lambda _: None)

    assert complete and all(is_finished(stage, c) for c in grid)
    assert (stage / "cells" / random_cell.name / "result.json").is_file()
    failed = failed_cells(stage)
    assert list(failed) == [dm_cell.name] and "not finite" in failed[dm_cell.name]
    assert not (stage / "cells" / dm_cell.name / "result.json").exists()
    assert any(line.startswith(f"{dm_cell.name}: FAILED") and FAILED in line for line in lines)
    assert dm_cell.name in failed_statement(stage) and failed_statement(tmp_path / "none") is None
    # Done until its failed.json is removed: then the cell runs again (and fails again, the same way).
    (stage / "cells" / dm_cell.name / FAILED).unlink()
    assert not is_finished(stage, grid[0])
    assert run_task(CellTask(grid[0], stage / "cells" / dm_cell.name, model, threads=1))["failed"] == failed[dm_cell.name]


class _PoolThatLosesItsFirstWorker:
    """A Ray pool's behaviour when an actor dies (seen 2026-12-03: a stopped worker): the task's error is yielded."""

    def imap_unordered(self, func, iterable):
        tasks = list(iterable)
        yield RuntimeError("The actor died unexpectedly\nbefore finishing this task")
        yield from map(func, tasks[1:])


def test_a_lost_worker_leaves_its_cell_unfinished_and_the_others_run(tmp_path):
    sweep = load_sweep("tiny-sweep")
    grid = [GridCell(c.name, cell_config(sweep, c), {"method": c.method}) for c in cells(sweep)[0][:2]]
    model = tmp_path / "model.pt"
    save_torch(model, model_from_config(grid[0].cfg.model, 10, 3, 32).state_dict())
    stage = tmp_path / "stage"
    lines: list[str] = []
    complete = run_cells(stage, [CellTask(c, stage / "cells" / c.name, model, threads=1) for c in grid],
                         _PoolThatLosesItsFirstWorker(), lines.append, lambda _: None)

    assert not complete  # the stage says so; the command's next run continues it
    assert not is_finished(stage, grid[0]) and is_finished(stage, grid[1])
    lost = [line for line in lines if line.startswith("a worker was lost")]
    assert lost == ["a worker was lost (RuntimeError: The actor died unexpectedly before finishing this task); its "
                    "cell stays unfinished and continues from its checkpoint when the command runs again"]
