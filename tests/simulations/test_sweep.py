"""The sweep: killed after its first cell, resumed, every cell in the final table exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from simulations.grid.sweep import Cell, cells, load_sweep
from simulations.reports.report import markdown_table, render

ROOT = Path(__file__).resolve().parents[2]


# 100 evaluation epochs put 1.4-1.9 s between one cell's result.json and the next (2 epochs: 0.3-0.5 s), so the kill
# after the first lands before the last even when the polling test is starved of CPU; the resume runs the same config
EPOCHS = 100


def _sweep_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "simulations.cli", "sweep", "--config", "tiny-sweep", "--out", str(out),
            f"evaluation.epochs={EPOCHS}"]


def test_grid_expands_and_invalid_cells_are_reported():
    sweep = load_sweep("tiny-sweep")
    runnable, skipped = cells(sweep)
    assert [c.name for c in runnable] == [
        "pipc2-ipc1-random-seed0", "pipc2-ipc1-dm-seed0", "pipc4-ipc1-random-seed0", "pipc4-ipc1-dm-seed0",
    ]
    assert skipped == []
    too_many = sweep.model_copy(update={"ipc": [1, 3]})
    runnable, skipped = cells(too_many)
    assert len(runnable) == 6
    assert {c for c, _ in skipped} == {Cell(2, 3, "random", 0), Cell(2, 3, "dm", 0)}
    assert all("distill.ipc=3" in reason for _, reason in skipped)


@pytest.mark.slow
def test_killed_sweep_resumes_and_finishes_every_cell_once(tmp_path):
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(_sweep_command(out), cwd=tmp_path, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # the two 1-round federations come first: 30 s on 2 quiet cores, 6 minutes with two busy threads beside them
        deadline = time.monotonic() + 600
        while not list((out / "cells").glob("*/result.json")):
            assert first.poll() is None, "the sweep exited before finishing a cell"
            assert time.monotonic() < deadline, "no cell finished within 600 s"
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the sweep and its Ray workers
        first.wait()
    done_before = {p.parent.name for p in (out / "cells").glob("*/result.json")}
    assert 1 <= len(done_before) < 4

    resumed = subprocess.run(_sweep_command(out), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming: {len(done_before)} of 4 cells already finished" in resumed.stdout

    table = pd.read_csv(out / "results.csv")
    assert sorted(table["cell"]) == sorted(c.name for c in cells(load_sweep("tiny-sweep"))[0])
    assert table["cell"].is_unique
    assert table["accuracy_mean"].between(0, 1).all()
    # one received model per private split, named in each cell.json
    models = sorted((out / "edge_models" / "federation").glob("*/received_model.pt"))
    assert len(models) == 2
    assert {json.loads(p.read_text())["edge_model"] for p in (out / "cells").glob("*/cell.json")} == {
        str(m.relative_to(out)) for m in models}

    markdown = markdown_table(table)
    assert markdown.count("\n| 1 | ") == 2  # one row per (ipc, pipc)
    written = render(out)
    assert {"table", "plot", "figure2", "curves"} <= set(written) and all(p.stat().st_size > 0 for p in written.values())
    assert f"Protocol: 2 distillation iterations, {EPOCHS} evaluation epochs" in written["table"].read_text()


def test_a_cell_is_also_evaluated_on_the_sweeps_other_architectures(tmp_path):
    from common.atomic import save_torch
    from common.holdings import load_experiment_data
    from common.models import model_from_config
    from simulations.grid.cells import CellTask, GridCell, run_task
    from simulations.grid.cross_arch import CROSS_ARCH
    from simulations.grid.sweep import cell_config, write_results

    sweep = load_sweep("tiny-sweep").model_copy(update={"archs": ["convnet:norm=batchnorm", "convnet:width=16,depth=2"]})
    cell = cells(sweep)[0][1]  # dm, pipc 2
    cfg = cell_config(sweep, cell)
    dataset = load_experiment_data(cfg)
    save_torch(tmp_path / "model.pt", model_from_config(cfg.model, 10, 3, 32).state_dict())
    cell_dir = tmp_path / "cells" / cell.name
    columns = {"pipc": cell.pipc, "ipc": cell.ipc, "method": cell.method, "seed": cell.seed}
    run_task(CellTask(GridCell(cell.name, cfg, columns), cell_dir, tmp_path / "model.pt", archs=tuple(sweep.archs)))
    cross = json.loads((cell_dir / CROSS_ARCH).read_text())
    assert set(cross) == set(sweep.archs) and all(len(v["accuracies"]) == cfg.evaluation.num_nets for v in cross.values())
    write_results(tmp_path)
    table = render(tmp_path)["table"].read_text()
    assert "Cross-architecture evaluation" in table and "convnet:norm=batchnorm" in table
    assert dataset.num_classes == 10


@pytest.mark.parametrize("text, words", [
    ("name: ../../escape\npipc: [2]\nipc: [1]\nmethods: [dm]\n", "name: String should match pattern"),
    ("name: ok\npipc: [2]\nipc: [1]\nmethods: [dm]\nseeds: [-1]\n", "seeds.0: Input should be greater than or equal to 0"),
    ("pipc: [2\n", "cannot be read as YAML"),
    ("pipc: [2]\nipc: [1]\nmethods: [dm]\narchs: [vgg16]\n", "archs: Value error, --arch 'vgg16'"),
])
def test_a_bad_sweep_file_is_one_config_error_naming_the_key(tmp_path, text, words):
    from common.config import ConfigError

    path = tmp_path / "grid.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="^grid .*grid.yaml: ") as info:
        load_sweep(str(path))
    assert words in str(info.value) and "\n" not in str(info.value)


def test_a_sweep_rerun_with_other_overrides_refuses_its_started_cells_before_any_work(tmp_path):
    from common.atomic import save_json
    from common.config import config_hash, config_to_dict
    from simulations.grid.sweep import cell_config, run_sweep

    sweep = load_sweep("tiny-sweep")
    cell = cells(sweep)[0][0]
    recorded = config_to_dict(cell_config(sweep, cell))
    save_json(tmp_path / "cells" / cell.name / "seed_0" / "synthetic.json",
              {"config": recorded, "config_sha256": config_hash(recorded), "method": cell.method, "seed": 0})
    with pytest.raises(ValueError, match=r"holds a run of another configuration \(distill.lr_img: 1.0 -> 0.5\)"):
        run_sweep(sweep, tmp_path, {"distill.lr_img": 0.5})
    assert not (tmp_path / "edge_models").exists()  # refused before training any edge model
