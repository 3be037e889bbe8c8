"""The DM evaluation protocol (`utils.evaluate_synset`, RESEARCH.md section 2.4), tensors on the device.

A fresh ConvNet is trained on the synthetic set only: SGD(lr, momentum, weight_decay), `epochs` passes
over the shuffled set in batches of `batch_size`, lr x 0.1 (fresh optimiser, as the reference) from
epoch epochs//2 + 1 on, DSA on every batch when enabled, cross-entropy; then accuracy on the full test set.
Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.config import EvaluationConfig, ModelConfig
from common.models import build_model
from server.distill.dsa import DEFAULT_STRATEGY, apply_dsa, parse_strategy, sample_dsa

TEST_BATCH = 1000


def _sgd(net: nn.Module, lr: float, cfg: EvaluationConfig) -> torch.optim.SGD:
    return torch.optim.SGD(net.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = TEST_BATCH) -> float:
    """Top-1 accuracy of `net` (switched to eval mode) on (x, y), batched."""
    net.eval()
    correct = torch.zeros((), dtype=torch.long, device=y.device)
    for start in range(0, x.shape[0], batch_size):
        correct += (net(x[start : start + batch_size]).argmax(1) == y[start : start + batch_size]).sum()
    return correct.item() / max(x.shape[0], 1)


def train_and_test(
    syn_x: torch.Tensor,
    syn_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    eval_cfg: EvaluationConfig,
    model_cfg: ModelConfig,
    num_classes: int,
    seed: int,
    device: torch.device | str,
    dsa_strategy: str = DEFAULT_STRATEGY,
) -> float:
    """Trains one fresh net (initialised from `seed`) on the synthetic set; returns its test accuracy."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):  # the init draw depends on `seed` only, not on the caller's RNG
        torch.manual_seed(seed)
        net = build_model(num_classes, syn_x.shape[1], syn_x.shape[2], model_cfg.width, model_cfg.depth, model_cfg.norm)
    net = net.to(device).train()
    gen = torch.Generator(device=device).manual_seed(seed)
    families = parse_strategy(dsa_strategy) if eval_cfg.dsa else ()
    x, y = syn_x.to(device), syn_y.to(device)
    n = x.shape[0]
    optimizer = _sgd(net, eval_cfg.lr, eval_cfg)
    for epoch in range(eval_cfg.epochs):
        if epoch == eval_cfg.epochs // 2 + 1:
            optimizer = _sgd(net, eval_cfg.lr * 0.1, eval_cfg)
        perm = torch.randperm(n, generator=gen, device=device)
        for start in range(0, n, eval_cfg.batch_size):
            idx = perm[start : start + eval_cfg.batch_size]
            xb = x[idx]
            if families:
                # Unseeded DiffAugment of the reference: one family per batch, parameters per image.
                xb = apply_dsa(xb, sample_dsa(families, xb.shape[0], gen, device, one_family=True))
            loss = F.cross_entropy(net(xb), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return accuracy(net, test_x.to(device), test_y.to(device))


def evaluate_synthetic(
    syn_x: torch.Tensor,
    syn_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    eval_cfg: EvaluationConfig,
    model_cfg: ModelConfig,
    seeds: Sequence[int],
    device: torch.device | str,
    num_classes: int | None = None,
    dsa_strategy: str = DEFAULT_STRATEGY,
) -> list[float]:
    """Test accuracy of one fresh net per seed trained on (syn_x, syn_y); num_classes defaults to max label + 1."""
    if num_classes is None:
        num_classes = int(max(syn_y.max(), test_y.max())) + 1
    return [
        train_and_test(syn_x, syn_y, test_x, test_y, eval_cfg, model_cfg, num_classes, s, device, dsa_strategy)
        for s in seeds
    ]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std (numpy's default, as the reference reports), (nan, nan) when empty."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
