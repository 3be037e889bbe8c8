"""Every entry point distils from exactly the public subset that the federation held out of every edge shard.

The federation's side is what the edge clients really load (`edge_client.shard.load_shard`, per client); the
distillation side is what a grid's cell (`simulations.grid.cells.run_task`) and `feddistill distill` pass to
`run_distillation`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

import server.distill.run
from common.atomic import save_torch
from common.config import config_to_dict, load_config
from common.data import Normalization, denormalize
from common.holdings import load_experiment_data
from common.models import model_from_config
from edge_client.shard import clear_cache, load_shard
from simulations.cli import main as cli_main
from simulations.grid.cells import CellTask, GridCell, run_task
from simulations.grid.sweep import cell_config, cells, federation_config, load_sweep


def image_keys(images: np.ndarray) -> set[bytes]:
    return {img.tobytes() for img in images}


def to_uint8(x: torch.Tensor, norm: Normalization) -> np.ndarray:
    """Normalised (N, C, H, W) back to the uint8 (N, H, W, C) the dataset holds."""
    return (denormalize(x, norm).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture
def captured(monkeypatch):
    """Replaces run_distillation by a recorder of the public images it is given."""
    calls: list[np.ndarray] = []

    def record(cfg, model, public_x, public_y, test_x, test_y, out_dir, normalization, **kwargs):
        calls.append(to_uint8(public_x.cpu(), normalization))
        return {"mean": 0.0, "std": 0.0, "accuracies": [0.0]}

    monkeypatch.setattr(server.distill.run, "run_distillation", record)
    return calls


def federation_holdings(train_cfg) -> tuple[set[bytes], set[bytes]]:
    """(images every edge client loads, every training image) for the federation of `train_cfg`."""
    clear_cache()
    dataset = load_experiment_data(train_cfg)
    everything = image_keys(dataset.train.images)
    assert len(everything) == len(dataset.train.images), "the test needs distinct images"
    private: set[bytes] = set()
    for k in range(train_cfg.split.num_clients):
        shard = load_shard(train_cfg, k)
        private |= image_keys(shard.train_images) | image_keys(shard.holdout_images)
    return private, everything


def test_every_sweep_seed_distils_from_the_subset_its_edge_model_held_out(tmp_path, captured):
    sweep = load_sweep("tiny-sweep").model_copy(update={"seeds": [0, 1, 2], "methods": ["dm"]})
    runnable, _ = cells(sweep)
    assert {c.seed for c in runnable} == {0, 1, 2}
    publics: dict[int, set[bytes]] = {}
    for cell in runnable:
        cfg = cell_config(sweep, cell)
        train_cfg = federation_config(cfg, sweep.seeds[0])
        dataset = load_experiment_data(cfg)
        model_path = tmp_path / "model.pt"
        model = model_from_config(cfg.model, dataset.num_classes, dataset.channels, dataset.image_size)
        save_torch(model_path, model.state_dict())
        run_task(CellTask(GridCell(cell.name, cfg, {}), tmp_path / cell.name, model_path))
        public = image_keys(captured[-1])
        private, everything = federation_holdings(train_cfg)
        assert len(public) == cell.pipc * dataset.num_classes
        assert not public & private, f"{cell.name}: public images the edge model trained on"
        assert public | private == everything  # the federation held out exactly this public subset
        publics.setdefault(cell.pipc, public)
        assert public == publics[cell.pipc], "a sweep's seeds must not change the public subset"


def test_feddistill_distill_uses_the_public_subset_of_the_runs_config(tmp_path, captured):
    raw = {"name": "t", "seed": 1, "device": "cpu", "data": {"name": "tiny", "tiny_per_class": 12},
           "split": {"pipc": 3, "num_clients": 2, "validation_per_class": 2}, "model": {"width": 8},
           "distill": {"method": "dm", "ipc": 1, "iterations": 1}}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    assert cli_main(["distill", "--config", str(config_path), "--out", str(tmp_path / "out")]) == 0
    public = image_keys(captured[-1])
    private, everything = federation_holdings(load_config(config_path))
    assert len(public) == 30 and not public & private
    assert len(everything - public - private) == 20  # the validation slice: nobody's
    assert config_to_dict(load_config(config_path))["split"]["validation_per_class"] == 2
