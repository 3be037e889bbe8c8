"""Benchmark: distillation speed (issue 6): reference-style loops against our batched code, one process, one device.

On CIFAR-shaped random tensors (10 classes, 3x32x32, ConvNet-3 width 128), same device and inputs for both sides:
  dm        one DM iteration at --ipc: a reference-style step (a fresh net built every iteration, a Python loop
            over classes with one forward each, a host-side family draw per class, CPU-side index sampling,
            fp32) against our step (the `methods.distill` path: in-place re-init, `PublicPool`, one batched
            `dm_loss`), for a pipc-50 pool (real batch 50 per class) and a batch_real-256 pool; iterations/s.
  dkkt      the stationarity term at --ipc (value + backward to images and lambda): the per-sample gradient
            loop `naive_stationarity_loss` against the batched `stationarity_loss`; iterations/s.
  eval      the evaluation protocol (--epochs, 1000 by default): `train_and_test` one net after another
            against `train_and_test_batched` with --nets nets at once; nets/s.
  distill   a full DM+DKKT iteration through `methods.distill` at --ipc (rate) and at ipc 50 (peak memory); with
            --variants compile / bf16 / compile+bf16 also at --ipc in that distillation mode (distill.compile,
            distill.precision) against the fp32 iteration.
  estimate  20,000 DM+DKKT iterations at --ipc plus a 5-net evaluation, from the measured rates
            (--full runs it for real).
On CUDA, bf16 autocast, channels_last and torch.compile variants of our DM step and of the batched evaluation
are timed too (--variants), each with its loss / accuracy difference to fp32; peak memory per row. The compile
and bf16 variants also time `train_and_test` with `evaluation.compile` and `evaluation.precision=bf16` (the one-off
compile reported, not timed); on the CPU: --variants compile,bf16. The DM step's variants combine with `+`
(e.g. channels_last+compile: model and images in channels-last memory, embed compiled). With variants, the DM step
at pipc 50 and the ipc-10 iteration also get an fp32 ceiling row: their FLOPs (torch.utils.flop_counter) at the
measured fp32 matmul rate.

  python -m simulations.bench_distill                         # everything, default sizes, auto device
  python -m simulations.bench_distill --device cuda --json bench_distill.json
  python -m simulations.bench_distill --epochs 100 --nets 5   # a shorter evaluation protocol
  python -m simulations.bench_distill --small                 # tiny sizes: a CPU smoke run in seconds
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import common.models as models
from common.atomic import save_json
from common.config import DistillConfig, EvaluationConfig, ModelConfig
from common.models import build_model
from common.runtime import autocast, compiled, describe_machine, git_commit, pick_device, utc_stamp
from server.distill.dkkt import freeze_model, naive_stationarity_loss, stationarity_loss
from server.distill.dm import PublicPool, dm_loss, randomize_
from server.distill.dsa import DEFAULT_STRATEGY, DSAParams, apply_dsa, parse_strategy, sample_dsa
from server.distill.evaluate import NetProtocol, train_and_test, train_and_test_batched
from server.distill.methods import distill
from server.distill.terms import dkkt_candidates

console = Console(width=max(Console().width, 150))
FULL_ITERATIONS = 20_000
FULL_NETS = 5


DISTILL_MODES = ("fp32", "bf16", "compile", "compile+bf16")  # distillation modes by name, "+" combining two


def distill_mode(mode: str) -> dict[str, Any]:
    """The `distill.compile` and `distill.precision` of a mode name of DISTILL_MODES."""
    return {"compile": "compile" in mode, "precision": "bf16" if "bf16" in mode else "fp32"}


@dataclass
class Sizes:
    classes: int = 10
    channels: int = 3
    size: int = 32
    width: int = 128
    ipc: int = 10
    pipc: int = 50
    batch_real: int = 256
    big_ipc: int = 50
    test_images: int = 10_000
    # The CPU evidence protocol's estimator savings (configs/grids/cpu.yaml), timed as their own rows:
    # real images per class per DM step, and DKKT candidates per iteration.
    cpu_batch_real: int = 16
    cpu_candidates: int = 20


@dataclass
class Row:
    section: str
    variant: str
    rate: float | None  # per second; None when it failed
    unit: str
    ratio: float | None = None  # rate / the section's baseline rate
    peak_mb: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def shown(row: Row) -> Row:
    """`row`, printed as soon as it is measured (a long run that is stopped keeps what it printed)."""
    rate = "failed" if row.rate is None else f"{row.rate:.3g} {row.unit}"
    console.print(f"row  {row.section} | {row.variant} | {rate} | " + ("" if row.ratio is None else f"{row.ratio:.2f}x | ")
                  + row.note)
    return row


@contextlib.contextmanager
def whole_batches() -> Iterator[None]:
    """The plain path, every pass over the whole batch (the CPU fast path off): the "before" rows."""
    saved = models.CPU_CHUNK
    models.CPU_CHUNK = 10**9
    try:
        yield
    finally:
        models.CPU_CHUNK = saved


@contextlib.contextmanager
def native_pooling() -> Iterator[None]:
    """ConvNet's pooling as nn.AvgPool2d computes it (the DM reference's, and ours before models.AvgPool2x2): the
    reference loop and the fp32 iteration the speed goals are measured against."""
    fast = models.AvgPool2x2.forward
    models.AvgPool2x2.forward = torch.nn.AvgPool2d.forward
    try:
        yield
    finally:
        models.AvgPool2x2.forward = fast


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def rate_of(step: Callable[[], Any], iterations: int, warmup: int, device: torch.device) -> float:
    """Calls per second of `step` after `warmup` untimed calls (device synchronised around the timed ones)."""
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    sync(device)
    return iterations / (time.perf_counter() - start)


def class_data(sizes: Sizes, per_class: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = sizes.classes * per_class
    x = torch.randn(n, sizes.channels, sizes.size, sizes.size, generator=g)
    return x.to(device), torch.arange(sizes.classes).repeat_interleave(per_class).to(device)


def model_of(sizes: Sizes) -> ModelConfig:
    return ModelConfig(width=sizes.width)


# ----------------------------------------------------------------------------------------------- DM step


def reference_dm_step(
    public_x: torch.Tensor,
    class_indices: list[torch.Tensor],
    syn: torch.Tensor,
    opt: torch.optim.Optimizer,
    sizes: Sizes,
    gen: torch.Generator,
    cpu_gen: torch.Generator,
) -> None:
    """The DM reference's iteration (main_DM.py, ConvNet branch) in our vocabulary: a new net, a loop over classes."""
    device = syn.device
    families = parse_strategy(DEFAULT_STRATEGY)
    net = build_model(sizes.classes, sizes.channels, sizes.size, sizes.width).to(device).train().requires_grad_(False)
    loss = syn.new_zeros(())
    for c in range(sizes.classes):
        idx = class_indices[c][torch.randperm(class_indices[c].numel(), generator=cpu_gen)[: sizes.batch_real]]
        real = public_x[idx]  # CPU index -> host-to-device copy, as the reference's numpy permutation
        draw = sample_dsa(families, 1, gen, device)
        host_family = torch.randint(0, len(families), (1,), generator=cpu_gen)  # the reference's .item() family draw
        draw = DSAParams(**{**vars(draw), "family": host_family})
        zeros = torch.zeros(1, dtype=torch.long)
        out_real = net.embed(apply_dsa(real, draw, zeros.expand(real.shape[0]))).detach()
        syn_c = syn[c * sizes.ipc : (c + 1) * sizes.ipc]
        out_syn = net.embed(apply_dsa(syn_c, draw, zeros.expand(syn_c.shape[0])))
        loss = loss + ((out_real.mean(0) - out_syn.mean(0)) ** 2).sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def our_dm_step(
    module: torch.nn.Module,
    pool: PublicPool,
    syn: torch.Tensor,
    syn_y: torch.Tensor,
    opt: torch.optim.Optimizer,
    sizes: Sizes,
    gen: torch.Generator,
    precision: str = "fp32",
) -> torch.Tensor:
    """The DM part of one `methods.distill` iteration (same calls, same order, `distill.precision` as there)."""
    families = parse_strategy(DEFAULT_STRATEGY)
    randomize_(module)
    real_x, real_groups = pool.sample(gen)
    per_class = sample_dsa(families, sizes.classes, gen, syn.device)
    with autocast(syn.device, precision):
        loss = dm_loss(module, real_x, real_groups, syn, syn_y, sizes.classes, per_class)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def bench_dm(sizes: Sizes, args: argparse.Namespace, device: torch.device, variants: Sequence[str]) -> list[Row]:
    rows = []
    pools = {f"pipc {sizes.pipc}": sizes.pipc, f"batch_real {sizes.batch_real}": 2 * sizes.batch_real}
    pools = {label: n for label, n in pools.items() if label.split()[0] in args.dm_pools.split(",")}
    for label, per_class in pools.items():
        public_x, public_y = class_data(sizes, per_class, device)
        syn0 = public_x[torch.arange(sizes.classes, device=device) * per_class].repeat_interleave(sizes.ipc, 0)
        syn_y = torch.arange(sizes.classes, device=device).repeat_interleave(sizes.ipc)
        section = f"DM step ipc {sizes.ipc}, {label}"

        syn = syn0.clone().requires_grad_(True)
        opt = torch.optim.SGD([syn], lr=1.0, momentum=0.5)
        y_cpu = public_y.cpu()
        class_indices = [torch.nonzero(y_cpu == c).flatten() for c in range(sizes.classes)]
        gen, cpu_gen = torch.Generator(device=device).manual_seed(0), torch.Generator().manual_seed(0)
        reset_peak(device)
        with native_pooling():
            ref = rate_of(partial(reference_dm_step, public_x, class_indices, syn, opt, sizes, gen, cpu_gen),
                          args.iters, args.warmup, device)
        rows.append(shown(Row(section, "reference loop (fp32)", ref, "it/s", 1.0, peak_mb(device))))

        baseline_loss = None
        for variant in ("whole batch", "ours", "cpu estimator", *variants):
            try:
                channels_last = "channels_last" in variant.split("+")
                syn = syn0.clone().requires_grad_(True)
                if channels_last:
                    syn = syn0.clone().contiguous(memory_format=torch.channels_last).requires_grad_(True)
                opt = torch.optim.SGD([syn], lr=1.0, momentum=0.5)
                px = public_x.contiguous(memory_format=torch.channels_last) if channels_last else public_x
                batch_real = sizes.cpu_batch_real if variant == "cpu estimator" else sizes.batch_real
                pool = PublicPool(px, public_y, sizes.classes, batch_real)
                module = build_model(sizes.classes, sizes.channels, sizes.size, sizes.width)
                module = module.to(device).train().requires_grad_(False)
                if channels_last:
                    module = module.to(memory_format=torch.channels_last)
                if "compile" in variant.split("+"):  # the module itself (cpu_chunk reads its layers), embed compiled
                    module.embed = compiled(module.embed, True, device, "distill.compile")
                precision = "bf16" if "bf16" in variant.split("+") else "fp32"
                # The loss of one fixed draw, for the difference to fp32.
                torch.manual_seed(1)
                with whole_batches() if variant == "whole batch" else contextlib.nullcontext():
                    first = our_dm_step(module, pool, syn, syn_y, opt, sizes,
                                        torch.Generator(device=device).manual_seed(7), precision)
                loss_value = float(first.detach())
                baseline_loss = loss_value if variant == "whole batch" else baseline_loss
                gen = torch.Generator(device=device).manual_seed(0)
                reset_peak(device)
                with whole_batches() if variant == "whole batch" else contextlib.nullcontext():
                    r = rate_of(partial(our_dm_step, module, pool, syn, syn_y, opt, sizes, gen, precision), args.iters,
                                args.warmup, device)
                relative = abs(loss_value - baseline_loss) / max(abs(baseline_loss), 1e-12)
                note = "" if variant == "whole batch" else f"loss rel. diff {relative:.1e}"
                if variant == "cpu estimator":
                    note = "another estimator: its accuracy cost is docs/results/cpu-pipc50's dm vs dm@full"
                name = {"ours": "ours (dm_loss, fp32)", "whole batch": "ours, whole batch (no CPU chunks)",
                        "cpu estimator": f"ours, batch_real {sizes.cpu_batch_real} (CPU protocol)"}.get(
                    variant, f"ours + {variant}")
                rows.append(shown(Row(section, name, r, "it/s", r / ref, peak_mb(device), note)))
            except Exception as err:  # noqa: BLE001 - an optional variant may not run on this stack; report it
                rows.append(Row(section, f"ours + {variant}", None, "it/s", note=f"failed: {type(err).__name__}: {err}"[:120]))
        if per_class == sizes.pipc and variants:  # the exact step's arithmetic ceiling
            module = build_model(sizes.classes, sizes.channels, sizes.size, sizes.width).to(device).requires_grad_(False)
            syn = syn0.clone().requires_grad_(True)
            opt = torch.optim.SGD([syn], lr=1.0, momentum=0.5)
            pool = PublicPool(public_x, public_y, sizes.classes, sizes.batch_real)
            gen = torch.Generator(device=device).manual_seed(7)
            rows.append(shown(ceiling_row(section, "the exact step",
                                          partial(our_dm_step, module, pool, syn, syn_y, opt, sizes, gen), ref, device)))
    return rows


