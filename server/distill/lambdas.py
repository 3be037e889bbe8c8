"""The DKKT multipliers lambda: one per candidate image, kept >= 0, and fitted to theta* with the images frozen.

`fit_multipliers` solves min_{lambda >= 0} L_stat = (1/P) ||theta* + sum_j lambda_j g_j||_1 for fixed candidates, from
their per-sample gradients g_j (computed once, (n, P)): each step is two matrix-vector products, so hundreds of steps
cost less than one double backward through theta*. It gives the multipliers' start (`lambda_init: fit`) and the
ranking of `init: lambda` (the top-ipc public images of each class by lambda, DSV Table 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

FIT_CHUNK = 64  # candidates per vmap'd per-sample-gradient call (bounds the peak memory)


class Multipliers:
    """One Lagrange multiplier lambda_j >= 0 per synthetic image, with its own Adam optimiser.

    Dual feasibility is kept by projection: lambda.clamp_(min=0) after every step.
    """

    def __init__(self, initial: torch.Tensor, lr: float) -> None:
        self.values = initial.detach().clone().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.values], lr=lr)

    def step(self) -> None:
        self.optimizer.step()
        with torch.no_grad():
            self.values.clamp_(min=0.0)

    def stats(self) -> dict[str, torch.Tensor]:
        """lambda mean, min, max and how many are at 0 (the candidates DSV would have removed)."""
        v = self.values.detach()
        return {"lambda_mean": v.mean(), "lambda_min": v.min(), "lambda_max": v.max(), "lambda_zeros": (v == 0).sum()}


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """theta* as one vector (P,), in named_parameters order."""
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def per_sample_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """g_j = grad_theta CE(f(x_j; theta), y_j) for every candidate, flattened: (n, P), no graph."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def sample_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, (p, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    rows = []
    with torch.no_grad():
        for start in range(0, x.shape[0], FIT_CHUNK):
            g = per_sample(params, x[start : start + FIT_CHUNK], y[start : start + FIT_CHUNK])
            rows.append(torch.cat([g[k].flatten(1) for k in params], dim=1))
    return torch.cat(rows)


def fit_multipliers(gradients: torch.Tensor, theta: torch.Tensor, steps: int, lr: float) -> tuple[torch.Tensor, list[float]]:
    """lambda >= 0 minimising (1/P) ||theta + lambda @ gradients||_1 by projected Adam from lambda = 0.

    gradients: (n, P) per-sample gradients; theta: (P,). Returns the best lambda seen (so its L_stat is at most
    mean|theta|, the value at lambda = 0) and L_stat at every step.
    """
    lam = torch.zeros(gradients.shape[0], device=gradients.device, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=lr)
    history: list[float] = []
    best, best_loss = lam.detach().clone(), float("inf")
    for _ in range(steps + 1):
        loss = (theta + lam @ gradients).abs().mean()
        history.append(loss.item())
        if history[-1] < best_loss:
            best, best_loss = lam.detach().clone(), history[-1]
        if len(history) > steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            lam.clamp_(min=0.0)
    return best, history


def fitted_multipliers(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float
                       ) -> tuple[torch.Tensor, list[float]]:
    """`fit_multipliers` for candidates (x, y) of the frozen `model`."""
    return fit_multipliers(per_sample_gradients(model, x, y), flat_parameters(model), steps, lr)
