"""How much the DKKT term weighs against DM on the synthetic images.

`distill.dkkt_weight` is a number (the weight itself) or `auto` (the default): the DKKT gradient on the images is
held at `dkkt_ratio` times a reference norm,

    w_t = dkkt_ratio * max(EMA ||grad_S L_DM||, g_floor) / ||grad_S L_DKKT||_t,
    g_floor = dkkt_min_step * sqrt(numel(S)) / lr_img,

so the DKKT part of every step has the norm dkkt_ratio x the running mean of DM's gradient norm (a bias-corrected
exponential moving average, decay 0.9: DM's norm jumps with every freshly drawn embedder, the DKKT norm does not).
The floor is the gradient norm that moves the pixels by an RMS of `dkkt_min_step` per SGD step: it sets the scale where
DM's gradient vanishes (ipc = pipc with init=real, where the synthetic set is the public set) and for `dsv`, which has
no DM term. Both norms come from the backward passes the step needs anyway (one per term), so the cost is two vector
norms. Everything stays on the device: no host sync per iteration.
"""

from __future__ import annotations

import math

import torch

from common.config import DistillConfig

EMA_DECAY = 0.9
MIN_GRAD_NORM = 1e-30  # a DKKT gradient norm at or below this counts as none (its weight stays finite above it)


class DkktWeight:
    """The weight of L_DKKT at each iteration, fixed or balanced against DM (module docstring)."""

    def __init__(self, cfg: DistillConfig, num_pixels: int, device: torch.device | str) -> None:
        self.fixed = None if cfg.dkkt_weight == "auto" else float(cfg.dkkt_weight)
        self.ratio = cfg.dkkt_ratio
        self.floor = cfg.dkkt_min_step * math.sqrt(num_pixels) / cfg.lr_img
        self.ema = torch.zeros((), device=device)  # of DM's gradient norm
        self.steps = torch.zeros((), device=device)

    def update(self, dm_norm: torch.Tensor | None, dkkt_norm: torch.Tensor) -> torch.Tensor:
        """Folds this iteration's gradient norms into the averages; returns the weight for this iteration."""
        if self.fixed is not None:
            return dkkt_norm.new_tensor(self.fixed)
        self.steps += 1
        if dm_norm is not None:
            self.ema.mul_(EMA_DECAY).add_((1 - EMA_DECAY) * dm_norm.detach())
        dm_avg = self.ema / (1 - EMA_DECAY**self.steps)
        # A term without gradient this iteration (e.g. the primal cross-entropy alone, once every candidate is
        # classified with probability 1.0 in float32) gets weight 0, not ratio / 0 = inf (and inf * 0 = NaN images).
        norm = dkkt_norm.detach()
        active = norm > MIN_GRAD_NORM
        weight = self.ratio * dm_avg.clamp(min=self.floor) / norm.clamp(min=MIN_GRAD_NORM)
        weight = weight.clamp(max=torch.finfo(norm.dtype).max)
        return torch.where(active, weight, 0.0)

    def state(self) -> dict[str, torch.Tensor]:
        return {"ema": self.ema.detach().cpu().clone(), "steps": self.steps.detach().cpu().clone()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.ema.copy_(state["ema"])
        self.steps.copy_(state["steps"])
