"""The leakage audit: the positive control (planted private images are flagged, one by one and as a set), the
statistics of a set that leaks nothing stay near their null, the pools are size- and class-matched, and the
command's outputs and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from common.atomic import save_json, save_torch
from common.config import load_config, parse_overrides
from common.holdings import decide_holdings, load_experiment_data
from simulations.cli import main as cli_main
from simulations.commands.audit import auc_delong, audit_pools, flag_threshold, ssim, train_feature_net, wilson

TINY = ["device=cpu", "data.name=tiny", "data.tiny_per_class=60", "data.train_per_class=null", "data.test_per_class=null",
        "model.width=8", "split.pipc=4", "split.validation_per_class=4", "split.num_clients=2", "distill.method=dm",
        "distill.ipc=4", "distill.iterations=3", "distill.batch_real=4", "evaluation.epochs=1", "evaluation.num_nets=1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A distilled dm set on generated data and a feature net trained for one epoch (fast; the real one: 30)."""
    root = tmp_path_factory.mktemp("audit")
    assert cli_main(["distill", "--config", "quickstart", "--out", str(root / "dm"), *TINY]) == 0
    cfg = load_config("quickstart", parse_overrides(TINY))
    net, record = train_feature_net(load_experiment_data(cfg), seed=0, epochs=1)
    save_torch(root / "feature_net.pt", net.state_dict())
    save_json(root / "feature_net.json", record)
    return root


@pytest.fixture(scope="module")
def audited(tiny) -> Path:
    """The dm set audited as it is and with 3 exact + 3 perturbed private images planted in it."""
    out = tiny / "audit"
    assert cli_main(["audit", str(tiny / "dm"), "--out", str(out), "--feature-net", str(tiny / "feature_net.pt"),
                     "--planted", "3"]) == 0
    return out


def test_every_planted_private_image_is_flagged_and_so_is_the_set(audited):
    out = audited
    summary = json.loads((out / "dm-seed_0+planted3" / "summary.json").read_text())
    planted = summary["planted"]
    assert planted["exact"] == planted["perturbed"] == 3 and planted["flagged"] == 6  # every one, exact or perturbed
    frame = pd.read_csv(out / "dm-seed_0+planted3" / "audit.csv")
    rows = frame.iloc[planted["positions"]]
    assert (rows["pixel_private"] < rows["pixel_reference"]).all()
    assert (rows.iloc[:3]["pixel_private"] < 1e-3).all() and (rows.iloc[:3]["ssim_private"] > 0.999).all()
    assert list(rows["pixel_private_image"]) == planted["images"]
    assert summary["pixel"]["set_p_value"] < 0.01  # the set as a whole
    calibration = summary["calibration"]["pixel"]["fpr_all"]
    assert calibration["rate"] <= 0.01 and calibration["images"] == summary["pools"]["null"]


def test_a_set_of_real_unheld_images_is_not_flagged_as_a_set(audited):
    """dm from 4 public images per class, 3 iterations: still (nearly) the public images, which nobody private holds."""
    out = audited
    summary = json.loads((out / "dm-seed_0" / "summary.json").read_text())
    for space in ("pixel", "feature"):
        low, high = summary[space]["bootstrap95"]
        assert low <= 0.5 <= high, (space, summary[space])
        assert summary[space]["set_p_value"] > 0.01
    rows = pd.read_csv(out / "summary.csv")
    assert list(rows["set"]) == ["dm-seed_0", "dm-seed_0+planted3"] and list(rows["planted_flagged"].fillna(-1)) == [-1, 6]
    row = rows.iloc[0]
    assert row["images"] == 40 and row["method"] == "dm" and row["pixel_flagged"] == summary["pixel"]["flagged"]
    assert (out / "dm-seed_0" / "gallery.png").stat().st_size > 1000
    assert json.loads((out / "audit.json").read_text())["feature_net_record"]["epochs"] == 1


def test_private_folds_match_the_reference_sample_class_by_class_and_cover_the_pool():
    cfg = load_config("quickstart", parse_overrides(TINY))
    dataset = load_experiment_data(cfg)
    pools = audit_pools(cfg, dataset, seed=0)
    labels = np.concatenate([dataset.train.labels, dataset.test.labels])
    per_class = np.bincount(labels[pools.reference_sample], minlength=10)
    for fold in pools.folds:
        assert np.array_equal(np.bincount(labels[pools.private[fold]], minlength=10), per_class)
    assert np.array_equal(np.unique(np.concatenate(pools.folds)), np.arange(len(pools.private)))
    holdings = decide_holdings(cfg, dataset.train.labels)
    assert np.array_equal(pools.private, holdings.private) and np.array_equal(pools.public, holdings.public)
    held_out = set(pools.reference.tolist())
    assert set(pools.reference_sample.tolist()) <= held_out and not held_out & set(pools.private.tolist())
    assert not set(pools.null.tolist()) & (set(pools.private.tolist()) | set(pools.reference_sample.tolist()))


def test_statistics_match_their_textbook_values():
    assert wilson(0, 100)[1] == pytest.approx(0.037, abs=1e-3) and wilson(50, 100) == pytest.approx((0.404, 0.596), abs=1e-3)
    auc, (low, high) = auc_delong(np.array([3.0, 4.0, 5.0]), np.array([1.0, 2.0, 3.0]))
    assert auc == pytest.approx((3 + 3 + 2.5) / 9) and low < auc < high
    assert flag_threshold(np.arange(1, 201, dtype=float)) == 3.0  # 2 of 200 below: 1 %
    image = torch.rand(2, 3, 16, 16)
    assert ssim(image, image).tolist() == pytest.approx([1.0, 1.0])
    assert (ssim(image, torch.rand(2, 3, 16, 16)) < 0.2).all()


def test_a_folder_without_a_set_is_a_one_line_error(tmp_path, capsys):
    assert cli_main(["audit", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "no synthetic set" in capsys.readouterr().out
