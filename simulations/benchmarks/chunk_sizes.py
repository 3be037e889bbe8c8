"""How many images one CPU pass should take (`common.models.CPU_CHUNK`): the three places that chunk, timed at each
chunk size in each mode, one process.

  dkkt       the DKKT stationarity term on ipc x classes candidates: value, then the gradient to the images and the
             multipliers (`stationarity_and_logits`, on theta* with the compiled norm backward under compile);
  dm_real    DM's real side: the embeddings of the pipc-50 pool (500 images), no grad (`dm_loss`'s first pass);
  eval_step  one evaluation training step on the ipc-10 set (100 images): forward in chunks, cross-entropy, backward,
             SGD step (`evaluate.train_net`'s inner loop, `net_forward` in the mode).

ConvNet-3 at width 128 (`simulations.bench_distill.Sizes`, --ipc). Modes: fp32 (eager), bf16, compile and
compile+bf16 (the split-ratio CPU preset's on a CPU with bf16 units): `distill.compile` and `distill.precision`, and
`evaluation.compile` and `evaluation.precision` for the evaluation step. "whole" is one pass over all images.
Compiled code is reset between chunk sizes, so each size compiles afresh in its untimed warm-up.

    python -m simulations.benchmarks.chunk_sizes --threads 2 --json docs/results/chunk-sizes-cpu-width128-zen4.json
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

import common.models as models
import server.distill.dkkt as dkkt_term
from common.atomic import save_json
from common.config import EvaluationConfig
from common.models import build_model, in_chunks
from common.runtime import autocast, compiled, describe_machine, git_commit, utc_stamp
from server.distill.evaluate import net_forward
from server.distill.norm_backward import with_compiled_norm_backward
from simulations.benchmarks.bench_distill import DISTILL_MODES as MODES
from simulations.benchmarks.bench_distill import Sizes, class_data, distill_mode, rate_of

WORKLOADS = ("dkkt", "dm_real", "eval_step")
WHOLE = "whole"


@contextlib.contextmanager
def chunk_of(size: int | None) -> Iterator[None]:
    """Every CPU pass `size` images (None: one pass over the whole batch): `common.models.CPU_CHUNK` and the DKKT
    term's bf16 chunk (`server.distill.dkkt.BF16_CHUNK`) set, restored after."""
    saved = models.CPU_CHUNK, dkkt_term.BF16_CHUNK
    models.CPU_CHUNK = dkkt_term.BF16_CHUNK = size or 10**9
    try:
        yield
    finally:
        models.CPU_CHUNK, dkkt_term.BF16_CHUNK = saved


