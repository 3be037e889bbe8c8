"""Instance norm with a compiled backward, for the DKKT term's double backward (`distill.compile`).

The DKKT loss differentiates theta*'s parameter gradient, so every instance norm (GroupNorm(C, C)) of theta* is
differentiated twice. PyTorch's own double backward of group norm is a chain of eager element-wise ops (with bf16
autocast, dtype copies between them); here the first-order backward is one plain-op function run through
torch.compile, from which inductor derives and fuses its backward, the norm's double backward (docs/benchmarks.md,
"Distillation modes"). The forward is PyTorch's; the values are the same to float rounding. Used on a copy of the
frozen theta*, never on a model that trains.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.runtime import compiled


def instance_norm_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad x, grad weight, grad bias) of y = weight * (x - mean) / sqrt(var + eps) + bias per (image, channel),
    x and grad_out (N, C, H, W), in fp32 arithmetic at least (grad x in x's dtype): differentiable, so its own gradient
    is the norm's double backward."""
    n, c = x.shape[:2]
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(dtype).reshape(n, c, -1)
    var, mean = torch.var_mean(xf, dim=-1, keepdim=True, correction=0)
    rstd = (var + eps).rsqrt()
    xhat = (xf - mean) * rstd
    gy = grad_out.to(dtype).reshape(n, c, -1)
    mean_gy = gy.mean(-1, keepdim=True)
    mean_gy_xhat = (gy * xhat).mean(-1, keepdim=True)
    grad_x = (weight.view(1, c, 1) * rstd) * (gy - mean_gy - xhat * mean_gy_xhat)
    m = xf.shape[-1]
    return grad_x.reshape(x.shape).to(x.dtype), mean_gy_xhat.sum(0).view(c) * m, mean_gy.sum(0).view(c) * m


RECOMPILE_LIMIT = 64


@functools.cache
def _compiled_backward(device_type: str) -> Callable[..., Any]:
    return compiled(instance_norm_backward, True, torch.device(device_type), "distill.compile")


class _InstanceNorm(torch.autograd.Function):
    """PyTorch's group norm forward, `instance_norm_backward` compiled as its backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return F.group_norm(x, x.shape[1], weight, bias, eps)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        x, weight = ctx.saved_tensors
        # One graph per layer shape and dtype, any number of images (chunks differ); a limit above dynamo's default
        # of 8, past which the eager plain-op function (far slower than PyTorch's own backward) would run instead.
        for t in (grad_out, x):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return *_compiled_backward(x.device.type)(grad_out, x, weight, ctx.eps), None


class CompiledBackwardInstanceNorm(nn.GroupNorm):
    """GroupNorm(C, C) (affine) whose backward is `instance_norm_backward` compiled; the same parameters and state
    dict keys as the module it replaces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _InstanceNorm.apply(x, self.weight, self.bias, self.eps)


def with_compiled_norm_backward(model: nn.Module) -> nn.Module:
    """A copy of `model` whose instance norms (affine GroupNorm(C, C)) have the compiled backward; other layers, and
    models without such norms (batch norm, none), are copied as they are."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.GroupNorm and child.affine and child.num_groups == child.num_channels:
                fused = CompiledBackwardInstanceNorm(child.num_groups, child.num_channels, child.eps)
                fused.load_state_dict(child.state_dict())
                setattr(parent, name, fused.to(child.weight.device).train(child.training).requires_grad_(
                    child.weight.requires_grad))
    return model
