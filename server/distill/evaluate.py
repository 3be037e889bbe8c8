"""The DM evaluation protocol (`utils.evaluate_synset`, RESEARCH.md section 2.4), tensors on the device.

A fresh ConvNet is trained on the synthetic set only: SGD(lr, momentum, weight_decay), `epochs` passes
over the shuffled set in batches of `batch_size`, lr x 0.1 (fresh optimiser, as the reference) from
epoch epochs//2 + 1 on, DSA on every batch when enabled, cross-entropy; then accuracy on the full test set.
Accuracies are fractions in [0, 1]. On the CPU a batch goes through the net in cache-sized chunks
(`common.models.cpu_chunk`): the same logits to float rounding, ~1.4x faster at width 128. With
`evaluation.compile` the passes run through `torch.compile` (inductor fuses the norm, ReLU and pooling around
the convolutions): the same protocol to float rounding, compiled once per process and batch shape. With
`evaluation.precision=bf16` they run under bfloat16 autocast (AMX on recent Xeons): another protocol, whose
accuracy difference to fp32 `simulations.benchmarks.eval_modes` measures.

`train_and_test` trains one net (the reference of the protocol); `train_and_test_batched` trains K nets at
once as one vmapped functional model over stacked parameters (`torch.func.stack_module_state`): every net
keeps its own init seed, its own generator (shuffling and DSA draws, in the same order as `train_and_test`),
and SGD on the stacked tensors is K independent SGDs (momentum and weight decay are elementwise). It runs
the same number of kernel launches as one net, which is where a GPU spends the time at these sizes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from common.config import EvaluationConfig, ModelConfig
from common.models import cpu_chunk, in_chunks, model_from_config
from common.runtime import autocast, compiled
from server.distill.dsa import DEFAULT_STRATEGY, DSAParams, apply_dsa, parse_strategy, sample_dsa

TEST_BATCH = 1000


@dataclass(frozen=True)
class NetProtocol:
    """How an evaluation net is made and trained: the evaluation settings, its architecture and number of classes,
    the device, and the DSA families (`distill.dsa_strategy`)."""

    evaluation: EvaluationConfig
    model: ModelConfig
    num_classes: int
    device: torch.device | str = "cpu"
    dsa_strategy: str = DEFAULT_STRATEGY


def _sgd(net: nn.Module, lr: float, cfg: EvaluationConfig) -> torch.optim.SGD:
    return torch.optim.SGD(net.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def net_forward(net: nn.Module, eval_cfg: EvaluationConfig, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """`net`'s forward as the protocol runs it: fp32 eager by default, compiled with `evaluation.compile`, under
    bfloat16 autocast with `evaluation.precision=bf16` (logits returned in fp32)."""
    forward = compiled(net, eval_cfg.compile, device, "evaluation.compile")
    if eval_cfg.precision == "fp32":
        return forward

    def autocast_forward(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, eval_cfg.precision):
            return forward(x).float()

    return autocast_forward


@torch.inference_mode()
def accuracy(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = TEST_BATCH,
) -> float:
    """Top-1 accuracy of `net` (switched to eval mode) on (x, y) through `forward` (default: `net` itself), batched
    (cache-sized batches on the CPU)."""
    net.eval()
    forward = net if forward is None else forward
    batch_size = cpu_chunk(net, x) or batch_size
    correct = torch.zeros((), dtype=torch.long, device=y.device)
    for start in range(0, x.shape[0], batch_size):
        correct += (forward(x[start : start + batch_size]).argmax(1) == y[start : start + batch_size]).sum()
    return correct.item() / max(x.shape[0], 1)


def init_net(seed: int, shape: Sequence[int], model_cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The evaluation net of `seed` for images of `shape` (N, C, H, W), on the CPU; the caller's RNG is untouched."""
    with torch.random.fork_rng(devices=[]):  # the init draw depends on `seed` only, not on the caller's RNG
        torch.manual_seed(seed)
        return model_from_config(model_cfg, num_classes, shape[1], shape[2])