def workload(name: str, mode: str, sizes: Sizes) -> Callable[[], Any]:
    """One call of `name` in `mode` on fixed random inputs (the same seed for every chunk size)."""
    torch.manual_seed(0)
    settings = distill_mode(mode)
    compile_, precision = settings["compile"], settings["precision"]
    cpu = torch.device("cpu")
    net = build_model(sizes.classes, sizes.channels, sizes.size, sizes.width)
    if name == "dkkt":
        frozen = dkkt_term.freeze_model(net, cpu)
        model = with_compiled_norm_backward(frozen) if compile_ else frozen
        n = sizes.ipc * sizes.classes
        x = torch.randn(n, sizes.channels, sizes.size, sizes.size, requires_grad=True)
        y, lambdas = torch.arange(n) % sizes.classes, torch.rand(n, requires_grad=True)

        def dkkt() -> Any:
            with autocast(cpu, precision):
                stat, _ = dkkt_term.stationarity_and_logits(model, x, y, lambdas)
            return torch.autograd.grad(stat, [x, lambdas])
        return dkkt
    if name == "dm_real":
        embedder = net.train().requires_grad_(False)
        embed = compiled(embedder.embed, compile_, cpu, "distill.compile")
        real_x, _ = class_data(sizes, sizes.pipc, cpu, seed=4)

        def dm_real() -> torch.Tensor:
            with torch.no_grad(), autocast(cpu, precision):
                return in_chunks(embed, real_x, models.cpu_chunk(embedder, real_x))
        return dm_real
    net.train()
    forward = net_forward(net, EvaluationConfig(compile=compile_, precision=precision), cpu)
    syn_x, syn_y = class_data(sizes, sizes.ipc, cpu, seed=5)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.5)

    def eval_step() -> None:
        loss = F.cross_entropy(in_chunks(forward, syn_x, models.cpu_chunk(net, syn_x)), syn_y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return eval_step


def measure(sizes: Sizes, workloads: Sequence[str], modes: Sequence[str], chunks: Sequence[int | None], iters: int,
            warmup: int) -> list[dict[str, Any]]:
    """ms per call of every (workload, mode, chunk size), and its speed against the whole-batch pass of the same
    workload and mode (when timed)."""
    rows = []
    for name in workloads:
        for mode in modes:
            timed: dict[int | None, float] = {}
            for chunk in chunks:
                torch._dynamo.reset()
                with chunk_of(chunk):
                    timed[chunk] = 1e3 / rate_of(workload(name, mode, sizes), iters, warmup, torch.device("cpu"))
            for chunk, ms in timed.items():
                row = {"workload": name, "mode": mode, "chunk": chunk or WHOLE, "ms": ms,
                       "speedup_vs_whole": timed[None] / ms if None in timed else None}
                rows.append(row)
                print(f"{name:9s} {mode:12s} chunk {row['chunk']!s:>5s}: {ms:8.1f} ms"
                      + ("" if row["speedup_vs_whole"] is None else f"  {row['speedup_vs_whole']:.2f}x whole"))
    return rows


def parse_chunks(spec: str) -> list[int | None]:
    """'10,20,whole' -> [10, 20, None]."""
    return [None if part == WHOLE else int(part) for part in spec.split(",") if part]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", default="10,20,50,whole", help="comma list of images per pass, 'whole' for one pass")
    p.add_argument("--modes", default="fp32,compile+bf16", help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--ipc", type=int, default=None, help="synthetic images per class: the DKKT candidates and the "
                   "evaluation set (default 10)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    p.add_argument("--iters", type=int, default=10, help="timed calls per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before (the compiles happen there)")
    p.add_argument("--small", action="store_true", help="tiny sizes (a smoke run in seconds)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON")
    args = p.parse_args(argv)
    modes, workloads = args.modes.split(","), args.workloads.split(",")
    for given, known, flag in ((modes, MODES, "--modes"), (workloads, WORKLOADS, "--workloads")):
        if unknown := sorted(set(given) - set(known)):
            p.error(f"{flag}: unknown {', '.join(unknown)} (choose from {', '.join(known)})")
    try:
        chunks = parse_chunks(args.chunks)
    except ValueError:
        p.error(f"--chunks: positive integers or '{WHOLE}', got {args.chunks!r}")
    if any(chunk is not None and chunk < 1 for chunk in chunks) or not chunks:
        p.error(f"--chunks: positive integers or '{WHOLE}', got {args.chunks!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = Sizes(classes=3, size=8, width=8, ipc=2, pipc=4) if args.small else Sizes()
    sizes.ipc = args.ipc or sizes.ipc
    print(f"device: {describe_machine(torch.device('cpu'))}; sizes {sizes}")
    rows = measure(sizes, workloads, modes, chunks, args.iters, args.warmup)
    if args.json:
        save_json(args.json, {
            "command": "python -m simulations.benchmarks.chunk_sizes " + shlex.join(sys.argv[1:] if argv is None
                                                                                    else argv),
            "commit": git_commit(), "date": utc_stamp(), "device": describe_machine(torch.device("cpu")),
            "sizes": vars(sizes), "iterations": args.iters, "warmup": args.warmup, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
