"""The instance norm with a compiled backward (`distill.compile`'s DKKT term) against PyTorch's group norm: the same
first and second derivatives, on a copy that keeps theta*'s parameters."""

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.models import build_model
from server.distill.dkkt import freeze_model, stationarity_and_logits
from server.distill.norm_backward import (
    CompiledBackwardInstanceNorm,
    instance_norm_backward,
    with_compiled_norm_backward,
)

needs_compiler = pytest.mark.skipif(not shutil.which("g++") and not shutil.which("clang++"),
                                    reason="torch.compile on the CPU needs g++")


def test_the_plain_op_backward_is_group_norms_first_and_second_derivative():
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    weight = (torch.rand(4, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True)
    bias = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    expected = torch.autograd.grad(F.group_norm(x, 4, weight, bias, 1e-5), (x, weight, bias), grad_out,
                                   create_graph=True)
    ours = instance_norm_backward(grad_out, x, weight, 1e-5)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b)
    probe = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in expected]  # any upstream gradient
    second = [torch.autograd.grad(sum((p * g).sum() for p, g in zip(probe, grads, strict=True)), (x, weight, grad_out))
              for grads in (ours, expected)]
    for a, b in zip(*second, strict=True):
        torch.testing.assert_close(a, b)


def test_the_copy_swaps_only_instance_norms_and_keeps_the_parameters():
    torch.manual_seed(0)
    model = build_model(3, 3, 16, 8)
    swapped = with_compiled_norm_backward(model)
    kinds = [type(m) for m in swapped.features]
    assert kinds.count(CompiledBackwardInstanceNorm) == 3 and nn.GroupNorm not in kinds
    assert all(type(m) is nn.GroupNorm for m in model.features if isinstance(m, nn.GroupNorm))  # the original is kept
    assert swapped.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(swapped.state_dict().values(), model.state_dict().values(), strict=True))
    batch_norm = build_model(3, 3, 16, 8, norm="batchnorm")
    assert [type(m) for m in with_compiled_norm_backward(batch_norm).modules()] == [type(m) for m in batch_norm.modules()]


@needs_compiler
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_dkkt_double_backward_through_the_compiled_norm_is_the_eager_one(precision):
    """L_stat and its gradients on the images and the multipliers, with the eager and the compiled norm backward in
    the same precision (bf16: both under autocast), over two chunk sizes (one graph per layer for any image count)."""
    torch.manual_seed(0)
    model = freeze_model(build_model(3, 3, 16, 8), "cpu")
    fast = with_compiled_norm_backward(model)
    for n in (6, 30):  # one chunk, then two (CPU chunks of 20)
        gen = torch.Generator().manual_seed(n)
        y = torch.arange(3).repeat(n // 3)
        results = []
        for net in (model, fast):
            x = torch.randn(n, 3, 16, 16, generator=gen.manual_seed(n)).requires_grad_(True)
            lambdas = torch.full((n,), 0.5, requires_grad=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                stat, _ = stationarity_and_logits(net, x, y, lambdas)
            results.append((stat.detach(), *torch.autograd.grad(stat, [x, lambdas])))
        if precision == "fp32":
            for a, b in zip(*results, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        else:  # bf16 rounds differently in each (the compiled norm computes in fp32): close, not equal
            (stat, *grads), (fast_stat, *fast_grads) = results
            assert abs(float(fast_stat / stat) - 1) < 1e-2
            assert all(F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999
                       for a, b in zip(grads, fast_grads, strict=True))
