"""The grid files keep every committed cell's name and configuration: hashes taken from the Python presets of
simulations/evidence.py and the sweep grids before they became configs/grids/*.yaml (commit baccaf8)."""

from __future__ import annotations

import hashlib
import json

import pytest

from common.config import config_to_dict
from simulations.grid import protocol as grids
from simulations.grid.edge import edge_model_key
from simulations.grid.sweep import cell_config, cells, federation_config, load_sweep

# preset -> (table cells, calibration cells, number of table cells, the received model's key)
PROTOCOLS = {
    "cpu": ("0e0254a997406921", "9b1f513a377f4043", 75, "e061c50d150f"),
    "gpu": ("a19cb751b6284d8a", "36ad2158226e51b1", 72, "e061c50d150f"),
    "split-ratio-cpu": ("fdbfaddf1f8ca521", "b02ec1366a662a75", 189, "e061c50d150f"),
    "split-ratio-gpu": ("2797ab93f1d74593", "83e9631c60e010d9", 18, "e061c50d150f"),
    "split-ratio-cpu-dirichlet": ("1c28e29d4d6fc003", "64831c6cab561192", 27, "9ec6f2ce9015"),
    "tiny": ("1bade49e667a0bfb", "0a449dbe204d0778", 12, "efd4a8e5e1a6"),
    "tiny-split": ("4ef684373a119885", "012de489bd5b6ea3", 26, "efd4a8e5e1a6"),
}
SWEEPS = {"tiny-sweep": ("40a1d8524245b731", 4), "pipc50": ("d7886a1d4cac516a", 27), "cpu_demo": ("149416583371bcf9", 6),
          "paper": ("a69afbd3c25b62e7", 36)}


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _as_recorded(config: dict) -> dict:
    """The distillation mode as its committed cells recorded it: eager fp32 for `distill.compile` and
    `distill.precision=auto` (config_differences matches them)."""
    if config["distill"]["precision"] != "auto":
        return config
    return {**config, "distill": {**config["distill"], "precision": "fp32", "compile": False}}


def test_every_protocol_grid_file_is_a_preset_of_before():
    assert grids.protocol_names() == sorted(PROTOCOLS)


@pytest.mark.parametrize("preset", sorted(PROTOCOLS))
def test_a_protocol_grid_makes_the_same_cells_with_the_same_configs(preset):
    """Table cells at a fixed ratio and DM counts (the largest curve point), calibration cells, the edge model."""
    protocol = grids.load_protocol(preset)
    conv = {ipc: max(its) for ipc, its in protocol.curve.items()} or None
    table = [(c.name, _as_recorded(config_to_dict(c.cfg)), c.columns) for c in grids.table_cells(protocol, {}, 0.3, conv)]
    calibration = [(c.name, _as_recorded(config_to_dict(c.cfg))) for c in grids.calibration_cells(protocol, {})]
    got = (_digest(table), _digest(calibration), len(table), edge_model_key(grids.base_config(protocol, {})))
    assert got == PROTOCOLS[preset]


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_a_sweep_grid_makes_the_same_cells_with_the_same_configs_and_edge_models(name):
    sweep = load_sweep(name)
    runnable, skipped = cells(sweep)
    rows = [(c.name, config_to_dict(cell_config(sweep, c)),
             edge_model_key(federation_config(cell_config(sweep, c), sweep.seeds[0])))
            for c in runnable]
    assert (_digest(rows), len(rows), skipped) == (*SWEEPS[name], [])
