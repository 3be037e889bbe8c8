"""The distillation methods: random real images, DM, DSV (DKKT only) and DM + DKKT.

Images are optimised with SGD(lr_img, momentum_img) as in DM; the DKKT multipliers lambda (one per
synthetic image) with their own Adam and a projection onto lambda >= 0 (see docs/method.md).
Everything stays on `device`; no DataLoader.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from common.config import DistillConfig, ModelConfig
from common.methods import method
from common.models import model_from_config
from common.runtime import seed_everything
from server.distill.dkkt import Multipliers, dkkt_loss, freeze_model
from server.distill.dm import PublicPool, dm_loss, randomize_
from server.distill.dsa import parse_strategy, sample_dsa



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


# checkpoint(state): called every cfg.checkpoint_every iterations.
CheckpointCallback = Callable[[DistillState], None]


def initial_images(
    public_x: torch.Tensor,
    public_y: torch.Tensor,
    num_classes: int,
    ipc: int,
    init: str,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ipc random public images per class (init=real) or N(0, 1) noise of the same shape (init=noise).

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
            raise ValueError(f"distill.ipc={ipc}: class {c} has only {idx.numel()} public images for init=real")
        picks.append(idx[torch.randperm(idx.numel(), generator=generator)[:ipc]])
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
    init = cfg.init if spec.optimises else "real"
    syn_x, syn_y = initial_images(public_x, public_y, num_classes, cfg.ipc, init, cpu_gen)
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
    if uses_dkkt:
        frozen = freeze_model(model, device)
        multipliers = Multipliers(syn.shape[0], cfg.lambda_init, cfg.lambda_lr, device)
        weight = cfg.dkkt_weight if uses_dm else 1.0
    start = 1
    if resume is not None:
        _restore(resume, syn, opt_img, multipliers if uses_dkkt else None, gen, device)
        start = resume.iteration + 1

    for it in range(start, cfg.iterations + 1):
        terms: dict[str, torch.Tensor] = {}
        loss = syn.new_zeros(())
        if uses_dm:
            randomize_(embedder)
            real_x, real_groups = pool.sample(gen)
            per_class = sample_dsa(families, num_classes, gen, device)  # one draw per class, real and synthetic
            terms["dm"] = dm_loss(embedder, real_x, real_groups, syn, syn_y, num_classes, per_class)
            loss = loss + terms["dm"]
        if uses_dkkt:
            aug = sample_dsa(families, syn.shape[0], gen, device)  # one independent draw per synthetic image
            terms["dkkt"], dkkt_terms = dkkt_loss(frozen, syn, syn_y, multipliers.values, cfg, aug)
            terms.update(dkkt_terms)
            loss = loss + weight * terms["dkkt"]
            multipliers.zero_grad()
        opt_img.zero_grad(set_to_none=True)
        loss.backward()
        opt_img.step()
        if uses_dkkt:
            multipliers.step()
        if callback is not None and (it % cfg.log_every == 0 or it % cfg.checkpoint_every == 0 or it == cfg.iterations):
            terms["loss"] = loss
            if uses_dkkt:
                terms.update(multipliers.stats())
            values = torch.stack([v.detach().float() for v in terms.values()]).tolist()  # one device sync
            lambdas = multipliers.values.detach().cpu().clone() if uses_dkkt else None
            current = SyntheticSet(syn.detach().cpu().clone(), syn_y.cpu(), lambdas, cfg.method, seed, config)
            callback(it, dict(zip(terms, values)), current)
        if checkpoint is not None and it % cfg.checkpoint_every == 0:
            checkpoint(_capture(it, syn, opt_img, multipliers if uses_dkkt else None, gen, device))

    lambdas = multipliers.values.detach().cpu() if uses_dkkt else None
    return SyntheticSet(syn.detach().cpu(), syn_y.cpu(), lambdas, cfg.method, seed, config)


def _capture(
    it: int, syn: torch.Tensor, opt_img: torch.optim.Optimizer, multipliers: Multipliers | None,
    gen: torch.Generator, device: torch.device,
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
    )


def _restore(
    state: DistillState, syn: torch.Tensor, opt_img: torch.optim.Optimizer, multipliers: Multipliers | None,
    gen: torch.Generator, device: torch.device,
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
    torch.set_rng_state(state.rng["cpu"])
    gen.set_state(state.rng["loop"])
    if "cuda" in state.rng:
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
