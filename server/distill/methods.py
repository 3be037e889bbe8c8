"""The distillation methods: random real images, DM, DSV (DKKT only) and DM + DKKT.

Images are optimised with SGD(lr_img, momentum_img) as in DM; the DKKT multipliers lambda (one per
synthetic image) with their own Adam and a projection onto lambda >= 0 (see docs/method.md).
Everything stays on `device`; no DataLoader. `distill.compile` compiles the DM embedder and the DKKT term's per-chunk
gradient; `distill.precision=bf16` runs both losses under bfloat16 autocast (decided here, `common.runtime.autocast`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from common.config import DistillConfig, ModelConfig
from common.methods import method
from common.models import model_from_config
from common.runtime import autocast, compiled, seed_everything
from server.distill.balance import DkktWeight
from server.distill.dkkt import dkkt_loss, freeze_model
from server.distill.dm import PublicPool, dm_loss, randomize_
from server.distill.dsa import parse_strategy, sample_dsa
from server.distill.lambdas import Multipliers, fitted_multipliers, flat_parameters


@dataclass
class SyntheticSet:
    """A distilled set: images (N, C, H, W) float, normalised; labels (N,) int64, class-major, ipc per class."""

    images: torch.Tensor
    labels: torch.Tensor
    lambdas: torch.Tensor | None
    method: str
    seed: int
    config: dict[str, Any] = field(default_factory=dict)


# callback(iteration, metrics, current set): called every cfg.log_every and cfg.checkpoint_every
# iterations and after the last one; metrics hold the loss terms of that iteration and the lambda stats.
DistillCallback = Callable[[int, dict[str, float], SyntheticSet], None]


@dataclass
class DistillState:
    """All the loop carries from one iteration to the next: continuing from it gives the uninterrupted result.

    Plain tensors and containers only (saved with torch.save, loaded with weights_only=True).
    """

    iteration: int
    images: torch.Tensor  # (N, C, H, W), CPU
    lambdas: torch.Tensor | None  # (N,), CPU; dsv and dm+dkkt only
    opt_img: dict[str, Any]  # SGD state_dict (momentum buffers)
    opt_lambda: dict[str, Any] | None  # Adam state_dict of the multipliers
    rng: dict[str, torch.Tensor]  # "cpu": global CPU RNG (network re-inits), "loop": the loop's generator, "cuda"
    balance: dict[str, torch.Tensor] | None = None  # DkktWeight's running gradient norms (dkkt_weight=auto)


# checkpoint(state): called every cfg.checkpoint_every iterations.
CheckpointCallback = Callable[[DistillState], None]


def initial_images(
    public_x: torch.Tensor,
    public_y: torch.Tensor,
    num_classes: int,
    ipc: int,
    init: str,
    generator: torch.Generator,
    scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ipc public images per class, random (init=real) or the highest `scores` (init=lambda, ties broken at
    random), or N(0, 1) noise of the same shape (init=noise).

    Draws on the CPU generator so that a seed picks the same images on every device.
    """
    labels = torch.arange(num_classes).repeat_interleave(ipc)
    if init == "noise":
        shape = (num_classes * ipc, *public_x.shape[1:])
        return torch.randn(shape, generator=generator).to(public_x.device, public_x.dtype), labels.to(public_x.device)
    y_cpu = public_y.cpu()
    picks = []
    for c in range(num_classes):
        idx = torch.nonzero(y_cpu == c).flatten()
        if idx.numel() < ipc:
            raise ValueError(f"distill.ipc={ipc}: class {c} has only {idx.numel()} public images for init={init}")
        order = torch.randperm(idx.numel(), generator=generator)
        if init == "lambda":
            order = order[torch.argsort(scores.cpu()[idx[order]], descending=True, stable=True)]
        picks.append(idx[order[:ipc]])
    chosen = torch.cat(picks).to(public_x.device)
    return public_x[chosen].clone(), labels.to(public_x.device)


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


