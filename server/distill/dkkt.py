"""Deep KKT (DKKT) loss of Deep Support Vectors (Lee et al. 2024) against a frozen model theta*.

RESEARCH.md section 1.3, as implemented (g_j = grad_theta CE(f(x_j; theta*), y_j), P = number of parameters):
    L_stat(X)  = (1/P) * || theta* + sum_j lambda_j g_j ||_1
    L_prim(X)  = (1/n) * sum_j [argmax f(x_j) != y_j] * CE_j
    L_kkt(X)   = stat_weight * L_stat(X) + primal_weight * L_prim(X)
    L_DKKT     = plain_weight * L_kkt(S) + aug_weight * L_kkt(A(S)) + tv_weight * L_tv(S) + norm_weight * L_norm(S)
(stat_weight = plain_weight = 1 is the paper's loss; the weights switch each part off for the ablations.)

sum_j lambda_j g_j is computed as the gradient of the lambda-weighted CE sum (linearity of the gradient):
one forward and one backward through theta*, kept in the graph (torch.autograd.grad with create_graph)
so that the loss is differentiable w.r.t. the images and lambda. This is exact because the model treats
samples independently (instance norm, or batch norm in eval mode), and it never materialises the n x P
per-sample gradients that vmap(grad) would (500 images x 320k parameters = 160M floats, all of which the
backward of the lambda-weighted sum would have to keep). `naive_stationarity_loss` is the per-sample loop
used as the correctness guard. With `distill.compile` the caller passes a theta* whose instance norms have a compiled
backward (`norm_backward`; the same values to float rounding); with `distill.precision=bf16` it runs the term under
bfloat16 autocast (`terms.DkktTerm`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from common.config import DistillConfig
from common.models import cpu_chunk
from server.distill.dsa import DSAParams, apply_dsa


def freeze_model(model: nn.Module, device: torch.device | str) -> nn.Module:
    """A copy of `model` on `device`, in eval mode, with requires_grad off (the caller's model is untouched)."""
    return copy.deepcopy(model).to(device).eval().requires_grad_(False)


def _flat_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def _stationarity_distance(params: dict[str, torch.Tensor], weighted_grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """(1/P) * sum over all parameters of |theta* + sum_j lambda_j g_j|."""
    total = sum(p.numel() for p in params.values())
    return sum((params[k] + weighted_grads[k]).abs().sum() for k in params) / total


def _chunk_grads(model: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], xs: torch.Tensor,
                 ys: torch.Tensor, ls: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(sum_j lambda_j g_j over the chunk, its logits), both differentiable w.r.t. the images and lambda."""
    leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    logits = functional_call(model, (leaves, buffers), (xs,))
    weighted_ce = (ls * F.cross_entropy(logits, ys, reduction="none")).sum()
    grads = torch.autograd.grad(weighted_ce, list(leaves.values()), create_graph=True, materialize_grads=True)
    return dict(zip(leaves, grads, strict=True)), logits


# Images per pass of this term on the CPU under bfloat16 autocast (`distill.precision`), eager or compiled: there 50
# ran 1.04-1.16x faster than CPU_CHUNK's 20 at 100 and 200 candidates; in fp32, 20 stays the faster (docs/benchmarks.md,
# "Chunk size: re-measured", simulations.benchmarks.chunk_sizes).
BF16_CHUNK = 50


def stationarity_and_logits(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, lambdas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_stat for candidates (x, y) with multipliers `lambdas`, and the logits f(x; theta*) (both differentiable)."""
    params = _flat_params(model)
    buffers = dict(model.named_buffers())
    # On the CPU, sum the chunks' weighted gradients (cache-sized activations; the same sum to float rounding).
    bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    chunk = cpu_chunk(model, x, BF16_CHUNK if bf16 else None) or x.shape[0]
    parts = [_chunk_grads(model, params, buffers, xs, ys, ls)
             for xs, ys, ls in zip(x.split(chunk), y.split(chunk), lambdas.split(chunk), strict=True)]
    if len(parts) == 1:
        weighted_grads, logits = parts[0]
    else:
        weighted_grads = {k: torch.stack([g[k] for g, _ in parts]).sum(0) for k in params}
        logits = torch.cat([part_logits for _, part_logits in parts])
    return _stationarity_distance(params, weighted_grads), logits


def stationarity_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """L_stat, batched (one double backward)."""
    return stationarity_and_logits(model, x, y, lambdas)[0]


def naive_stationarity_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """L_stat from explicit per-sample gradients, one torch.autograd.grad per sample (slow; the test guard)."""
    params = {k: v.clone().requires_grad_(True) for k, v in _flat_params(model).items()}
    buffers = dict(model.named_buffers())
    summed = {k: torch.zeros_like(v) for k, v in params.items()}
    for j in range(x.shape[0]):
        logits = functional_call(model, (params, buffers), (x[j : j + 1],))
        g = torch.autograd.grad(F.cross_entropy(logits, y[j : j + 1]), list(params.values()), create_graph=True)
        summed = {k: summed[k] + lambdas[j] * gj for k, gj in zip(params, g, strict=True)}
    return _stationarity_distance(_flat_params(model), summed)


def primal_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(1/n) sum_j [argmax != y_j] * CE_j: zero when every candidate is classified as its label."""
    wrong = (logits.argmax(dim=1) != y).to(logits.dtype)
    return (wrong * F.cross_entropy(logits, y, reduction="none")).mean()


def kkt_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, lambdas: torch.Tensor, primal_weight: float
) -> dict[str, torch.Tensor]:
    """{'kkt': L_stat + primal_weight * L_prim, 'stat': L_stat, 'primal': L_prim}."""
    stat, logits = stationarity_and_logits(model, x, y, lambdas)
    prim = primal_loss(logits.to(x.dtype), y)  # the images' dtype: bf16 logits under autocast
    return {"kkt": stat + primal_weight * prim, "stat": stat, "primal": prim}


def tv_loss(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation: mean |vertical difference| + mean |horizontal difference|."""
    return (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean() + (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()


def norm_loss(x: torch.Tensor) -> torch.Tensor:
    """Mean squared pixel value (in normalised space)."""
    return x.pow(2).mean()


def dkkt_parts(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    lambdas: torch.Tensor,
    cfg: DistillConfig,
    aug: DSAParams | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The weighted parts of L_DKKT (they sum to it) and its unweighted terms (logged); `aug` is the DSA draw for
    the augmented view (one group per image)."""
    views = {"": (cfg.plain_weight, x), "_aug": (cfg.aug_weight, None)}
    terms, parts = {}, {}
    for suffix, (weight, view) in views.items():
        if weight == 0:
            continue
        kkt = kkt_loss(model, apply_dsa(x, aug) if view is None else view, y, lambdas, cfg.primal_weight)
        terms.update({f"stat{suffix}": kkt["stat"], f"primal{suffix}": kkt["primal"]})
        parts.update({f"stat{suffix}": weight * cfg.stat_weight * kkt["stat"],
                      f"primal{suffix}": weight * cfg.primal_weight * kkt["primal"]})
    if cfg.tv_weight > 0:
        terms["tv"] = tv_loss(x)
        parts["tv"] = cfg.tv_weight * terms["tv"]
    if cfg.norm_weight > 0:
        terms["norm"] = norm_loss(x)
        parts["norm"] = cfg.norm_weight * terms["norm"]
    return parts, terms


def dkkt_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    lambdas: torch.Tensor,
    cfg: DistillConfig,
    aug: DSAParams | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_DKKT and its unweighted terms; `aug` is the DSA draw for the augmented view (one group per image)."""
    parts, terms = dkkt_parts(model, x, y, lambdas, cfg, aug)
    return sum(parts.values()), terms
