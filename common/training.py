"""Local training and evaluation on one edge client's private shard: plain PyTorch, no Flower.

Tensors stay on one device for the whole call: the shard is moved there once, the flip + crop
augmentation and the shuffling run there, and only scalars come back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

OPTIMIZERS = ("sgd", "adam")
CROP_PADDING = 4  # torchvision's RandomCrop(32, padding=4), the usual CIFAR augmentation


@dataclass(frozen=True)
class TrainSettings:
    """What one round of local training needs; `check` names the key of any value it cannot honour."""

    epochs: int = 1
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True

    def check(self) -> TrainSettings:
        problems = []
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 1:
            problems.append(f"local-epochs={self.epochs!r}: must be an integer >= 1")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            problems.append(f"batch-size={self.batch_size!r}: must be an integer >= 1")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer={self.optimizer!r}: must be one of {', '.join(OPTIMIZERS)}")
        if not _finite_number(self.lr) or self.lr <= 0:
            problems.append(f"lr={self.lr!r}: must be a finite number > 0")
        if not _finite_number(self.momentum) or not 0 <= self.momentum < 1:
            problems.append(f"momentum={self.momentum!r}: must be in [0, 1)")
        if not _finite_number(self.weight_decay) or self.weight_decay < 0:
            problems.append(f"weight-decay={self.weight_decay!r}: must be a finite number >= 0")
        if problems:
            raise ValueError("local training cannot honour this config: " + "; ".join(problems))
        return self


# The keys of a round's train config (Flower ConfigRecord or any mapping) and the TrainSettings field each fills.
SETTINGS_KEYS = {
    "local-epochs": "epochs",
    "batch-size": "batch_size",
    "optimizer": "optimizer",
    "lr": "lr",
    "momentum": "momentum",
    "weight-decay": "weight_decay",
}


def settings_to_config(settings: TrainSettings) -> dict[str, int | float | str]:
    """The keys a round's train config carries for `settings` (what `settings_from_config` reads back)."""
    return {key: getattr(settings, field) for key, field in SETTINGS_KEYS.items()}


def settings_from_config(config: Mapping[str, Any]) -> TrainSettings:
    """TrainSettings from a round's config mapping; every key is required, a bad value raises ValueError naming it."""
    missing = [key for key in SETTINGS_KEYS if key not in config]
    if missing:
        raise ValueError(f"local training: the round's config lacks {', '.join(missing)}")
    return TrainSettings(**{field: config[key] for key, field in SETTINGS_KEYS.items()}).check()


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over the last local epoch
    accuracy: float  # training accuracy (on augmented batches) over the last local epoch
    seconds: float
    num_examples: int
    first_epoch_loss: float  # mean loss over the first local epoch


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def augment_flip_crop(x: torch.Tensor, generator: torch.Generator | None = None, padding: int = CROP_PADDING) -> torch.Tensor:
    """Random horizontal flip and random crop after zero padding, per image, vectorised on x's device.

    x: (N, C, H, W) -> (N, C, H, W). `generator` must live on x's device (or be None).
    """
    n, c, h, w = x.shape
    dev = x.device
    flip = torch.rand(n, device=dev, generator=generator) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    if padding <= 0:
        return x
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), device=dev, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=dev, generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h, device=dev)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w, device=dev)).view(n, 1, 1, w)
    batch = torch.arange(n, device=dev).view(n, 1, 1, 1)
    channel = torch.arange(c, device=dev).view(1, c, 1, 1)
    return padded[batch, channel, rows, cols]


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
    if settings.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    raise ValueError(f"optimizer={settings.optimizer!r}: must be one of {', '.join(OPTIMIZERS)}")


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: TrainSettings,
    seed: int = 0,
) -> TrainResult:
    """Trains `model` in place for `settings.epochs` epochs on (x, y); x (N, C, H, W) normalised, y (N,) int64.

    Model, x and y must be on the same device. Shuffling and augmentation are seeded by `seed`.
    """
    settings.check()
    if len(x) == 0:
        raise ValueError("local training: the shard's training slice is empty")
    device = x.device
    generator = torch.Generator(device=device).manual_seed(seed)
    optimizer = make_optimizer(model, settings)
    model.train()
    start = time.perf_counter()
    epoch_losses: list[float] = []
    accuracy = 0.0
    for _ in range(settings.epochs):
        order = torch.randperm(len(x), device=device, generator=generator)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for begin in range(0, len(x), settings.batch_size):
            idx = order[begin : begin + settings.batch_size]
            xb, yb = x[idx], y[idx]
            if settings.augment:
                xb = augment_flip_crop(xb, generator)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(idx)
            correct += (logits.detach().argmax(1) == yb).sum()
        epoch_losses.append(loss_sum.item() / len(x))
        accuracy = correct.item() / len(x)
    if not math.isfinite(epoch_losses[-1]):
        raise FloatingPointError(f"local training diverged (loss {epoch_losses[-1]}); lower lr={settings.lr}")
    return TrainResult(
        loss=epoch_losses[-1],
        accuracy=accuracy,
        seconds=time.perf_counter() - start,
        num_examples=len(x),
        first_epoch_loss=epoch_losses[0],
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of `model` on (x, y), all on one device; (nan, nan) when empty."""
    if len(x) == 0:
        return math.nan, math.nan
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for begin in range(0, len(x), batch_size):
        xb, yb = x[begin : begin + batch_size], y[begin : begin + batch_size]
        logits = model(xb)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    return loss_sum.item() / len(x), correct.item() / len(x)