def distill(
    model: nn.Module | None,
    public_x: torch.Tensor,
    public_y: torch.Tensor,
    cfg: DistillConfig,
    model_cfg: ModelConfig,
    num_classes: int,
    seed: int,
    device: torch.device | str,
    callback: DistillCallback | None = None,
    checkpoint: CheckpointCallback | None = None,
    resume: DistillState | None = None,
) -> SyntheticSet:
    """Distils ipc images per class with `cfg.method`; `model` (theta*) is needed for dsv and dm+dkkt only.

    public_x: (M, C, H, W) normalised public images (M may be 0 for dsv with init=noise); public_y: (M,).
    `resume` continues from a DistillState that `checkpoint` received in a run with the same arguments.
    Returns CPU tensors.
    """
    spec = method(cfg.method)
    uses_dm, uses_dkkt = spec.uses_dm, spec.uses_dkkt
    if uses_dkkt and model is None:
        raise ValueError(f"distill.method={cfg.method!r} needs the trained (frozen) model theta*; got model=None")
    if public_x.dim() != 4:
        raise ValueError(f"public_x must be (N, C, H, W); got shape {tuple(public_x.shape)}")
    families = parse_strategy(cfg.dsa_strategy)
    device = torch.device(device)
    cpu_gen = seed_everything(seed)
    public_x, public_y = public_x.to(device), public_y.to(device)
    init = "real" if cfg.init == "noise" and not spec.optimises else cfg.init
    frozen = freeze_model(model, device) if model is not None else None
    scores = None
    if init == "lambda":
        if frozen is None:
            raise ValueError("distill.init='lambda' ranks public images by their multipliers on theta*; got model=None")
        scores, _ = fitted_multipliers(frozen, public_x, public_y, cfg.lambda_fit_steps, cfg.lambda_lr)
    syn_x, syn_y = initial_images(public_x, public_y, num_classes, cfg.ipc, init, cpu_gen, scores)
    config = {"distill": cfg.model_dump(mode="json"), "model": model_cfg.model_dump(mode="json")}
    if not spec.optimises:
        return SyntheticSet(syn_x.cpu(), syn_y.cpu(), None, cfg.method, seed, config)

    gen = torch.Generator(device=device).manual_seed(seed)
    syn = syn_x.requires_grad_(True)
    opt_img = torch.optim.SGD([syn], lr=cfg.lr_img, momentum=cfg.momentum_img)
    if uses_dm:
        pool = PublicPool(public_x, public_y, num_classes, cfg.batch_real)
        embedder = model_from_config(model_cfg, num_classes, public_x.shape[1], public_x.shape[2])
        embedder = embedder.to(device).train().requires_grad_(False)
        embedder.embed = compiled(embedder.embed, cfg.compile, torch.device(device), "distill.compile")
    # DM-then-DKKT: the DKKT term joins at iteration `dkkt_start` (1 unless cfg.dkkt_from schedules DM alone first).
    dkkt_start = int(cfg.dkkt_from * cfg.iterations) + 1 if uses_dm else 1
    if uses_dkkt:
        if resume is not None:
            start_lambdas = resume.lambdas.to(device)
        elif cfg.lambda_fit_steps and dkkt_start == 1:
            start_lambdas, _ = fitted_multipliers(frozen, syn.detach(), syn_y, cfg.lambda_fit_steps, cfg.lambda_lr)
        else:  # the constant start (refitted when the DKKT term joins later, below)
            start_lambdas = torch.full((syn.shape[0],), cfg.lambda_init, device=device)
        multipliers = Multipliers(start_lambdas, cfg.lambda_lr)
        balance = DkktWeight(cfg, syn.numel(), device)
        theta_abs_mean = flat_parameters(frozen).abs().mean()
    start = 1
    if resume is not None:
        _restore(resume, syn, opt_img, multipliers if uses_dkkt else None, balance if uses_dkkt else None, gen, device,
                 continues=resume.iteration < cfg.iterations)
        start = resume.iteration + 1

    for it in range(start, cfg.iterations + 1):
        dkkt_on = uses_dkkt and it >= dkkt_start
        if dkkt_on and it == dkkt_start > 1 and cfg.lambda_fit_steps:  # lambda for the images DM has made so far
            fitted, _ = fitted_multipliers(frozen, syn.detach(), syn_y, cfg.lambda_fit_steps, cfg.lambda_lr)
            multipliers = Multipliers(fitted, cfg.lambda_lr)
        # One backward per term (each graph is traversed once, as a single backward of the sum would), so that
        # every term's gradient on the images is known: the DKKT weight is balanced on it and its share logged.
        terms: dict[str, torch.Tensor] = {}
        grad_img = torch.zeros_like(syn)
        if uses_dm:
            randomize_(embedder)
            real_x, real_groups = pool.sample(gen)
            per_class = sample_dsa(families, num_classes, gen, device)  # one draw per class, real and synthetic
            with autocast(device, cfg.precision):
                terms["dm"] = dm_loss(embedder, real_x, real_groups, syn, syn_y, num_classes, per_class)
            (grad_img,) = torch.autograd.grad(terms["dm"], syn)
            terms["grad_dm"] = grad_img.norm()
        if dkkt_on:
            x, y, lam = dkkt_candidates(syn, syn_y, multipliers.values, cfg.dkkt_candidates, gen)
            aug = sample_dsa(families, x.shape[0], gen, device)  # one independent draw per candidate
            with autocast(device, cfg.precision):
                terms["dkkt"], dkkt_terms = dkkt_loss(frozen, x, y, lam, cfg, aug)
            terms.update(dkkt_terms)
            grad_dkkt, multipliers.values.grad = torch.autograd.grad(terms["dkkt"], [syn, multipliers.values])
            dkkt_norm = grad_dkkt.norm()
            terms["dkkt_weight"] = balance.update(terms.get("grad_dm"), dkkt_norm)
            grad_img = grad_img + terms["dkkt_weight"] * grad_dkkt
            terms["grad_dkkt"] = terms["dkkt_weight"] * dkkt_norm
            terms["stat_rel"] = terms.get("stat", terms.get("stat_aug")) / theta_abs_mean
        syn.grad = grad_img
        opt_img.step()
        if dkkt_on:
            multipliers.step()
        if callback is not None and (it % cfg.log_every == 0 or it % cfg.checkpoint_every == 0 or it == cfg.iterations):
            terms["loss"] = terms.get("dm", 0.0) + (terms["dkkt_weight"] * terms["dkkt"] if dkkt_on else 0.0)
            if uses_dm and dkkt_on:
                total = terms["grad_dm"] + terms["grad_dkkt"]
                terms["share_dkkt"] = terms["grad_dkkt"] / total.clamp(min=torch.finfo(total.dtype).tiny)  # 0 when both are
            if uses_dkkt:
                terms.update(multipliers.stats())
            values = torch.stack([v.detach().float() for v in terms.values()]).tolist()  # one device sync
            _check_finite(it, dict(zip(terms, values, strict=True)))
            lambdas = multipliers.values.detach().cpu().clone() if uses_dkkt else None
            current = SyntheticSet(syn.detach().cpu().clone(), syn_y.cpu(), lambdas, cfg.method, seed, config)
            callback(it, dict(zip(terms, values, strict=True)), current)
        if checkpoint is not None and it % cfg.checkpoint_every == 0:
            checkpoint(_capture(it, syn, opt_img, multipliers if uses_dkkt else None, balance if uses_dkkt else None, gen,
                                device))

    if not bool(torch.isfinite(syn).all()):
        raise DistillDiverged(f"{cfg.method}: the synthetic images are not finite after {cfg.iterations} iterations "
                              "(log more often, distill.log_every, to see where); no set is saved")
    lambdas = multipliers.values.detach().cpu() if uses_dkkt else None
    return SyntheticSet(syn.detach().cpu(), syn_y.cpu(), lambdas, cfg.method, seed, config)


