"""The distillation methods: random real images, DM, DSV (DKKT only) and DM + DKKT.

Images are optimised with SGD(lr_img, momentum_img) as in DM; the DKKT multipliers lambda (one per
synthetic image) with their own Adam and a projection onto lambda >= 0 (see docs/method.md). Each iteration adds the
gradients of the two terms (`terms.DmTerm`, `terms.DkktTerm`, where `distill.compile` and `distill.precision=bf16`
act, through `common.runtime`) and steps. Everything stays on `device`; no DataLoader."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from common.config import DistillConfig, ModelConfig
from common.methods import method
from common.runtime import seed_everything
from server.distill.dkkt import freeze_model
from server.distill.dsa import parse_strategy
from server.distill.lambdas import fitted_multipliers
from server.distill.terms import DkktTerm, DmTerm, cpu_copy


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
    dm = DmTerm(public_x, public_y, num_classes, cfg, model_cfg, families, device) if uses_dm else None
    # DM-then-DKKT: the DKKT term joins at iteration `dkkt_start` (1 unless cfg.dkkt_from schedules DM alone first),
    # its multipliers fitted to the images of that moment (or the constant lambda_init without fitting).
    dkkt_start = int(cfg.dkkt_from * cfg.iterations) + 1 if uses_dm else 1
    dkkt = None
    if uses_dkkt:
        dkkt = DkktTerm(frozen, cfg, torch.full((syn.shape[0],), cfg.lambda_init, device=device), syn.numel(), families,
                        device)
        if cfg.lambda_fit_steps and dkkt_start == 1 and resume is None:
            dkkt.refit(syn, syn_y)
    start = 1
    if resume is not None:
        _restore(resume, syn, opt_img, dkkt, gen, device, continues=resume.iteration < cfg.iterations)
        start = resume.iteration + 1

    for it in range(start, cfg.iterations + 1):
        dkkt_on = dkkt is not None and it >= dkkt_start
        if dkkt_on and it == dkkt_start > 1 and cfg.lambda_fit_steps:
            dkkt.refit(syn, syn_y)
        # One backward per term (each graph is traversed once, as a single backward of the sum would), so that
        # every term's gradient on the images is known: the DKKT weight is balanced on it and its share logged.
        terms, grad_img = dm.gradient(syn, syn_y, gen) if dm is not None else ({}, torch.zeros_like(syn))
        if dkkt_on:
            dkkt_terms, grad_dkkt = dkkt.gradient(syn, syn_y, gen, terms.get("grad_dm"))
            terms.update(dkkt_terms)
            grad_img = grad_img + grad_dkkt
        syn.grad = grad_img
        opt_img.step()
        if dkkt_on:
            dkkt.step()
        if callback is not None and (it % cfg.log_every == 0 or it % cfg.checkpoint_every == 0 or it == cfg.iterations):
            values = _logged(it, terms, dkkt, dkkt_on)
            lambdas = dkkt.lambdas.cpu().clone() if dkkt is not None else None
            callback(it, values, SyntheticSet(syn.detach().cpu().clone(), syn_y.cpu(), lambdas, cfg.method, seed, config))
        if checkpoint is not None and it % cfg.checkpoint_every == 0:
            checkpoint(_capture(it, syn, opt_img, dkkt, gen, device))

    if not bool(torch.isfinite(syn).all()):
        raise DistillDiverged(f"{cfg.method}: the synthetic images are not finite after {cfg.iterations} iterations "
                              "(log more often, distill.log_every, to see where); no set is saved")
    return SyntheticSet(syn.detach().cpu(), syn_y.cpu(), dkkt.lambdas.cpu() if dkkt is not None else None, cfg.method,
                        seed, config)


def _logged(it: int, terms: dict[str, torch.Tensor], dkkt: DkktTerm | None, dkkt_on: bool) -> dict[str, float]:
    """This iteration's logged values: its terms, the total loss, DKKT's share of the image gradient (when both terms
    act), the multipliers' stats; fetched with one device sync, checked finite."""
    terms["loss"] = terms.get("dm", 0.0) + (terms["dkkt_weight"] * terms["dkkt"] if dkkt_on else 0.0)
    if "grad_dm" in terms and dkkt_on:
        total = terms["grad_dm"] + terms["grad_dkkt"]
        terms["share_dkkt"] = terms["grad_dkkt"] / total.clamp(min=torch.finfo(total.dtype).tiny)  # 0 when both are
    if dkkt is not None:
        terms.update(dkkt.stats())
    values = dict(zip(terms, torch.stack([v.detach().float() for v in terms.values()]).tolist(), strict=True))
    _check_finite(it, values)
    return values


class DistillDiverged(ValueError):
    """The distillation produced non-finite losses or images: stopped with the iteration, not saved as a set."""


def _check_finite(it: int, values: dict[str, float]) -> None:
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise DistillDiverged(f"distillation diverged at iteration {it}: {', '.join(bad)} not finite "
                              f"({', '.join(f'{k}={values[k]:.4g}' for k in values if k in ('dm', 'dkkt', 'dkkt_weight'))})")


def _capture(it: int, syn: torch.Tensor, opt_img: torch.optim.Optimizer, dkkt: DkktTerm | None, gen: torch.Generator,
             device: torch.device) -> DistillState:
    rng = {"cpu": torch.get_rng_state(), "loop": gen.get_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    dkkt_state = dkkt.state() if dkkt is not None else {"lambdas": None, "opt_lambda": None, "balance": None}
    return DistillState(iteration=it, images=syn.detach().cpu().clone(), opt_img=cpu_copy(opt_img.state_dict()), rng=rng,
                        **dkkt_state)


def _restore(state: DistillState, syn: torch.Tensor, opt_img: torch.optim.Optimizer, dkkt: DkktTerm | None,
             gen: torch.Generator, device: torch.device, continues: bool) -> None:
    if tuple(state.images.shape) != tuple(syn.shape) or (dkkt is None) != (state.lambdas is None):
        raise ValueError(
            f"the checkpoint holds images {tuple(state.images.shape)} (lambdas: {state.lambdas is not None}), "
            f"not what distill.ipc / distill.method give {tuple(syn.shape)}; remove it to start over"
        )
    with torch.no_grad():
        syn.copy_(state.images.to(device))
    opt_img.load_state_dict(state.opt_img)  # moves the buffers to the parameter's device
    if dkkt is not None:
        dkkt.load(state.lambdas, state.opt_lambda, state.balance)
    torch.set_rng_state(state.rng["cpu"])
    if continues:  # a finished checkpoint draws nothing more: it may be evaluated on any device
        try:
            gen.set_state(state.rng["loop"])
        except RuntimeError:
            raise ValueError(f"the checkpoint's random stream was drawn on another device type than {device.type}: "
                             "continue it there, or remove it to start over") from None
    if "cuda" in state.rng and device.type == "cuda":
        torch.cuda.set_rng_state(state.rng["cuda"], device)
