"""Where a whole `dm+dkkt` iteration spends its time: torch.profiler over timed iterations of `methods.distill` (the
sizes of `simulations.bench_distill`: ConvNet-3 width 128, ipc 10, the pipc-50 pool whole in each DM step, every
candidate in the DKKT term), in each distillation mode, one process.

Per mode: the rate under the profiler, the operators' self CPU time per iteration, and the convolutions' share of it
(forward and backward). 1 / that share bounds what any saving outside the convolutions can give. One more step,
profiled apart with input shapes, lists the convolutions by shape and the fraction of their time that goes to the
weight term PyTorch's convolution double backward computes whether or not it is wanted
(`is_double_backward_weight_term`: theta* is frozen, so in the DKKT term it never is). Then each of
ConvNet-3's convolutions at the CPU chunk's batch, forward, in fp32 and bf16, against a matmul of its im2col shape:
whether the convolutions already run at the matmul rate the machine reaches at that size.

    python -m simulations.benchmarks.profile_distill --modes fp32,compile+bf16 --threads 2 \
        --json docs/results/profile-cpu-width128-zen4-iteration.json
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from common.atomic import save_json
from common.config import DistillConfig
from common.models import CPU_CHUNK, build_model
from common.runtime import describe_machine, git_commit, utc_stamp
from server.distill.methods import distill
from simulations.benchmarks.bench_distill import DISTILL_MODES as MODES
from simulations.benchmarks.bench_distill import Sizes, class_data, distill_mode, model_of, rate_of


def is_convolution(op: str) -> bool:
    """The aten operators that run a convolution or its backward (oneDNN's kernels sit under them)."""
    return "convolution" in op


def is_double_backward_weight_term(op: str, shapes: Sequence[Sequence[int]]) -> bool:
    """Whether a forward convolution operator's (input, weight) shapes are those of `_convolution_double_backward`'s
    weight term conv(ggI, gO): images and channels swapped, so its "weight" is a gradient as wide as the input (a
    ConvNet's own convolutions have 3x3 weights on larger inputs; `convolution_backward` takes (grad, input, weight))."""
    return (is_convolution(op) and "backward" not in op and len(shapes) >= 2 and len(shapes[0]) == len(shapes[1]) == 4
            and shapes[0][1] == shapes[1][1] and list(shapes[0][2:]) == list(shapes[1][2:]))


def profile_mode(sizes: Sizes, mode: str, iterations: int, warmup: int, top: int) -> dict[str, Any]:
    """One `dm+dkkt` distillation in `mode`: `warmup` steps, `iterations` under the profiler (timed), then one more
    with the operators' input shapes recorded, apart: recording them roughly doubles the process's memory per
    profiled iteration here and slows the element-wise operators several-fold, so that step gives the convolutions by
    shape and the weight term's fraction of the convolution time, and the timed steps everything else."""
    public_x, public_y = class_data(sizes, sizes.pipc, torch.device("cpu"), seed=4)
    model = build_model(sizes.classes, sizes.channels, sizes.size, sizes.width)
    cfg = DistillConfig(method="dm+dkkt", ipc=sizes.ipc, iterations=warmup + iterations + 1,
                        batch_real=sizes.batch_real, log_every=1, checkpoint_every=10**9, **distill_mode(mode))
    timed = profile(activities=[ProfilerActivity.CPU])
    shaped = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
    marks: dict[str, float] = {}

    def on_iteration(it: int, metrics: dict[str, float], current: Any) -> None:
        if it == warmup:
            timed.__enter__()
            marks["start"] = time.perf_counter()
        elif it == warmup + iterations:
            marks["end"] = time.perf_counter()
            timed.__exit__(None, None, None)
            shaped.__enter__()
        elif it == warmup + iterations + 1:
            shaped.__exit__(None, None, None)

    distill(model, public_x, public_y, cfg, model_of(sizes), sizes.classes, 0, torch.device("cpu"), on_iteration)
    ops = sorted(((e.key, e.self_cpu_time_total / 1e3 / iterations, e.count / iterations) for e in timed.key_averages()),
                 key=lambda op: -op[1])
    total = sum(ms for _, ms, _ in ops)
    conv = sum(ms for name, ms, _ in ops if is_convolution(name))
    by_shape = sorted(({"op": e.key, "input_shapes": [list(shape) for shape in e.input_shapes[:2]],
                        "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count,
                        "weight_term": is_double_backward_weight_term(e.key, e.input_shapes)}
                       for e in shaped.key_averages(group_by_input_shape=True) if is_convolution(e.key)),
                      key=lambda row: -row["self_ms"])
    shaped_conv = sum(row["self_ms"] for row in by_shape)
    of_convolutions = sum(row["self_ms"] for row in by_shape if row["weight_term"]) / shaped_conv
    return {"mode": mode, "it_per_s": iterations / (marks["end"] - marks["start"]), "self_ms_per_it": total,
            "convolution_share": conv / total, "bound_outside_convolutions": total / conv if conv else None,
            "weight_term_of_convolutions": of_convolutions, "weight_term_share": of_convolutions * conv / total,
            "top_ops": [{"op": name, "self_ms_per_it": ms, "calls_per_it": calls} for name, ms, calls in ops[:top]],
            "convolutions_by_shape": [row for row in by_shape if row["self_ms"] > 0]}


def convolutions_against_matmul(sizes: Sizes, batch: int) -> list[dict[str, Any]]:
    """Each 3x3 convolution of ConvNet-3 (its input channels and side) on `batch` images, in fp32 and bf16: ms per
    forward and GFLOP/s, beside a matmul of its im2col shape ([batch * side^2, 9 * channels] x [9 * channels, width])."""
    rows, cpu = [], torch.device("cpu")
    for channels, side in ((sizes.channels, sizes.size), (sizes.width, sizes.size // 2), (sizes.width, sizes.size // 4)):
        flops = 2 * batch * side * side * 9 * channels * sizes.width
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(batch, channels, side, side, dtype=dtype)
            w = torch.randn(sizes.width, channels, 3, 3, dtype=dtype)
            cols = torch.randn(batch * side * side, 9 * channels, dtype=dtype)
            weights = torch.randn(9 * channels, sizes.width, dtype=dtype)
            conv = 1e3 / rate_of(lambda x=x, w=w: F.conv2d(x, w, padding=1), 30, 5, cpu)
            matmul = 1e3 / rate_of(lambda cols=cols, weights=weights: cols @ weights, 30, 5, cpu)
            rows.append({"input": [batch, channels, side, side], "dtype": str(dtype).removeprefix("torch."),
                         "conv_ms": conv, "conv_gflops": flops / conv / 1e6,
                         "matmul_ms": matmul, "matmul_gflops": flops / matmul / 1e6})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="fp32,compile+bf16", help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--iters", type=int, default=6, help="profiled iterations per mode")
    p.add_argument("--warmup", type=int, default=3, help="iterations before (the compiles happen there)")
    p.add_argument("--top", type=int, default=15, help="operators kept per mode, by self CPU time")
    p.add_argument("--small", action="store_true", help="tiny sizes (a smoke run in seconds)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, metavar="PATH", help="write the profiles as JSON")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if unknown := sorted(set(modes) - set(MODES)):
        p.error(f"--modes: unknown {', '.join(unknown)} (choose from {', '.join(MODES)})")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = Sizes(classes=3, size=8, width=8, ipc=2, pipc=4, batch_real=8) if args.small else Sizes()
    print(f"device: {describe_machine(torch.device('cpu'))}; sizes {sizes}")
    profiles = []
    for mode in modes:
        result = profile_mode(sizes, mode, args.iters, args.warmup, args.top)
        profiles.append(result)
        print(f"{mode}: {result['it_per_s']:.3f} it/s under the profiler, convolutions "
              f"{100 * result['convolution_share']:.1f} % of {result['self_ms_per_it']:.0f} ms self CPU per iteration, "
              f"the unwanted weight term of their double backward {100 * result['weight_term_of_convolutions']:.1f} % "
              f"of the convolutions (the shapes step), so {100 * result['weight_term_share']:.1f} % of the iteration")
        for op in result["top_ops"]:
            print(f"  {op['op'][:60]:60s} {op['self_ms_per_it']:8.1f} ms/it {op['calls_per_it']:7.1f} calls/it")
        for row in result["convolutions_by_shape"]:
            shapes = " x ".join(str(shape) for shape in row["input_shapes"])
            print(f"  {row['op'][:26]:26s} {shapes[:50]:50s}{' (weight term)' if row['weight_term'] else '':14s} "
                  f"{row['self_ms']:8.1f} ms {row['calls']:5d} calls (the shapes step)")
    convolutions = convolutions_against_matmul(sizes, CPU_CHUNK)
    for row in convolutions:
        print(f"conv {row['input']} {row['dtype']}: {row['conv_gflops']:.0f} GFLOP/s, a matmul of its im2col shape "
              f"{row['matmul_gflops']:.0f} GFLOP/s")
    if args.json:
        save_json(args.json, {
            "command": "python -m simulations.benchmarks.profile_distill " + shlex.join(sys.argv[1:] if argv is None
                                                                                          else argv),
            "commit": git_commit(), "date": utc_stamp(), "device": describe_machine(torch.device("cpu")),
            "sizes": vars(sizes), "iterations": args.iters, "warmup": args.warmup, "profiles": profiles,
            "convolutions": convolutions})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
