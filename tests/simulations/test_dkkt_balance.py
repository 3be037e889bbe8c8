"""simulations/benchmarks/dkkt_balance.py's split of L_DKKT's image gradient into its weighted parts."""

from __future__ import annotations

import pytest
import torch

from common.config import DistillConfig
from common.models import build_model
from server.distill.dkkt import stationarity_loss
from server.distill.lambdas import flat_parameters
from simulations.benchmarks.dkkt_balance import gradient_parts, parts_table


@pytest.mark.parametrize("aug_weight", [0.0, 5.0])
def test_the_parts_add_up_to_the_whole_gradient_and_l_stat_is_exact(aug_weight):
    torch.manual_seed(0)
    model = build_model(3, 3, 16, 8, 3)
    x, y = torch.randn(6, 3, 16, 16), torch.arange(3).repeat(2)
    lambdas = torch.rand(6)
    cfg = DistillConfig(aug_weight=aug_weight, primal_weight=0.5, tv_weight=0.1)
    result = gradient_parts(model, x, y, lambdas, cfg, seed=0)
    parts = result["parts"]
    expected = {"stat", "primal", "tv"} | ({"stat_aug", "primal_aug"} if aug_weight else set())
    assert set(parts) == expected
    # Each part's projection on the whole gradient, in units of the whole: they sum to 1.
    assert sum(p["norm_rel"] * p["cos"] for p in parts.values()) == pytest.approx(1.0, abs=1e-5)
    assert all(-1 - 1e-6 <= p["cos"] <= 1 + 1e-6 and p["norm_rel"] >= 0 for p in parts.values())
    assert parts["tv"]["norm_rel"] > 0
    frozen = model.eval()
    exact = stationarity_loss(frozen, x, y, lambdas) / flat_parameters(frozen).abs().mean()
    assert result["stat_rel"] == pytest.approx(float(exact), rel=1e-5)
    assert all(p.requires_grad for p in model.parameters())  # the caller's model is left as it was
    table = parts_table([{"ipc": 2, "parts_first": result, "parts_last": result}])
    assert table.count("\n| 2 |") == 2 and "stat: ‖∇‖" in table
