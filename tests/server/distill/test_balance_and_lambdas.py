"""The DKKT term acts: its image gradient is held at the configured share of DM's, it has a scale where DM's vanishes,
and the multipliers stay >= 0, move, and can be fitted to theta* with the images frozen."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from common.config import DistillConfig, ModelConfig
from common.models import build_model
from server.distill.balance import DkktWeight
from server.distill.dkkt import freeze_model
from server.distill.lambdas import Multipliers, fit_multipliers, flat_parameters, per_sample_gradients
from server.distill.methods import distill

C, SIZE = 3, 16


def data(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    patterns = torch.randn(C, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    y = torch.arange(C).repeat(per_class)
    return patterns[y] + 0.5 * torch.randn(len(y), 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)), y


@pytest.fixture(scope="module")
def theta_star() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(C, 3, SIZE, 8, 3)


def run(theta_star, cfg: DistillConfig, pipc: int = 6) -> list[dict[str, float]]:
    public_x, public_y = data(pipc, seed=1)
    rows: list[dict[str, float]] = []
    distill(theta_star, public_x, public_y, cfg, ModelConfig(width=8), C, 0, "cpu", lambda it, m, s: rows.append(m))
    return rows


@pytest.mark.parametrize("ratio", [0.1, 1.0])
def test_auto_weight_holds_the_dkkt_gradient_at_its_share_of_dm(theta_star, ratio):
    cfg = DistillConfig(method="dm+dkkt", ipc=2, iterations=30, batch_real=6, log_every=1, dkkt_ratio=ratio,
                        dkkt_min_step=1e-6)  # a floor far below DM's gradient: DM sets the scale
    rows = run(theta_star, cfg)[10:]
    measured = sum(r["grad_dkkt"] for r in rows) / sum(r["grad_dm"] for r in rows)
    assert measured == pytest.approx(ratio, rel=0.5)
    assert all(0 < r["share_dkkt"] < 1 for r in rows)
    assert sum(r["share_dkkt"] for r in rows) / len(rows) == pytest.approx(ratio / (1 + ratio), rel=0.5)


def test_a_numeric_weight_is_used_as_given(theta_star):
    rows = run(theta_star, DistillConfig(method="dm+dkkt", ipc=2, iterations=3, batch_real=6, log_every=1, dkkt_weight=2.5))
    assert all(r["dkkt_weight"] == 2.5 for r in rows)


def test_where_dm_vanishes_the_floor_sets_the_dkkt_step(theta_star):
    # ipc = pipc with init=real and the whole public set in every DM batch: L_DM is exactly 0 at the start.
    cfg = DistillConfig(method="dm+dkkt", ipc=4, iterations=1, batch_real=4, log_every=1, dkkt_ratio=0.5,
                        dkkt_min_step=0.02, lr_img=1.0)
    (row,) = run(theta_star, cfg, pipc=4)
    assert row["dm"] < 1e-6 and row["grad_dm"] < 1e-4
    pixels = C * 4 * 3 * SIZE * SIZE
    assert row["grad_dkkt"] == pytest.approx(0.5 * 0.02 * math.sqrt(pixels), rel=1e-3)  # ratio x floor


def test_dkkt_weight_state_round_trips():
    cfg = DistillConfig(dkkt_ratio=0.5)
    a, b = DkktWeight(cfg, 100, "cpu"), DkktWeight(cfg, 100, "cpu")
    for norm in (3.0, 5.0, 4.0):
        w = a.update(torch.tensor(norm), torch.tensor(0.1))
    b.load(a.state())
    assert b.update(torch.tensor(6.0), torch.tensor(0.1)) == a.update(torch.tensor(6.0), torch.tensor(0.1))
    assert w > 0


def test_lambda_stays_nonnegative_moves_and_zeros_are_counted():
    lam = Multipliers(torch.full((6,), 0.5), lr=0.3)
    for _ in range(5):  # the loss rewards negative lambda on the first four: each step pushes them down
        lam.values.grad = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, -1.0])
        lam.step()
        assert (lam.values >= 0).all()
    stats = lam.stats()
    assert stats["lambda_zeros"].item() == 4 and stats["lambda_min"].item() == 0.0
    assert (lam.values[4:] > 0.5).all() and stats["lambda_max"].item() > 0.5


def test_lambda_moves_during_dm_dkkt_and_stays_nonnegative(theta_star):
    rows = run(theta_star, DistillConfig(method="dm+dkkt", ipc=2, iterations=10, batch_real=6, log_every=1, lambda_lr=0.05))
    assert all(r["lambda_min"] >= 0 for r in rows)
    assert abs(rows[-1]["lambda_mean"] - 0.5) > 0.01


def test_per_sample_gradients_equal_a_loop(theta_star):
    model = freeze_model(theta_star, "cpu")
    x, y = data(2, seed=3)
    batched = per_sample_gradients(model, x, y)
    params = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()}
    for j in range(len(y)):
        loss = F.cross_entropy(functional_call(model, params, (x[j : j + 1],)), y[j : j + 1])
        row = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(params.values()))])
        torch.testing.assert_close(batched[j], row, rtol=1e-4, atol=1e-6)


def test_fitted_multipliers_lower_the_stationarity_distance(theta_star):
    model = freeze_model(theta_star, "cpu")
    x, y = data(4, seed=4)
    grads, theta = per_sample_gradients(model, x, y), flat_parameters(model)
    lam, history = fit_multipliers(grads, theta, steps=200, lr=0.05)
    assert (lam >= 0).all() and len(history) == 201
    assert history[0] == pytest.approx(theta.abs().mean().item())  # lambda = 0
    assert min(history) < history[0] and lam.sum() > 0


def test_lambda_fit_start_and_lambda_init_select_images(theta_star):
    public_x, public_y = data(6, seed=1)
    cfg = DistillConfig(method="dm+dkkt", ipc=2, iterations=1, batch_real=6, log_every=1, lambda_fit_steps=50,
                        init="lambda")
    rows: list[dict[str, float]] = []
    syn = distill(theta_star, public_x, public_y, cfg, ModelConfig(width=8), C, 0, "cpu", lambda it, m, s: rows.append(m))
    assert rows[0]["stat_rel"] <= 1.0 + 1e-6  # the fitted start: at most mean|theta*|, unlike lambda = 0.5
    random_start = distill(theta_star, public_x, public_y, cfg.model_copy(update={"init": "real", "iterations": 0}),
                           ModelConfig(width=8), C, 0, "cpu")
    assert not torch.equal(syn.images, random_start.images)


def test_a_dkkt_term_without_gradient_weighs_nothing_instead_of_infinity():
    cfg = DistillConfig(dkkt_ratio=1.0)
    balance = DkktWeight(cfg, 100, "cpu")
    assert balance.update(torch.tensor(1e30), torch.tensor(0.0)).item() == 0.0
    assert balance.update(torch.tensor(1e30), torch.tensor(1e-35)).item() == 0.0
    assert math.isfinite(balance.update(torch.tensor(1e30), torch.tensor(1e-20)).item())


def test_the_primal_term_alone_saturates_without_poisoning_the_images(theta_star):
    """dm+primal (stat_weight 0) drives its candidates to probability 1.0, where the cross-entropy's gradient is exactly
    0 in float32: that iteration's DKKT weight is 0 (it was ratio x DM / tiny, 1e37 or inf, then NaN images)."""
    hot = build_model(C, 3, SIZE, 8, 3)
    hot.load_state_dict(theta_star.state_dict())
    with torch.no_grad():
        for p in list(hot.parameters())[-2:]:
            p.mul_(1000.0)  # confident logits: the cross-entropy reaches exactly 0 within the run
    rows = run(hot, DistillConfig(method="dm+dkkt", ipc=2, iterations=80, batch_real=6, log_every=1, stat_weight=0.0))
    assert any(r["dkkt_weight"] == 0.0 for r in rows)
    assert all(math.isfinite(v) and abs(v) < 1e30 for r in rows for v in r.values())


def test_a_diverging_distillation_stops_with_the_iteration_instead_of_saving_nan_images(theta_star):
    from server.distill.methods import DistillDiverged

    with pytest.raises(DistillDiverged, match="diverged at iteration"):
        run(theta_star, DistillConfig(method="dm", ipc=2, iterations=6, batch_real=6, log_every=1, lr_img=1e38))
