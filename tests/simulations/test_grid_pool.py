"""One pool interface for a grid's cells: in this process, on local processes (no Ray) and on Ray, the same results."""

from __future__ import annotations

import math

import pytest

from common.atomic import save_torch
from common.models import model_from_config
from simulations.grid.cells import CellTask, GridCell, run_task
from simulations.grid.pool import SerialPool, open_pool
from simulations.grid.sweep import cell_config, cells, load_sweep


def test_one_worker_runs_in_this_process_and_a_cluster_needs_ray():
    with open_pool(1) as pool:
        assert isinstance(pool, SerialPool) and list(pool.imap_unordered(math.factorial, [3, 4])) == [6, 24]
    with pytest.raises(ValueError, match="needs Ray"), open_pool(2, address="10.0.0.1:6379", use_ray=False):
        pass
    with pytest.raises(ValueError, match="workers=0"), open_pool(0):
        pass


@pytest.mark.slow
def test_cells_on_local_processes_give_the_serial_results(tmp_path):
    """Without Ray: two cells of the tiny sweep in two spawned processes, then again in this process."""
    sweep = load_sweep("tiny-sweep")
    grid = [GridCell(c.name, cell_config(sweep, c), {"pipc": c.pipc}) for c in cells(sweep)[0][:2]]
    model = tmp_path / "model.pt"
    save_torch(model, model_from_config(grid[0].cfg.model, 10, 3, 32).state_dict())
    results = {}
    for kind, workers in (("processes", 2), ("serial", 1)):
        tasks = [CellTask(cell, tmp_path / kind / cell.name, model, threads=1) for cell in grid]
        with open_pool(workers, use_ray=False) as pool:
            assert isinstance(pool, SerialPool) == (workers == 1)
            results[kind] = {r["cell"]: (r["mean"], r["std"]) for r in pool.imap_unordered(run_task, tasks)}
    assert results["processes"] == results["serial"] and len(results["serial"]) == 2
