"""The command line of a protocol grid, shared by `feddistill sweep` and its alias `python -m simulations.evidence`.

    python -m simulations.evidence --preset cpu --out docs/results/cpu-pipc50 [--stages ...] [--max-minutes M]
        [--workers N] [--address HOST:PORT] [--variants ...] [--ipcs ...] [--pipcs ...] [--seeds ...] [key=value ...]

`--preset NAME` is configs/grids/NAME.yaml. Each call skips what an earlier one finished, so a grid runs in pieces.
`--workers N` runs the cells of the calibrate and table stages N at a time (on Ray when it is installed, else on local
processes; a GPU runs ConvNet-3 steps launch-bound, so several cells share it well); `--address` sends them to an
existing Ray cluster.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from common.config import ConfigError, parse_overrides
from simulations.grid.protocol import STAGES, VARIANTS, Protocol, TableFilter


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a protocol grid run (everything but which grid and where)."""
    parser.add_argument("--stages", nargs="+", choices=STAGES, help="stages to run (default: the grid file's)")
    parser.add_argument("--max-minutes", type=float, help="start no new cell after this many minutes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--workers", type=int, default=1, help="cells of a stage run at once")
    parser.add_argument("--address", default=None, help="an existing Ray cluster to run the cells on (ray.init address)")
    parser.add_argument("--variants", nargs="+", default=[], choices=sorted(VARIANTS), help="table: only these variants")
    parser.add_argument("--ipcs", nargs="+", type=int, default=[], help="table: only these ipcs")
    parser.add_argument("--pipcs", nargs="+", type=int, default=[], help="table: only these pipcs")
    parser.add_argument("--seeds", nargs="+", type=int, default=[], help="table: only these distillation seeds")


def run_protocol(protocol: Protocol, out: Path, args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """Runs a protocol grid with the options of `add_grid_arguments`."""
    import torch

    from simulations.grid.stages import run

    if args.workers < 1:
        raise ConfigError("--workers must be >= 1")
    torch.set_num_threads(args.threads)
    only = TableFilter(tuple(args.variants), tuple(args.ipcs), tuple(args.pipcs), tuple(args.seeds))
    return run(protocol, out, args.stages or protocol.stages, parse_overrides(list(overrides)), args.max_minutes,
               args.workers, args.threads, only, args.address)


def main(argv: Sequence[str] | None = None) -> int:
    from simulations.grid.protocol import load_protocol, protocol_names

    parser = argparse.ArgumentParser(prog="python -m simulations.evidence", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=protocol_names(), default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    add_grid_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="key=value applied to every config (e.g. data.path=...)")
    args = parser.parse_args(argv)
    try:
        return run_protocol(load_protocol(args.preset), args.out, args, args.overrides)
    except ConfigError as err:
        print(f"error: {err}")
        return 2