def train_net(syn_x: torch.Tensor, syn_y: torch.Tensor, protocol: NetProtocol, seed: int) -> nn.Module:
    """One fresh net (initialised from `seed`) trained on the synthetic set with the protocol above."""
    eval_cfg, device = protocol.evaluation, torch.device(protocol.device)
    net = init_net(seed, syn_x.shape, protocol.model, protocol.num_classes).to(device).train()
    gen = torch.Generator(device=device).manual_seed(seed)
    families = parse_strategy(protocol.dsa_strategy) if eval_cfg.dsa else ()
    x, y = syn_x.to(device), syn_y.to(device)
    n = x.shape[0]
    chunk = cpu_chunk(net, x)
    forward = net_forward(net, eval_cfg, device)
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
            # contiguous: some DSA families return other strides, which a compiled forward would recompile for
            loss = F.cross_entropy(in_chunks(forward, xb.contiguous(), chunk), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return net


def train_and_test(syn_x: torch.Tensor, syn_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   protocol: NetProtocol, seed: int) -> float:
    """Trains one fresh net (initialised from `seed`) on the synthetic set; returns its test accuracy."""
    net = train_net(syn_x, syn_y, protocol, seed)
    device = torch.device(protocol.device)
    return accuracy(net, test_x.to(device), test_y.to(device), net_forward(net, protocol.evaluation, device))


def _concat_draws(draws: Sequence[DSAParams]) -> DSAParams:
    """One draw over the concatenated groups of several draws (same families)."""
    names = [k for k in DSAParams.__dataclass_fields__ if k != "families"]
    return DSAParams(draws[0].families, **{k: torch.cat([getattr(d, k) for d in draws]) for k in names})


@dataclass
class StackedNets:
    """K nets of one architecture as stacked parameters and buffers (K, ...) and a stateless `base` module."""

    base: nn.Module
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]

    def __call__(self, p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """One net's logits for x with parameters p and buffers b (the function that is vmapped)."""
        return functional_call(self.base, (p, b), (x,))


def train_nets_batched(syn_x: torch.Tensor, syn_y: torch.Tensor, protocol: NetProtocol, seeds: Sequence[int],
                       channels_last: bool = False) -> StackedNets:
    """`train_net` for every seed, all nets trained at once; net i is row i of the stacked parameters.

    Same draws as K calls of `train_net` (up to float rounding of the grouped convolutions). `evaluation.precision`
    and `evaluation.compile` act as in `net_forward` (compile: the per-step forward+loss); channels_last: images in
    channels-last layout (a benchmark variant).
    """
    eval_cfg, device = protocol.evaluation, torch.device(protocol.device)
    seeds = list(seeds)
    k = len(seeds)
    modules = [init_net(s, syn_x.shape, protocol.model, protocol.num_classes).to(device).train() for s in seeds]
    params, buffers = stack_module_state(modules)  # (K, ...) leaves; params require grad
    nets = StackedNets(copy.deepcopy(modules[0]).to("meta"), params, buffers)
    del modules

    def step_loss(p: dict, b: dict, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """xb (K, B, C, H, W), yb (K, B) -> sum over nets of each net's mean cross-entropy."""
        with autocast(device, eval_cfg.precision):
            logits = vmap(nets)(p, b, xb)
        ce = F.cross_entropy(logits.float().flatten(0, 1), yb.flatten(), reduction="none")
        return ce.view(k, -1).mean(1).sum()

    loss_fn = compiled(step_loss, eval_cfg.compile, device, "evaluation.compile")
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    families = parse_strategy(protocol.dsa_strategy) if eval_cfg.dsa else ()
    x, y = syn_x.to(device), syn_y.to(device)
    n = x.shape[0]
    plist = list(params.values())
    optimizer = torch.optim.SGD(plist, lr=eval_cfg.lr, momentum=eval_cfg.momentum, weight_decay=eval_cfg.weight_decay)
    for epoch in range(eval_cfg.epochs):
        if epoch == eval_cfg.epochs // 2 + 1:
            optimizer = torch.optim.SGD(
                plist, lr=eval_cfg.lr * 0.1, momentum=eval_cfg.momentum, weight_decay=eval_cfg.weight_decay
            )
        perm = torch.stack([torch.randperm(n, generator=g, device=device) for g in gens])  # (K, n)
        for start in range(0, n, eval_cfg.batch_size):
            idx = perm[:, start : start + eval_cfg.batch_size]  # (K, B)
            xb = x[idx]  # (K, B, C, H, W)
            if families:
                b = idx.shape[1]
                draws = _concat_draws([sample_dsa(families, b, g, device, one_family=True) for g in gens])
                xb = apply_dsa(xb.flatten(0, 1), draws).view_as(xb)
            if channels_last:
                xb = xb.flatten(0, 1).contiguous(memory_format=torch.channels_last).view_as(xb)
            loss = loss_fn(params, buffers, xb, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return nets


def train_and_test_batched(syn_x: torch.Tensor, syn_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                           protocol: NetProtocol, seeds: Sequence[int], channels_last: bool = False) -> list[float]:
    """`train_and_test` for every seed, all nets trained at once; their test accuracies in seed order."""
    device = torch.device(protocol.device)
    nets = train_nets_batched(syn_x, syn_y, protocol, seeds, channels_last)
    nets.base.eval()
    return _batched_accuracy(nets, test_x.to(device), test_y.to(device), device, protocol.evaluation.precision)


@torch.no_grad()
def _batched_accuracy(
    nets: StackedNets,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    precision: str,
    batch_size: int = TEST_BATCH,
) -> list[float]:
    """Top-1 accuracy of each of the K stacked nets on (x, y); the test batch is shared (not copied K times).

    Chunks of batch_size // K images keep the activations of the K nets at the size of one net's test batch.
    """
    k = next(iter(nets.params.values())).shape[0]
    batch_size = max(batch_size // k, 1)
    correct = torch.zeros(k, dtype=torch.long, device=y.device)
    for start in range(0, x.shape[0], batch_size):
        with autocast(device, precision):
            logits = vmap(nets, in_dims=(0, 0, None))(nets.params, nets.buffers, x[start : start + batch_size])
        correct += (logits.argmax(2) == y[start : start + batch_size]).sum(1)
    return [c / max(x.shape[0], 1) for c in correct.tolist()]


def evaluate_synthetic(
    syn_x: torch.Tensor,
    syn_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    protocol: NetProtocol,
    seeds: Sequence[int],
    max_parallel: int | None = None,
    on_done: Callable[[list[float]], None] | None = None,
) -> list[float]:
    """Test accuracy of one fresh net per seed trained on (syn_x, syn_y) with `protocol`.
    `on_done` receives the accuracies so far after each net (or each group of nets trained at once).

    Several seeds are trained at once (`train_and_test_batched`, at most `max_parallel` nets per group);
    one seed, or max_parallel=1, runs `train_and_test`. Default: all seeds at once on CUDA (launch-bound),
    one at a time on the CPU, where the batched (grouped) convolutions measured slower (docs/benchmarks.md).
    """
    seeds = list(seeds)
    if max_parallel is None:
        max_parallel = len(seeds) if torch.device(protocol.device).type == "cuda" else 1
    if protocol.model.arch != "convnet" or protocol.model.norm == "batchnorm":
        max_parallel = 1  # the vmapped path has no batch-norm running statistics
    step = max(1, max_parallel)
    accuracies: list[float] = []
    for i in range(0, len(seeds), step):
        group = seeds[i : i + step]
        if len(group) == 1:
            accuracies.append(train_and_test(syn_x, syn_y, test_x, test_y, protocol, group[0]))
        else:
            accuracies += train_and_test_batched(syn_x, syn_y, test_x, test_y, protocol, group)
        if on_done is not None:
            on_done(list(accuracies))
    return accuracies


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std (numpy's default, as the reference reports), (nan, nan) when empty."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