def ceiling_row(section: str, what: str, step: Callable[[], Any], baseline: float, device: torch.device) -> Row:
    """The rate `step` would reach if all its FLOPs (counted by torch.utils.flop_counter, fp32) ran at the measured
    fp32 matmul rate: the most any exact fp32 path can do; its ratio is to `baseline`."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    flops, peak = counter.get_total_flops(), matmul_gflops(device)
    peak_bf16 = matmul_gflops(device, torch.bfloat16, n=BF16_MATMUL_N)
    ceiling = peak * 1e9 / flops
    return Row(section, f"fp32 ceiling: {what}'s FLOPs at the measured fp32 matmul rate", ceiling, "it/s",
               ceiling / baseline, None, f"{flops / 1e9:.1f} GFLOP per step at {peak:.0f} GFLOP/s (bf16 matmul, n=512: "
               f"{peak_bf16:.1f} GFLOP/s)", {"gflop_per_step": flops / 1e9, "matmul_gflops_fp32": peak,
                                               "matmul_gflops_bf16_n512": peak_bf16})


# ----------------------------------------------------------------------------------------------- DKKT term


def stationarity_step(fn: Callable[..., torch.Tensor], model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                      lambdas: torch.Tensor) -> torch.Tensor:
    """One backward pass of a stationarity loss `fn` into x and lambdas (their gradients reset first); the loss."""
    loss = fn(model, x, y, lambdas)
    x.grad = lambdas.grad = None
    loss.backward()
    return loss.detach()


def candidate_stationarity_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lambdas: torch.Tensor, m: int,
                                gen: torch.Generator) -> torch.Tensor:
    """The stationarity loss on `m` random candidates (the CPU protocol's estimator)."""
    return stationarity_loss(model, *dkkt_candidates(x, y, lambdas, m, gen))


def bench_dkkt(sizes: Sizes, args: argparse.Namespace, device: torch.device) -> list[Row]:
    """The stationarity term (value + backward to images and lambda) at ipc and big_ipc: the per-sample loop (ipc
    only: it is slow), the batched term over the whole batch, and the batched term in CPU chunks (the default)."""
    model = freeze_model(build_model(sizes.classes, sizes.channels, sizes.size, sizes.width), device)
    rows = []
    for ipc in dict.fromkeys((sizes.ipc, sizes.big_ipc)):
        x0, y = class_data(sizes, ipc, device, seed=1)
        x = x0.clone().requires_grad_(True)
        lambdas = torch.full((x.shape[0],), 0.5, device=device, requires_grad=True)
        section = f"DKKT stationarity, ipc {ipc} ({x.shape[0]} images)"
        step = partial(stationarity_step, model=model, x=x, y=y, lambdas=lambdas)

        with whole_batches():
            plain_loss = step(stationarity_loss)
            reset_peak(device)
            whole = rate_of(partial(step, stationarity_loss), args.iters, args.warmup, device)
        rows.append(Row(section, "batched, whole batch (no CPU chunks)", whole, "it/s", 1.0, peak_mb(device)))
        if ipc == sizes.ipc:
            reset_peak(device)
            naive = rate_of(partial(step, naive_stationarity_loss), args.naive_iters, min(args.warmup, 1), device)
            rows.append(Row(section, "per-sample loop (naive)", naive, "it/s", naive / whole, peak_mb(device)))
        diff = float((step(stationarity_loss) - plain_loss).abs() / plain_loss.abs().clamp(min=1e-12))
        reset_peak(device)
        batched = rate_of(partial(step, stationarity_loss), args.iters, args.warmup, device)
        rows.append(Row(section, "batched (default path)", batched, "it/s", batched / whole, peak_mb(device),
                        f"loss rel. diff {diff:.1e}"))
        m = sizes.cpu_candidates
        if m < x.shape[0]:
            subset = partial(candidate_stationarity_loss, m=m, gen=torch.Generator(device=device).manual_seed(0))

            reset_peak(device)
            sampled = rate_of(partial(step, subset), args.iters, args.warmup, device)
            rows.append(Row(section, f"batched, {m} random candidates (CPU protocol)", sampled, "it/s", sampled / whole,
                            peak_mb(device), "another estimator: its accuracy cost is docs/results/cpu-pipc50's "
                            "dm+dkkt vs dm+dkkt@full"))
    return rows


# ----------------------------------------------------------------------------------------------- evaluation


# The bf16 rate is measured at n = 512: a CPU without bf16 units (AVX2 only) runs a 2048 matmul in bf16 at under
# 1 GFLOP/s, minutes for the 13 calls of one measurement.
BF16_MATMUL_N = 512


def matmul_gflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    """Measured dense matmul throughput (GFLOP/s) at `dtype`: the arithmetic ceiling of this device and thread count."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 * rate_of(lambda: a @ b, 10, 3, device) / 1e9


def eval_net_flops(syn_x: torch.Tensor, syn_y: torch.Tensor, test_images: int, cfg: EvaluationConfig,
                   model_cfg: ModelConfig, classes: int) -> float:
    """FLOPs of one evaluation net (every training step's forward + backward, then the test pass), counted by
    torch.utils.flop_counter on one step and one test image."""
    from torch.utils.flop_counter import FlopCounterMode

    net = models.model_from_config(model_cfg, classes, syn_x.shape[1], syn_x.shape[2]).to(syn_x.device)
    batch = min(cfg.batch_size, syn_x.shape[0])
    with FlopCounterMode(display=False) as train:
        torch.nn.functional.cross_entropy(net(syn_x[:batch]), syn_y[:batch]).backward()
    with FlopCounterMode(display=False) as test, torch.no_grad():
        net(syn_x[:1])
    per_image = train.get_total_flops() / batch  # every epoch passes each synthetic image once
    return cfg.epochs * syn_x.shape[0] * per_image + test_images * test.get_total_flops()


def bench_eval(sizes: Sizes, args: argparse.Namespace, device: torch.device, variants: Sequence[str]) -> list[Row]:
    syn_x, syn_y = class_data(sizes, sizes.ipc, device, seed=2)
    per_class_test = max(sizes.test_images // sizes.classes, 1)
    test_x, test_y = class_data(sizes, per_class_test, device, seed=3)
    cfg = EvaluationConfig(epochs=args.epochs, num_nets=args.nets)
    model_cfg = model_of(sizes)
    section = f"evaluation ipc {sizes.ipc}, {args.epochs} epochs"
    seeds = list(range(args.nets))
    rows = []

    # Warm-up: one short run of each path (cuDNN autotuning, allocator), not timed.
    short = EvaluationConfig(epochs=2)
    def protocol(eval_cfg: EvaluationConfig) -> NetProtocol:
        return NetProtocol(eval_cfg, model_cfg, sizes.classes, device)

    train_and_test(syn_x, syn_y, test_x, test_y, protocol(short), 0)
    train_and_test_batched(syn_x, syn_y, test_x, test_y, protocol(short), seeds)

    def sequential(eval_cfg: EvaluationConfig) -> tuple[list[float], float]:
        reset_peak(device)
        sync(device)
        start = time.perf_counter()
        accs = [train_and_test(syn_x, syn_y, test_x, test_y, protocol(eval_cfg), s) for s in seeds[: args.seq_nets]]
        sync(device)
        return accs, len(accs) / (time.perf_counter() - start)

    with whole_batches():
        whole_acc, whole = sequential(cfg)
    rows.append(Row(section, f"sequential, whole batches ({len(whole_acc)} net(s))", whole, "nets/s", 1.0, peak_mb(device),
                    extra={"accuracies": whole_acc}))
    flops, peak = eval_net_flops(syn_x, syn_y, test_x.shape[0], cfg, model_cfg, sizes.classes), matmul_gflops(device)
    peak_bf16 = matmul_gflops(device, torch.bfloat16, n=BF16_MATMUL_N)
    floor = peak * 1e9 / flops
    rows.append(Row(section, "fp32 ceiling: one net's FLOPs at the measured fp32 matmul rate", floor, "nets/s",
                    floor / whole, None, f"{flops / 1e12:.2f} TFLOP per net at {peak:.0f} GFLOP/s (bf16 matmul: "
                    f"{peak_bf16:.0f} GFLOP/s)", {"tflop_per_net": flops / 1e12, "matmul_gflops_fp32": peak,
                                                  "matmul_gflops_bf16_n512": peak_bf16}))
    seq_acc, seq = sequential(cfg)
    diff = max(abs(a - b) for a, b in zip(seq_acc, whole_acc, strict=True))
    rows.append(Row(section, f"sequential train_and_test ({len(seq_acc)} net(s))", seq, "nets/s", seq / whole,
                    peak_mb(device), f"acc diff to whole batches (same seeds) {diff:.4f}", {"accuracies": seq_acc}))
    modes = [("evaluation.compile", {"compile": True})] if "compile" in variants else []
    if "bf16" in variants:
        modes.append(("evaluation.compile + precision bf16" if modes else "evaluation.precision bf16",
                      {"compile": bool(modes), "precision": "bf16"}))
    for name, update in modes:
        start = time.perf_counter()  # the one-off compile (train and test graphs) and warm-up, outside the timing
        train_and_test(syn_x, syn_y, test_x, test_y, protocol(short.model_copy(update=update)), 0)
        warmup_s = time.perf_counter() - start
        mode_acc, rate = sequential(cfg.model_copy(update=update))
        diff = max(abs(a - b) for a, b in zip(mode_acc, whole_acc, strict=True))
        rows.append(Row(section, f"sequential train_and_test + {name} ({len(mode_acc)} net(s))", rate, "nets/s",
                        rate / whole, peak_mb(device), f"acc diff to whole batches (same seeds) {diff:.4f}; "
                        f"compile/warm-up {warmup_s:.0f} s once per process", {"accuracies": mode_acc, "warmup_s": warmup_s}))

    base_acc = None
    for variant in ("fp32", *variants):
        mode = {"compile": variant == "compile", "precision": "bf16" if variant == "bf16" else "fp32"}
        channels_last = variant == "channels_last"
        try:
            if variant == "compile":  # compile once outside the timing
                train_and_test_batched(syn_x, syn_y, test_x, test_y, protocol(short.model_copy(update=mode)), seeds,
                                       channels_last=channels_last)
            reset_peak(device)
            sync(device)
            start = time.perf_counter()
            acc = train_and_test_batched(syn_x, syn_y, test_x, test_y, protocol(cfg.model_copy(update=mode)), seeds,
                                         channels_last=channels_last)
            sync(device)
            r = len(seeds) / (time.perf_counter() - start)
            if variant == "fp32":
                base_acc = acc
                common = min(len(seq_acc), len(acc))
                diff = max((abs(a - b) for a, b in zip(seq_acc[:common], acc[:common], strict=True)), default=0.0)
                note = f"acc diff to sequential (same seeds) {diff:.4f}"
            else:
                note = f"mean acc diff to fp32 {sum(acc) / len(acc) - sum(base_acc) / len(base_acc):+.4f}"
            name = f"batched, {len(seeds)} nets at once" + ("" if variant == "fp32" else f" + {variant}")
            rows.append(Row(section, name, r, "nets/s", r / whole, peak_mb(device), note, {"accuracies": acc}))
        except Exception as err:  # noqa: BLE001
            rows.append(Row(section, f"batched + {variant}", None, "nets/s", note=f"failed: {type(err).__name__}: {err}"[:120]))
    return rows


# ----------------------------------------------------------------------------------------------- full DM+DKKT


def distill_rate(
    sizes: Sizes, ipc: int, iterations: int, warmup: int, device: torch.device, mode: dict[str, Any] | None = None,
) -> tuple[float, float | None, float]:
    """(DM+DKKT iterations/s through `methods.distill`, peak MB, seconds of the whole call) at `ipc`, pipc pool;
    `mode`: distill.compile / distill.precision (the compile happens in the untimed warm-up)."""
    public_x, public_y = class_data(sizes, max(sizes.pipc, ipc), device, seed=4)
    model = build_model(sizes.classes, sizes.channels, sizes.size, sizes.width)
    cfg = DistillConfig(method="dm+dkkt", ipc=ipc, iterations=warmup + iterations, batch_real=sizes.batch_real,
                        log_every=max(warmup, 1), checkpoint_every=10**9, **(mode or {}))
    marks: dict[int, float] = {}

    def on_iteration(it: int, metrics: dict[str, float], current: Any) -> None:
        marks[it] = time.perf_counter()  # the callback has read the metrics back: the device is synchronised

    reset_peak(device)
    start = time.perf_counter()
    distill(model, public_x, public_y, cfg, model_of(sizes), sizes.classes, 0, device, on_iteration)
    total = time.perf_counter() - start
    first = max(warmup, 1)
    rate = (cfg.iterations - first) / (marks[cfg.iterations] - marks[first]) if cfg.iterations > first else 1 / total
    return rate, peak_mb(device), total


def iteration_flops(sizes: Sizes, device: torch.device) -> Callable[[], Any]:
    """One exact fp32 `dm+dkkt` iteration at ipc, pipc pool, through `methods.distill` (no multiplier fit)."""
    public_x, public_y = class_data(sizes, max(sizes.pipc, sizes.ipc), device, seed=4)
    model = build_model(sizes.classes, sizes.channels, sizes.size, sizes.width)
    cfg = DistillConfig(method="dm+dkkt", ipc=sizes.ipc, iterations=1, batch_real=sizes.batch_real, lambda_fit_steps=0,
                        checkpoint_every=10**9)
    return lambda: distill(model, public_x, public_y, cfg, model_of(sizes), sizes.classes, 0, device)


def bench_full_iteration(sizes: Sizes, args: argparse.Namespace, device: torch.device, variants: Sequence[str]
                         ) -> list[Row]:
    """A whole exact `dm+dkkt` iteration at ipc (fp32; the baseline with the pooling of before), in each mode of
    `variants` (compile, bf16, compile+bf16), its fp32 ceiling; then the fp32 iteration at big_ipc."""
    section = f"DM+DKKT iteration (methods.distill), pipc {sizes.pipc}"
    with native_pooling():
        base, peak, _ = distill_rate(sizes, sizes.ipc, args.iters, args.warmup, device)
    rows = [shown(Row(section, f"ipc {sizes.ipc}, nn.AvgPool2d (the fp32 iteration before AvgPool2x2)", base, "it/s",
                      1.0, peak))]
    r, peak, _ = distill_rate(sizes, sizes.ipc, args.iters, args.warmup, device)
    rows.append(shown(Row(section, f"ipc {sizes.ipc}", r, "it/s", r / base, peak)))
    for variant in (v for v in variants if v in ("compile", "bf16", "compile+bf16")):
        mode = distill_mode(variant)
        try:
            r, peak, _ = distill_rate(sizes, sizes.ipc, args.iters, args.warmup, device, mode)
            rows.append(shown(Row(section, f"ipc {sizes.ipc} + distill.{variant}", r, "it/s", r / base, peak)))
        except Exception as err:  # noqa: BLE001 - an optional mode may not run on this stack; report it
            rows.append(Row(section, f"ipc {sizes.ipc} + distill.{variant}", None, "it/s",
                            note=f"failed: {type(err).__name__}: {err}"[:120]))
    if variants:
        rows.append(shown(ceiling_row(section, f"the exact ipc-{sizes.ipc} iteration", iteration_flops(sizes, device),
                                      base, device)))
    r, peak, _ = distill_rate(sizes, sizes.big_ipc, max(args.iters // 5, 1), min(args.warmup, 2), device)
    rows.append(Row(section, f"ipc {sizes.big_ipc}", r, "it/s", None, peak))
    return rows


# ----------------------------------------------------------------------------------------------- report


def ratio_summary(rows: list[Row]) -> dict[str, float | None]:
    def first(pred: Callable[[Row], bool]) -> Row | None:
        return next((r for r in rows if pred(r)), None)

    out: dict[str, float | None] = {}
    for r in rows:
        if r.section.startswith("DM step") and r.variant.startswith("ours (dm_loss"):
            out[f"{r.section}: ours / reference"] = r.ratio
            whole = first(lambda w, s=r.section: w.section == s and w.variant.startswith("ours, whole batch"))
            if whole and whole.rate and r.rate:
                out[f"{r.section}: ours / ours on whole batches (the CPU fast path)"] = r.rate / whole.rate
        if r.section.startswith("DM step") and "(CPU protocol)" in r.variant:
            out[f"{r.section}: {r.variant} / reference"] = r.ratio
        if r.section.startswith("DM step") and r.variant.startswith(("ours + ", "fp32 ceiling")) and r.ratio:
            out[f"{r.section}: {r.variant} / reference"] = r.ratio
        if r.section.startswith("DM+DKKT") and r.ratio and r.ratio != 1.0:
            out[f"{r.section}: {r.variant} / today's fp32 iteration"] = r.ratio
        if r.section.startswith("DKKT") and r.variant == "batched (default path)":
            out[f"{r.section}: default / whole batch"] = r.ratio
        if r.section.startswith("DKKT") and "(CPU protocol)" in r.variant:
            out[f"{r.section}: {r.variant} / whole batch"] = r.ratio
    ev = first(lambda r: r.section.startswith("evaluation") and r.variant.startswith("sequential train_and_test"))
    out["evaluation: one net, default / whole batches"] = ev.ratio if ev else None
    ev = first(lambda r: r.section.startswith("evaluation") and r.variant.startswith("batched") and "+" not in r.variant)
    out["evaluation: K nets batched / one net on whole batches, nets/s"] = ev.ratio if ev else None
    return out


def estimate(rows: list[Row], sizes: Sizes, epochs: int) -> dict[str, float] | None:
    it = next((r for r in rows if r.section.startswith("DM+DKKT") and r.variant == f"ipc {sizes.ipc}"), None)
    ev = next((r for r in rows if r.section.startswith("evaluation") and r.variant.startswith("batched")
               and "+" not in r.variant and r.rate), None)
    if it is None or ev is None or not it.rate:
        return None
    distill_s = FULL_ITERATIONS / it.rate
    eval_s = FULL_NETS / ev.rate * (1000 / epochs)  # the 1000-epoch protocol, scaled linearly from --epochs
    return {"distill_s": distill_s, "evaluate_s": eval_s, "total_s": distill_s + eval_s}


def print_table(rows: list[Row], device: torch.device) -> None:
    table = Table(title=f"Distillation speed on {describe_machine(device)}")
    for col in ("section", "variant", "rate", "ratio", "peak MB", "note"):
        table.add_column(col, justify="right" if col in ("rate", "ratio", "peak MB") else "left")
    for r in rows:
        rate = "failed" if r.rate is None else f"{r.rate:.3g} {r.unit}"
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
        peak = "" if r.peak_mb is None else f"{r.peak_mb:.0f}"
        table.add_row(r.section, r.variant, rate, ratio, peak, r.note)
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--small", action="store_true", help="tiny sizes (a CPU smoke run in seconds)")
    p.add_argument("--ipc", type=int, default=None, help="images per class of the synthetic set (default 10)")
    p.add_argument("--width", type=int, default=None, help="ConvNet width (default 128)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per DM / DKKT row (default 30)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations before each timing (default 5)")
    p.add_argument("--naive-iters", type=int, default=None, help="timed iterations of the DKKT loop (default 3)")
    p.add_argument("--epochs", type=int, default=None, help="evaluation epochs (default 1000, the protocol)")
    p.add_argument("--nets", type=int, default=FULL_NETS, help="nets trained at once by the batched evaluation")
    p.add_argument("--seq-nets", type=int, default=1, help="nets trained one after another for the sequential rate")
    p.add_argument("--variants", default=None,
                   help="comma list of bf16,channels_last,compile and their +-combinations, e.g. channels_last+compile "
                        "(default: bf16,channels_last,compile on CUDA, none on CPU; 'none' for none)")
    p.add_argument("--sections", default="dm,dkkt,eval,distill", help="comma list of dm,dkkt,eval,distill")
    p.add_argument("--dm-pools", default="pipc,batch_real",
                   help="the DM step's pools: pipc (real batch = pipc per class), batch_real (256 of 512 per class)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--full", action="store_true", help="also run 20k DM+DKKT iterations + a 5-net evaluation for real")
    p.add_argument("--json", default=None, metavar="PATH", help="write all rows and the estimate as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if args.small:
        sizes = Sizes(classes=3, size=8, width=8, ipc=2, pipc=4, batch_real=8, big_ipc=4, test_images=30,
                      cpu_batch_real=2, cpu_candidates=3)
        defaults = {"iters": 2, "warmup": 1, "naive_iters": 1, "epochs": 3}
    else:
        sizes = Sizes()
        defaults = {"iters": 30, "warmup": 5, "naive_iters": 3, "epochs": 1000}
    sizes.ipc = args.ipc or sizes.ipc
    sizes.width = args.width or sizes.width
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.nets = max(args.nets, 2)
    if args.variants is None:
        variants = ["bf16", "channels_last", "compile"] if device.type == "cuda" else []
    else:
        variants = [v for v in args.variants.split(",") if v and v != "none"]
    sections = set(args.sections.split(","))
    torch.backends.cudnn.benchmark = device.type == "cuda"
    console.print(f"device: {describe_machine(device)}; sizes {sizes}")

    rows: list[Row] = []
    if "dm" in sections:
        rows += bench_dm(sizes, args, device, variants)
    if "dkkt" in sections:
        rows += bench_dkkt(sizes, args, device)
    if "eval" in sections:
        rows += bench_eval(sizes, args, device, variants)
    if "distill" in sections:
        rows += bench_full_iteration(sizes, args, device, variants)
    print_table(rows, device)

    summary = ratio_summary(rows)
    for k, v in summary.items():
        console.print(f"ratio  {k}: " + ("n/a" if v is None else f"{v:.2f}x"))
    est = estimate(rows, sizes, args.epochs)
    if est is not None:
        console.print(
            f"estimate  {FULL_ITERATIONS} DM+DKKT iterations at ipc {sizes.ipc}: {est['distill_s']:.0f} s, "
            f"+ {FULL_NETS}-net evaluation (1000 epochs, batched): {est['evaluate_s']:.0f} s, "
            f"total {est['total_s'] / 60:.1f} min"
        )
    full = None
    if args.full:
        full = run_full(sizes, device)
        console.print(f"full run: distill {full['distill_s']:.0f} s + evaluation {full['evaluate_s']:.0f} s "
                      f"= {full['total_s'] / 60:.1f} min")
    if args.json:
        save_json(args.json, {
            "command": "python -m simulations.bench_distill " + shlex.join(sys.argv[1:] if argv is None else argv),
            "commit": git_commit(), "date": utc_stamp(),
            "device": describe_machine(device), "cpu_cores": os.cpu_count(), "sizes": vars(sizes),
            "args": {k: v for k, v in vars(args).items()}, "rows": [vars(r) for r in rows],
            "ratios": summary, "estimate": est, "full": full,
        })
    return 0


def run_full(sizes: Sizes, device: torch.device) -> dict[str, float]:
    """20k DM+DKKT iterations at ipc, then a 5-net evaluation with the 1000-epoch protocol, timed."""
    public_x, public_y = class_data(sizes, sizes.pipc, device, seed=5)
    test_x, test_y = class_data(sizes, sizes.test_images // sizes.classes, device, seed=6)
    model = build_model(sizes.classes, sizes.channels, sizes.size, sizes.width)
    cfg = DistillConfig(method="dm+dkkt", ipc=sizes.ipc, iterations=FULL_ITERATIONS, log_every=500, checkpoint_every=10**9)
    sync(device)
    start = time.perf_counter()
    syn = distill(model, public_x, public_y, cfg, model_of(sizes), sizes.classes, 0, device)
    sync(device)
    distill_s = time.perf_counter() - start
    from server.distill.evaluate import evaluate_synthetic

    start = time.perf_counter()
    evaluate_synthetic(syn.images, syn.labels, test_x, test_y,
                       NetProtocol(EvaluationConfig(), model_of(sizes), sizes.classes, device),
                       list(range(FULL_NETS)))
    sync(device)
    evaluate_s = time.perf_counter() - start
    return {"distill_s": distill_s, "evaluate_s": evaluate_s, "total_s": distill_s + evaluate_s}


if __name__ == "__main__":
    raise SystemExit(main())
