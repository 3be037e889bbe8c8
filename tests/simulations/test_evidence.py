"""The evidence protocol end to end on generated data: edge model, calibration on validation only, table, report;
its cells on Ray give the serial run's results."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager

import pandas as pd
import pytest
import yaml

import simulations.evidence as evidence
from common.config import ConfigError
from common.data import Dataset, ImageArrays
from common.holdings import load_experiment_data
from server.server_data import distill_inputs
from simulations.cli import main as cli_main
from simulations.grid import stages
from simulations.grid.protocol import GRID_DIR, VARIANTS, TableFilter, base_config, cell_config, load_protocol, table_cells


@pytest.mark.slow
def test_tiny_protocol_runs_every_stage_resumes_and_reports(tmp_path, monkeypatch):
    out = tmp_path / "evidence"
    assert evidence.main(["--preset", "tiny", "--out", str(out), "--threads", "1"]) == 0
    edge = json.loads((out / "edge_model.json").read_text())
    assert edge["rounds"] == 1 and 0 <= edge["test_accuracy"] <= 1
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["chosen_dkkt_ratio"] in load_protocol("tiny").ratio_grid
    assert "validation" in calibration["evaluated_on"]
    balance = json.loads((out / "balance.json").read_text())
    assert [r["ipc"] for r in balance["results"]] == [1, 2]
    results = pd.read_csv(out / "results.csv")
    # ipc 1: 5 variants x 2 seeds; ipc 2 (single seed): 2 variants
    assert len(results) == 5 * 2 + 2
    assert set(results["method"]) == {"random", "dm", "dm+dkkt", "dm@lambda", "dm+dkkt@late"}
    table = (out / "table.md").read_text()
    assert "Preset `tiny`" in table and "dkkt_ratio" in table and "evaluation epochs" not in table.split("\n")[0]
    assert "`dm+dkkt@late` = dm+dkkt with dkkt_from=0.5" in table
    assert "Bytes received: recorded in" in table  # the federation counted its bytes
    late = out / "table/cells/pipc2-ipc1-dm_dkkt-at-late-seed0/seed_0/history.jsonl"
    late_lines = [json.loads(x) for x in late.read_text().splitlines()]  # 4 iterations: DKKT joins at the 3rd
    assert "share_dkkt" not in late_lines[0] and 0 < late_lines[1]["share_dkkt"] < 1
    for name in ("accuracy.png", "loss_terms.png", "figures/figure2.png"):
        assert (out / name).stat().st_size > 0
    history = out / "table/cells/pipc2-ipc1-dm_dkkt-seed0/seed_0/history.jsonl"
    lines = [json.loads(x) for x in history.read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [2, 4] and all(0 < x["share_dkkt"] < 1 for x in lines)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    assert evidence.main(["--preset", "tiny", "--out", str(out), "--threads", "1"]) == 0  # resumes: nothing reruns
    assert {p: p.stat().st_mtime_ns for p in out.rglob("result.json")} == before

    # --workers 2 (on a local Ray) on the same received model: the same cells with the same accuracies as the serial run.
    parallel = tmp_path / "parallel"
    shutil.copytree(out / "edge", parallel / "edge")
    pools = []
    opened = stages.open_pool

    @contextmanager
    def recorded(*args, **kwargs):
        with opened(*args, **kwargs) as pool:
            pools.append(type(pool).__module__)
            yield pool

    monkeypatch.setattr(stages, "open_pool", recorded)
    assert evidence.main(["--preset", "tiny", "--out", str(parallel), "--threads", "1", "--workers", "2",
                          "--stages", "calibrate", "table", "report"]) == 0
    assert json.loads((parallel / "calibration.json").read_text()) == calibration
    assert pools == ["ray.util.multiprocessing.pool"] * 2  # calibrate and table
    serial_rows = results.set_index("cell")["accuracies"].to_dict()
    assert pd.read_csv(parallel / "results.csv").set_index("cell")["accuracies"].to_dict() == serial_rows
    cell = json.loads((parallel / "table/cells/pipc2-ipc1-dm-seed0/cell.json").read_text())
    assert cell["machine"].startswith("CPU:") and "finished_on" not in cell


def test_calibration_evaluates_on_the_validation_slice_and_never_reads_the_test_set(monkeypatch, tmp_path):
    protocol = load_protocol("tiny")
    seen = {}

    def fake_run_stage(ctx, stage, cells, model, evaluate_on):
        seen.update(stage=stage, evaluate_on=evaluate_on, cells=len(cells))
        raise stages.CellsUnfinished

    monkeypatch.setattr(stages, "run_stage", fake_run_stage)
    with pytest.raises(stages.CellsUnfinished):
        stages.calibrate_stage(stages.Context(protocol, tmp_path), {}, tmp_path / "model.pt")
    assert seen == {"stage": "calibration", "evaluate_on": "validation", "cells": 3}
    cfg = base_config(protocol, {})
    dataset = load_experiment_data(cfg)
    no_test = Dataset(dataset.name, dataset.classes, dataset.train, ImageArrays(dataset.test.images[:0], dataset.test.labels[:0]),
                      dataset.normalization)
    inputs = distill_inputs(cfg, "validation", dataset=no_test)  # what a calibration cell evaluates on
    assert len(inputs.eval_y) == 2 * dataset.num_classes and len(inputs.public_y) == 2 * dataset.num_classes
    with pytest.raises(ConfigError, match="never evaluates on the test set"):
        stages.calibrate_stage(stages.Context(protocol, tmp_path), {"split.validation_per_class": 0}, tmp_path / "model.pt")


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_every_cell_of_the_real_presets_is_a_valid_config_on_one_split(preset):
    protocol = load_protocol(preset)
    extra = {"device": "cpu", "data.name": "tiny", "data.tiny_per_class": 300, "split.num_clients": 3}  # no data needed
    cells = table_cells(protocol, extra, ratio=0.3)
    base = base_config(protocol, extra)
    assert {c.cfg.split.seed for c in cells} == {base.seed}
    assert {c.cfg.split.pipc for c in cells} == {50}
    assert {c.cfg.distill.dkkt_ratio for c in cells} == {0.3}
    assert len({c.name for c in cells}) == len(cells)


def test_command_line_overrides_win_over_the_preset() -> None:
    """key=value on the command line (e.g. device=cpu to finish a GPU preset's cells elsewhere) beats the preset's
    own overrides and its per-ipc scale in every cell."""
    protocol = load_protocol("gpu")
    cfg = cell_config(protocol, {"device": "cpu", "distill.iterations": 7}, VARIANTS["dm"], 10, 0)
    assert (cfg.device, cfg.distill.iterations, cfg.distill.ipc) == ("cpu", 7, 10)
    assert cell_config(protocol, {}, VARIANTS["dm"], 10, 0).device == "cuda"


@pytest.mark.slow
def test_split_ratio_protocol_nests_pipcs_on_one_model_chooses_dm_iterations_on_validation_and_reuses_cells(tmp_path):
    out = tmp_path / "split"
    assert evidence.main(["--preset", "tiny-split", "--out", str(out), "--threads", "1"]) == 0
    results = pd.read_csv(out / "results.csv")
    assert sorted(set(results["pipc"])) == [1, 2, 3]
    # dm@conv is missing where ipc = pipc (DM's loss is 0 there); the ablations only at their pipc
    assert set(results[results["method"] == "dm@conv"]["pipc"]) == {2, 3}
    assert set(results[results["method"].isin(["dm+primal", "dm+stat"])]["pipc"]) == {2}
    curve = json.loads((out / "curve.json").read_text())
    chosen = curve["converged_iterations"]["1"]
    assert chosen in (2, 4, 6) and "validation" in curve["evaluated_on"] and len(curve["points"]) == 3
    conv = json.loads((out / "table/cells/pipc3-ipc1-dm-at-conv-seed0/result.json").read_text())
    assert conv["config"]["distill"]["iterations"] == chosen
    primal = json.loads((out / "table/cells/pipc2-ipc1-dm_primal-seed0/result.json").read_text())
    assert primal["config"]["distill"]["stat_weight"] == 0.0
    table = (out / "table.md").read_text()
    assert "pipc 1, 2, 3 public images per class, nested" in table and "chosen on DM's validation curve" in table
    assert "− dm@conv" in table
    for name in ("accuracy_vs_pipc.png", "dm_curve.png"):
        assert (out / name).stat().st_size > 0
    # One received model for every pipc: a single federation under edge/
    assert len(list((out / "edge").glob("*/received_model.pt"))) == 1

    # Another protocol reusing this one (a grid file of its own, run by feddistill sweep): its matching cells are
    # taken (results, not the sets), the rest run.
    evidence_grid = tmp_path / "grid" / "tiny-split.yaml"
    evidence_grid.parent.mkdir()
    evidence_grid.write_text(yaml.safe_dump({**yaml.safe_load((GRID_DIR / "tiny-split.yaml").read_text()), "reuse": str(out)}))
    again = tmp_path / "again"
    assert cli_main(["sweep", "--config", str(evidence_grid), "--out", str(again), "--threads", "1", "--stages", "edge",
                     "calibrate", "table", "report", "--variants", "random", "dm", "--pipcs", "2", "--seeds", "0"]) == 0
    # the filter took exactly the cells it names
    assert sorted(p.name for p in (again / "table/cells").iterdir()) == ["pipc2-ipc1-dm-seed0", "pipc2-ipc1-random-seed0"]
    cell = again / "table/cells/pipc2-ipc1-dm-seed0"
    assert json.loads((cell / "cell.json").read_text())["reused_from"] and not (cell / "seed_0/synthetic.pt").exists()
    reused = json.loads((out / "table/cells/pipc2-ipc1-dm-seed0/result.json").read_text())
    assert json.loads((cell / "result.json").read_text()) == reused
    from simulations.reports.report import set_dir
    assert (set_dir(cell) / "seed_0/synthetic.pt").is_file()
    assert not (again / "edge").exists()  # the received model was found in the reused folder


def test_table_filter_keeps_what_it_names():
    only = TableFilter(variants=("dm",), pipcs=(10, 50), seeds=(1,))
    assert only.keeps({"method": "dm", "ipc": 10, "pipc": 50, "seed": 1})
    assert not only.keeps({"method": "dm", "ipc": 10, "pipc": 20, "seed": 1})
    assert not only.keeps({"method": "dm+dkkt", "ipc": 10, "pipc": 50, "seed": 1})
    assert TableFilter().keeps({"method": "x", "ipc": 1, "pipc": 5, "seed": 9})


def test_a_cell_is_reused_only_for_the_same_configuration_and_model_free_methods_ignore_the_partition():
    from common.config import config_to_dict, same_configuration
    from simulations.grid.protocol import model_independent_keys

    def cells(preset):
        return {c.name: c.cfg for c in table_cells(load_protocol(preset), {}, 1.0, {10: 300})}

    def reusable(old, new):
        return same_configuration(config_to_dict(old), config_to_dict(new), model_independent_keys(new))

    iid, non_iid = cells("split-ratio-cpu"), cells("split-ratio-cpu-dirichlet")
    for name in ("pipc10-ipc10-dm-seed0", "pipc50-ipc10-random-seed1", "pipc100-ipc10-dm-at-conv-seed2"):
        assert reusable(iid[name], non_iid[name])  # DM never reads the received model
    assert not reusable(iid["pipc10-ipc10-dm_dkkt-seed0"], non_iid["pipc10-ipc10-dm_dkkt-seed0"])
    assert not reusable(iid["pipc10-ipc10-dm-seed0"], iid["pipc20-ipc10-dm-seed0"])
    # A cell recorded before a key existed matches when the key is at its default (the old behaviour) ...
    old = config_to_dict(iid["pipc50-ipc10-dm_dkkt-seed0"])
    del old["distill"]["stat_weight"]
    assert same_configuration(old, config_to_dict(iid["pipc50-ipc10-dm_dkkt-seed0"]))
    # ... and not when the new cell sets it otherwise.
    assert not same_configuration(old, config_to_dict(iid["pipc50-ipc10-dm_primal-seed0"]))
