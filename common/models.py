"""ConvNet-3, the application model shared by the edge, the DM embedder and the evaluation net.

Matches the DM reference ConvNet (width 128, depth 3, instance norm realised as
GroupNorm(C, C), ReLU, 2x2 average pooling, linear head on the flattened trunk).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from common.config import ConfigError, ModelConfig

Norm = Literal["instancenorm", "batchnorm", "none"]


class AvgPool2x2(nn.AvgPool2d):
    """nn.AvgPool2d(2, 2) (same output size, flooring odd sides), computed on the CPU as two strided sums: there the
    native kernel is slower on an NCHW activation than these adds (docs/benchmarks.md, "The CPU pooling"). The
    same values to float rounding, differentiable twice (DKKT), and still an AvgPool2d for code that looks for one."""

    def __init__(self) -> None:
        super().__init__(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 4 or not x.is_contiguous():
            return super().forward(x)
        n, c, h, w = x.shape
        rows = x[:, :, : h - h % 2].view(n, c, h // 2, 2, w)
        pairs = rows[:, :, :, 0] + rows[:, :, :, 1]
        return (pairs[..., 0 : w - 1 : 2] + pairs[..., 1:w:2]) * 0.25


def _norm_layer(norm: Norm, channels: int) -> nn.Module:
    if norm == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"model.norm must be one of instancenorm, batchnorm, none; got {norm!r}")


class ConvNet(nn.Module):
    """Conv(3x3) -> norm -> ReLU -> AvgPool(2) blocks, then a linear classifier.

    Input (N, C, S, S); each pooling floors the size as in the DM reference (28 -> 14 -> 7 -> 3), so `embed`
    returns (N, width * (S // 2**depth)**2).
    """

    def __init__(
        self,
        num_classes: int = 10,
        channels: int = 3,
        image_size: int = 32,
        width: int = 128,
        depth: int = 3,
        norm: Norm = "instancenorm",
    ) -> None:
        super().__init__()
        if image_size < 2:
            raise ConfigError(f"images of {image_size} px: a ConvNet halves its input at least once; it needs >= 2 px")
        if image_size >> depth < 1:
            raise ConfigError(f"model.depth={depth} halves the image {depth} times; {image_size} px images need "
                              f"model.depth <= {image_size.bit_length() - 1}")
        layers: list[nn.Module] = []
        in_channels = channels
        for _ in range(depth):
            layers += [
                nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
                _norm_layer(norm, width),
                nn.ReLU(inplace=True),
                AvgPool2x2(),
            ]
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.feature_dim = width * (image_size >> depth) ** 2
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened trunk features, (N, feature_dim)."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def model_from_config(cfg: ModelConfig, num_classes: int, channels: int, image_size: int) -> nn.Module:
    """A fresh net as `model.*` describes it, for images of `channels` x `image_size` x `image_size`."""
    if cfg.arch == "resnet18":
        return small_image_resnet18(num_classes, channels)
    return ConvNet(num_classes, channels, image_size, cfg.width, cfg.depth, cfg.norm)


def small_image_resnet18(num_classes: int, channels: int) -> nn.Module:
    """torchvision's ResNet-18 adapted to 32x32 inputs as is usual for CIFAR: a 3x3 stride-1 stem, no max-pool."""
    from torchvision.models import resnet18

    net = resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def parse_architecture(spec: str, base: ModelConfig) -> ModelConfig:
    """`convnet`, `convnet:width=64,depth=4,norm=batchnorm` (any of them) or `resnet18`, on top of `base`."""
    name, _, options = spec.partition(":")
    fields: dict[str, object] = {"arch": name}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        if key not in ("width", "depth", "norm") or not value:
            raise ValueError(f"--arch {spec!r}: options are width=N, depth=N, norm=instancenorm|batchnorm|none")
        fields[key] = int(value) if key in ("width", "depth") else value
    try:
        return ModelConfig.model_validate(base.model_dump() | fields)
    except ValueError as err:
        raise ValueError(f"--arch {spec!r}: {' '.join(str(err).split())[:200]}") from None


def build_model(
    num_classes: int = 10,
    channels: int = 3,
    image_size: int = 32,
    width: int = 128,
    depth: int = 3,
    norm: Norm = "instancenorm",
) -> ConvNet:
    """A freshly initialised ConvNet (PyTorch default init, as in the DM reference)."""
    return ConvNet(num_classes, channels, image_size, width, depth, norm)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


CPU_CHUNK = 20  # images per pass on the CPU (docs/benchmarks.md, "CPU fast path"): cache-sized activations


def cpu_chunk(model: nn.Module, x: torch.Tensor, size: int | None = None) -> int | None:
    """How many images of `x` one pass of `model` should take: `size` (default CPU_CHUNK) on the CPU, where a
    ConvNet-3's memory-bound layers (norm, ReLU, pooling) run faster on cache-sized activations; None (all at once)
    on an accelerator, or where a pass over a chunk would differ from a pass over the whole batch (batch norm in
    training mode)."""
    if x.device.type != "cpu":
        return None
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()):
        return None
    return size or CPU_CHUNK


def in_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """fn(x) computed over consecutive chunks of `chunk` images and concatenated (fn(x) when chunk is None)."""
    if chunk is None or x.shape[0] <= chunk:
        return fn(x)
    return torch.cat([fn(part) for part in x.split(chunk)])
