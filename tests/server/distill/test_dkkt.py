import pytest
import torch

from common.config import DistillConfig
from common.models import build_model
from server.distill.dkkt import (
    dkkt_loss,
    dkkt_parts,
    freeze_model,
    naive_stationarity_loss,
    primal_loss,
    stationarity_loss,
)
from server.distill.dsa import FAMILIES, sample_dsa

C, SIZE = 3, 16


def frozen(dtype: torch.dtype = torch.float64, norm: str = "instancenorm"):
    torch.manual_seed(0)
    return freeze_model(build_model(C, 3, SIZE, 8, 3, norm).to(dtype), "cpu")


@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm"])
def test_batched_stationarity_equals_the_per_sample_loop(norm):
    model = frozen(norm=norm)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, SIZE, SIZE, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1])
    lam = torch.rand(5, generator=g, dtype=torch.float64).mul(3).requires_grad_(True)
    batched = stationarity_loss(model, x, y, lam)
    naive = naive_stationarity_loss(model, x, y, lam)
    assert torch.allclose(batched, naive, rtol=1e-5, atol=0)
    gx_b, gl_b = torch.autograd.grad(batched, (x, lam))
    gx_n, gl_n = torch.autograd.grad(naive, (x, lam))
    assert gx_b.abs().sum() > 0 and gl_b.abs().sum() > 0  # differentiable w.r.t. the images and lambda
    assert torch.allclose(gx_b, gx_n, rtol=1e-5, atol=1e-12)
    assert torch.allclose(gl_b, gl_n, rtol=1e-5, atol=1e-12)


def test_stationarity_with_zero_lambda_is_mean_abs_theta():
    model = frozen()
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    theta = torch.cat([p.flatten() for p in model.parameters()])
    loss = stationarity_loss(model, x, torch.tensor([0, 1]), torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(loss, theta.abs().mean())


def test_frozen_model_is_a_frozen_copy():
    torch.manual_seed(0)
    model = build_model(C, 3, SIZE, 8, 3).train()
    copy = freeze_model(model, "cpu")
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert not copy.training and not any(p.requires_grad for p in copy.parameters())


def test_primal_loss_zero_iff_every_candidate_is_classified_right():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
    assert primal_loss(logits, torch.tensor([0, 1])).item() == 0.0
    wrong = primal_loss(logits, torch.tensor([0, 2]))
    ce = torch.nn.functional.cross_entropy(logits[1:], torch.tensor([2]))
    assert torch.allclose(wrong, ce / 2)  # mean over all n candidates, only the wrong one counts

    model = frozen()
    x = torch.randn(6, 3, SIZE, SIZE, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
    right = out.argmax(1)  # labels the model already predicts: primal feasibility holds
    assert primal_loss(model(x), right).item() == 0.0
    assert primal_loss(model(x), (right + 1) % C).item() > 0.0


def test_dkkt_loss_terms_and_weights():
    model = frozen(torch.float32)
    x = torch.randn(4, 3, SIZE, SIZE, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    lam = torch.full((4,), 0.5, requires_grad=True)
    aug = sample_dsa(FAMILIES, 4, torch.Generator().manual_seed(0))
    plain_cfg = DistillConfig(aug_weight=0.0, primal_weight=0.0)
    plain, terms = dkkt_loss(model, x, y, lam, plain_cfg, aug)
    assert set(terms) == {"stat", "primal"} and torch.allclose(plain, terms["stat"])
    cfg = DistillConfig(aug_weight=5.0, primal_weight=2e-3, tv_weight=0.1, norm_weight=0.01)
    total, terms = dkkt_loss(model, x, y, lam, cfg, aug)
    expected = (
        terms["stat"] + 2e-3 * terms["primal"] + 5.0 * (terms["stat_aug"] + 2e-3 * terms["primal_aug"])
        + 0.1 * terms["tv"] + 0.01 * terms["norm"]
    )
    assert torch.allclose(total, expected)
    total.backward()
    assert x.grad.abs().sum() > 0 and lam.grad.abs().sum() > 0


def _image_grad(cfg: DistillConfig, x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, aug) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    loss, _ = dkkt_loss(frozen(torch.float32), x, y, lam, cfg, aug)
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def test_each_part_of_dkkt_is_weighted_on_its_own_and_zero_removes_its_gradient():
    torch.manual_seed(1)
    x = torch.randn(4, 3, SIZE, SIZE)
    y = torch.tensor([0, 1, 2, 0])  # some wrong under the random model: the primal term acts
    lam = torch.full((4,), 0.5)
    aug = sample_dsa(FAMILIES, 4, torch.Generator().manual_seed(0))
    base = {"primal_weight": 0.3, "aug_weight": 2.0}
    whole = _image_grad(DistillConfig(**base), x, y, lam, aug)
    stat_only = _image_grad(DistillConfig(aug_weight=2.0, primal_weight=0.0), x, y, lam, aug)
    primal_only = _image_grad(DistillConfig(**base, stat_weight=0.0), x, y, lam, aug)
    # stat_weight=0 leaves exactly the primal parts' gradient; together with the stationarity parts they are the whole.
    assert primal_only.abs().sum() > 0 and stat_only.abs().sum() > 0
    torch.testing.assert_close(stat_only + primal_only, whole, rtol=1e-4, atol=1e-7)
    # The parts themselves: stat_weight scales both views' stationarity terms and nothing else.
    parts, _ = dkkt_parts(frozen(torch.float32), x, y, lam, DistillConfig(**base, stat_weight=0.0), aug)
    assert parts["stat"].item() == 0.0 and parts["stat_aug"].item() == 0.0 and parts["primal"].item() > 0.0
    # The views: plain_weight=0 leaves the augmented view alone, aug_weight=0 the plain one.
    aug_only = _image_grad(DistillConfig(**base, plain_weight=0.0), x, y, lam, aug)
    plain_only = _image_grad(DistillConfig(primal_weight=0.3, aug_weight=0.0), x, y, lam, aug)
    torch.testing.assert_close(aug_only + plain_only, whole, rtol=1e-4, atol=1e-7)
    parts = dkkt_parts(frozen(torch.float32), x, y, lam, DistillConfig(plain_weight=0.0), aug)[0]
    assert set(parts) == {"stat_aug", "primal_aug"}


def test_an_empty_dkkt_loss_is_a_config_error():
    with pytest.raises(ValueError, match="stat_weight and distill.primal_weight are both 0"):
        DistillConfig(method="dm+dkkt", stat_weight=0.0, primal_weight=0.0)
    with pytest.raises(ValueError, match="plain_weight and distill.aug_weight are both 0"):
        DistillConfig(method="dsv", plain_weight=0.0, aug_weight=0.0)
    DistillConfig(method="dm", stat_weight=0.0, primal_weight=0.0)  # no DKKT term: nothing to check