class DistillDiverged(ValueError):
    """The distillation produced non-finite losses or images: stopped with the iteration, not saved as a set."""


def _check_finite(it: int, values: dict[str, float]) -> None:
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise DistillDiverged(f"distillation diverged at iteration {it}: {', '.join(bad)} not finite "
                              f"({', '.join(f'{k}={values[k]:.4g}' for k in values if k in ('dm', 'dkkt', 'dkkt_weight'))})")


def _capture(
    it: int, syn: torch.Tensor, opt_img: torch.optim.Optimizer, multipliers: Multipliers | None,
    balance: DkktWeight | None, gen: torch.Generator, device: torch.device,
) -> DistillState:
    rng = {"cpu": torch.get_rng_state(), "loop": gen.get_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return DistillState(
        iteration=it,
        images=syn.detach().cpu().clone(),
        lambdas=multipliers.values.detach().cpu().clone() if multipliers is not None else None,
        opt_img=_to_cpu(opt_img.state_dict()),
        opt_lambda=_to_cpu(multipliers.optimizer.state_dict()) if multipliers is not None else None,
        rng=rng,
        balance=balance.state() if balance is not None else None,
    )


def _restore(
    state: DistillState, syn: torch.Tensor, opt_img: torch.optim.Optimizer, multipliers: Multipliers | None,
    balance: DkktWeight | None, gen: torch.Generator, device: torch.device, continues: bool,
) -> None:
    if tuple(state.images.shape) != tuple(syn.shape) or (multipliers is None) != (state.lambdas is None):
        raise ValueError(
            f"the checkpoint holds images {tuple(state.images.shape)} (lambdas: {state.lambdas is not None}), "
            f"not what distill.ipc / distill.method give {tuple(syn.shape)}; remove it to start over"
        )
    with torch.no_grad():
        syn.copy_(state.images.to(device))
        if multipliers is not None:
            multipliers.values.copy_(state.lambdas.to(device))
    opt_img.load_state_dict(state.opt_img)  # moves the buffers to the parameter's device
    if multipliers is not None:
        multipliers.optimizer.load_state_dict(state.opt_lambda)
    if balance is not None and state.balance is not None:
        balance.load(state.balance)
    torch.set_rng_state(state.rng["cpu"])
    if continues:  # a finished checkpoint draws nothing more: it may be evaluated on any device
        try:
            gen.set_state(state.rng["loop"])
        except RuntimeError:
            raise ValueError(f"the checkpoint's random stream was drawn on another device type than {device.type}: "
                             "continue it there, or remove it to start over") from None
    if "cuda" in state.rng and device.type == "cuda":
        torch.cuda.set_rng_state(state.rng["cuda"], device)


def _to_cpu(tree: Any) -> Any:
    """An optimizer state_dict with every tensor cloned to the CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu().clone()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_cpu(v) for v in tree)
    return tree
