"""after_federation: the one seam from the federation to server-side distillation."""

from __future__ import annotations

import sys
import types

import numpy as np
import torch

from common.config import build_config
from common.holdings import decide_holdings, load_experiment_data
from common.models import build_model
from server.hooks import after_federation
from server.server_data import from_dataset

RAW = {"device": "cpu", "data": {"name": "tiny"}, "split": {"pipc": 3, "num_clients": 2}, "model": {"width": 8},
       "distill": {"ipc": 1}}


def setup(enabled: bool):
    cfg = build_config(RAW, {"distill.enabled": enabled})
    dataset = load_experiment_data(cfg)
    return cfg, dataset, decide_holdings(cfg, dataset.train.labels), from_dataset(cfg)


def test_nothing_happens_when_distillation_is_disabled(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "server.distill.run", None)  # importing it would fail
    cfg, _, _, data = setup(False)
    assert after_federation(cfg, build_model(width=8), data, tmp_path) is None


def test_distillation_gets_the_public_subset_and_the_test_set(tmp_path, monkeypatch):
    calls = {}

    def fake_run_distillation(cfg, model, public_x, public_y, test_x, test_y, out_dir, normalization, num_classes=None,
                              progress=None):
        calls.update(cfg=cfg, model=model, px=public_x, py=public_y, tx=test_x, ty=test_y, out=out_dir)
        return {"ok": True}

    monkeypatch.setitem(sys.modules, "server.distill.run", types.SimpleNamespace(run_distillation=fake_run_distillation))
    cfg, dataset, holdings, data = setup(True)
    model = build_model(width=8)
    assert after_federation(cfg, model, data, tmp_path) == {"dm+dkkt": {"ok": True}}
    assert calls["model"] is model and calls["out"] == tmp_path / "distill" / "dm_dkkt"
    assert calls["px"].shape == (30, 3, 32, 32) and calls["px"].dtype == torch.float32
    assert np.array_equal(calls["py"].numpy(), dataset.train.labels[holdings.public])
    assert len(calls["ty"]) == len(dataset.test.labels)


def test_baselines_run_first_each_in_its_own_folder(tmp_path, monkeypatch):
    seen = []

    def fake_run_distillation(cfg, model, public_x, public_y, test_x, test_y, out_dir, normalization, num_classes=None,
                              progress=None):
        seen.append((cfg.distill.method, out_dir))
        return {"mean": 0.5}

    monkeypatch.setitem(sys.modules, "server.distill.run", types.SimpleNamespace(run_distillation=fake_run_distillation))
    _, _, _, data = setup(True)
    cfg = build_config(RAW, {"distill.enabled": True, "distill.baselines": ["random", "dm", "dm+dkkt"]})
    results = after_federation(cfg, build_model(width=8), data, tmp_path)
    assert list(results) == ["random", "dm", "dm+dkkt"]
    assert seen == [(m, tmp_path / "distill" / m.replace("+", "_")) for m in ("random", "dm", "dm+dkkt")]
