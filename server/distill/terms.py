"""The two terms of a distillation step, each an object holding what it carries from one iteration to the next.

`DmTerm`: Distribution Matching against the public images (a freshly initialised embedder each step; no state of its
own beyond the random streams). `DkktTerm`: the Deep KKT loss on the received model theta*, with its multipliers
lambda (their own Adam) and its weight against DM (`balance.DkktWeight`); `state`/`load` give what a checkpoint keeps.
Each returns its gradient on the synthetic images and the values it logs; `methods.distill` adds them and steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from common.config import DistillConfig, ModelConfig
from common.models import model_from_config
from common.runtime import autocast, compiled, require_compiler
from server.distill.balance import DkktWeight
from server.distill.dkkt import dkkt_loss
from server.distill.dm import PublicPool, dm_loss, randomize_
from server.distill.dsa import sample_dsa
from server.distill.lambdas import Multipliers, fitted_multipliers, flat_parameters
from server.distill.norm_backward import with_compiled_norm_backward

Terms = dict[str, torch.Tensor]


def dkkt_candidates(
    syn: torch.Tensor, syn_y: torch.Tensor, lambdas: torch.Tensor, m: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The candidates of this iteration's DKKT term: all n, or (m > 0) m of them at random with lambda scaled by n/m,
    so that sum_j lambda_j g_j over them is an unbiased estimate of the sum over all n (the l1 distance of it is not)."""
    n = syn.shape[0]
    if not m or m >= n:
        return syn, syn_y, lambdas
    idx = torch.randperm(n, generator=generator, device=syn.device)[:m]
    return syn[idx], syn_y[idx], lambdas[idx] * (n / m)


class DmTerm:
    """L_DM of one step: a class-balanced real batch from the public pool, one DSA draw per class (real and synthetic
    alike), a randomly re-initialised embedder (drawn from the global CPU stream)."""

    def __init__(self, public_x: torch.Tensor, public_y: torch.Tensor, num_classes: int, cfg: DistillConfig,
                 model_cfg: ModelConfig, families: list[str], device: torch.device) -> None:
        self.pool = PublicPool(public_x, public_y, num_classes, cfg.batch_real)
        embedder = model_from_config(model_cfg, num_classes, public_x.shape[1], public_x.shape[2])
        self.embedder = embedder.to(device).train().requires_grad_(False)
        self.embedder.embed = compiled(self.embedder.embed, cfg.compile, device, "distill.compile")
        self.num_classes, self.families, self.precision, self.device = num_classes, families, cfg.precision, device

    def gradient(self, syn: torch.Tensor, syn_y: torch.Tensor, gen: torch.Generator) -> tuple[Terms, torch.Tensor]:
        """({"dm", "grad_dm"}, grad_S L_DM)."""
        randomize_(self.embedder)
        real_x, real_groups = self.pool.sample(gen)
        per_class = sample_dsa(self.families, self.num_classes, gen, self.device)
        with autocast(self.device, self.precision):
            loss = dm_loss(self.embedder, real_x, real_groups, syn, syn_y, self.num_classes, per_class)
        (grad,) = torch.autograd.grad(loss, syn)
        return {"dm": loss, "grad_dm": grad.norm()}, grad


class DkktTerm:
    """L_DKKT on the frozen theta*, weighted against DM: its multipliers (one per synthetic image) and the weight's
    running norms are its state."""

    def __init__(self, frozen: nn.Module, cfg: DistillConfig, lambdas: torch.Tensor, num_pixels: int,
                 families: list[str], device: torch.device) -> None:
        self.frozen, self.cfg, self.families, self.device = frozen, cfg, families, device
        # distill.compile: the loss runs on a copy whose instance norms have a compiled (double) backward; the
        # multiplier fit (vmap over per-sample gradients) keeps theta* as it is.
        if cfg.compile:
            require_compiler(device, "distill.compile")
        self.loss_model = with_compiled_norm_backward(frozen) if cfg.compile else frozen
        self.multipliers = Multipliers(lambdas, cfg.lambda_lr)
        self.weight = DkktWeight(cfg, num_pixels, device)
        self.theta_abs_mean = flat_parameters(frozen).abs().mean()

    def refit(self, syn: torch.Tensor, syn_y: torch.Tensor) -> None:
        """Starts the multipliers afresh from those fitted to theta* with the current images frozen
        (cfg.lambda_fit_steps projected Adam steps): at the start, or when the DKKT term joins after DM alone."""
        fitted, _ = fitted_multipliers(self.frozen, syn.detach(), syn_y, self.cfg.lambda_fit_steps, self.cfg.lambda_lr)
        self.multipliers = Multipliers(fitted, self.cfg.lambda_lr)

    def gradient(self, syn: torch.Tensor, syn_y: torch.Tensor, gen: torch.Generator,
                 dm_norm: torch.Tensor | None) -> tuple[Terms, torch.Tensor]:
        """(L_DKKT's parts, its weight, the weighted gradient's norm, stat_rel; the weighted grad_S L_DKKT).

        Also sets the multipliers' gradient for `step`."""
        lambdas = self.multipliers.values
        x, y, lam = dkkt_candidates(syn, syn_y, lambdas, self.cfg.dkkt_candidates, gen)
        aug = sample_dsa(self.families, x.shape[0], gen, self.device)  # one independent draw per candidate
        with autocast(self.device, self.cfg.precision):
            loss, parts = dkkt_loss(self.loss_model, x, y, lam, self.cfg, aug)
        grad, lambdas.grad = torch.autograd.grad(loss, [syn, lambdas])
        norm = grad.norm()
        weight = self.weight.update(dm_norm, norm)
        stat = parts.get("stat", parts.get("stat_aug"))
        terms = {"dkkt": loss, **parts, "dkkt_weight": weight, "grad_dkkt": weight * norm,
                 "stat_rel": stat / self.theta_abs_mean}
        return terms, weight * grad

    def step(self) -> None:
        """One projected Adam step of the multipliers on the gradient `gradient` left."""
        self.multipliers.step()

    def stats(self) -> Terms:
        return self.multipliers.stats()

    @property
    def lambdas(self) -> torch.Tensor:
        return self.multipliers.values.detach()

    def state(self) -> dict[str, Any]:
        """CPU copies of the multipliers, their Adam state and the weight's running norms."""
        return {"lambdas": self.lambdas.cpu().clone(), "opt_lambda": cpu_copy(self.multipliers.optimizer.state_dict()),
                "balance": self.weight.state()}

    def load(self, lambdas: torch.Tensor, opt_lambda: dict[str, Any], balance: dict[str, torch.Tensor] | None) -> None:
        with torch.no_grad():
            self.multipliers.values.copy_(lambdas.to(self.device))
        self.multipliers.optimizer.load_state_dict(opt_lambda)
        if balance is not None:
            self.weight.load(balance)


def cpu_copy(tree: Any) -> Any:
    """An optimizer state_dict with every tensor cloned to the CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu().clone()
    if isinstance(tree, dict):
        return {k: cpu_copy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(cpu_copy(v) for v in tree)
    return tree
