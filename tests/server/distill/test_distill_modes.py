"""The distillation modes against eager fp32. `distill.precision=bf16`: another estimator, pinned close to fp32 (loss
relative difference, cosine of the gradient / the update). Both modes off: every pass eager and outside autocast (the fp32
path the benchmarks rely on). `distill.compile` (DM embedder and DKKT term) is pinned in test_methods.py."""

import pytest
import torch

from common import runtime
from common.config import DistillConfig, ModelConfig
from common.models import build_model
from common.runtime import autocast
from server.distill import norm_backward
from server.distill.dkkt import freeze_model, stationarity_and_logits
from server.distill.dm import PublicPool, dm_loss
from server.distill.dsa import parse_strategy, sample_dsa
from server.distill.methods import distill

C, SIZE, WIDTH = 3, 16, 16


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs() / b.abs())


@pytest.fixture(scope="module")
def theta_star() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(C, 3, SIZE, WIDTH)


def test_bf16_dm_loss_and_image_gradient_stay_close_to_fp32():
    torch.manual_seed(1)
    embedder = build_model(C, 3, SIZE, WIDTH).train().requires_grad_(False)
    pool = PublicPool(images(8 * C, 2), torch.arange(C).repeat(8), C, 8)
    real_x, real_groups = pool.sample(torch.Generator().manual_seed(3))
    draw = sample_dsa(parse_strategy("color_crop_cutout_flip_scale_rotate"), C, torch.Generator().manual_seed(4), "cpu")
    syn_y = torch.arange(C).repeat_interleave(2)
    results = {}
    for precision in ("fp32", "bf16"):
        syn = images(2 * C, 5).requires_grad_(True)
        with autocast(torch.device("cpu"), precision):
            loss = dm_loss(embedder, real_x, real_groups, syn, syn_y, C, draw)
        assert loss.dtype == torch.float32
        results[precision] = (loss.detach(), torch.autograd.grad(loss, syn)[0])
    (loss32, grad32), (loss16, grad16) = results["fp32"], results["bf16"]
    assert 0 < relative(loss16, loss32) < 3e-2  # bf16 acts, and stays close
    assert cosine(grad16, grad32) > 0.97  # 0.983 here: DM subtracts two means, which bf16 rounding shows


def test_bf16_dkkt_term_and_its_double_backward_stay_close_to_fp32(theta_star):
    model = freeze_model(theta_star, "cpu")
    y = torch.arange(C).repeat_interleave(4)
    results = {}
    for precision in ("fp32", "bf16"):
        x = images(4 * C, 6).requires_grad_(True)
        lambdas = torch.full((4 * C,), 0.5, requires_grad=True)
        with autocast(torch.device("cpu"), precision):
            stat, _ = stationarity_and_logits(model, x, y, lambdas)
        assert stat.dtype == torch.float32 and torch.isfinite(stat)
        results[precision] = (stat.detach(), *torch.autograd.grad(stat, [x, lambdas]))
    (stat32, gx32, gl32), (stat16, gx16, gl16) = results["fp32"], results["bf16"]
    assert 0 < relative(stat16, stat32) < 1e-2
    assert cosine(gx16, gx32) > 0.95 and cosine(gl16, gl32) > 0.99


def test_bf16_distill_update_points_where_the_fp32_update_does(theta_star):
    public_x, y = images(4 * C, 7), torch.arange(C).repeat(4)
    cfg = DistillConfig(method="dm+dkkt", ipc=2, iterations=1, batch_real=4, lambda_fit_steps=2)
    start = distill(None, public_x, y, cfg.model_copy(update={"method": "random"}), ModelConfig(width=WIDTH), C, 5, "cpu")
    fp32 = distill(theta_star, public_x, y, cfg, ModelConfig(width=WIDTH), C, 5, "cpu")
    bf16 = distill(theta_star, public_x, y, cfg.model_copy(update={"precision": "bf16"}), ModelConfig(width=WIDTH), C, 5,
                   "cpu")
    assert not torch.equal(bf16.images, fp32.images)
    assert cosine(bf16.images - start.images, fp32.images - start.images) > 0.99


@pytest.mark.parametrize(("precision", "flags", "runs_bf16"), [
    ("fp32", {"avx512_bf16"}, False), ("bf16", set(), True),
    ("auto", {"avx2", "avx512_bf16"}, True), ("auto", {"amx_bf16"}, True), ("auto", {"avx2"}, False)])
def test_every_pass_runs_in_the_configured_precision_and_eager_by_default(theta_star, monkeypatch, precision, flags,
                                                                         runs_bf16):
    """fp32 with compile off is the eager fp32 path (no autocast, no compiled norm backward); bf16 autocasts every pass;
    auto is bf16 on a CPU with bf16 units (AVX-512 BF16 or AMX) and fp32 on one without."""
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
    seen: list[bool] = []
    monkeypatch.setattr(torch.nn.Conv2d, "forward", lambda self, x, f=torch.nn.Conv2d.forward: (
        seen.append(torch.is_autocast_enabled("cpu")), f(self, x))[1])
    monkeypatch.setattr(norm_backward, "_compiled_backward", lambda device_type: pytest.fail("compiled without compile"))
    public_x, y = images(4 * C, 8), torch.arange(C).repeat(4)
    cfg = DistillConfig(method="dm+dkkt", ipc=2, iterations=2, batch_real=4, lambda_fit_steps=0, precision=precision)
    distill(theta_star, public_x, y, cfg, ModelConfig(width=WIDTH), C, 5, "cpu")
    assert seen and all(seen) == runs_bf16 and any(seen) == runs_bf16


def test_auto_is_fp32_on_a_gpu_where_bf16_distillation_is_unmeasured(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert runtime.resolve_precision(torch.device("cuda"), "auto") == "fp32"
    assert runtime.resolve_precision(torch.device("cpu"), "auto") == "bf16"
    assert [runtime.resolve_precision(torch.device("cpu"), p) for p in ("fp32", "bf16")] == ["fp32", "bf16"]
