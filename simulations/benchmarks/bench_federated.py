"""Benchmark: federated training of the edge ConvNet-3 on the full private CIFAR-10 data (meant for a GPU).

10 edge clients, pipc=50 images per class held out as the server's public subset, IID or Dirichlet(alpha)
label skew; prints test accuracy per round, total time and the first round that reaches the target
accuracy (80% by default). It runs the whole federation in-process with Flower's simulation engine
(`simulations.commands.simulate.simulate`, i.e. flwr.simulation.run_simulation + Ray); the same run through the
Flower CLI is `flwr run . --federation-config "num-supernodes=10 client-resources-num-cpus=1
client-resources-num-gpus=0.1" -c 'config="cifar10_full"'`.

  python simulations/benchmarks/bench_federated.py                                  # IID, the cifar10_full schedule
  python simulations/benchmarks/bench_federated.py --partition dirichlet --alpha 0.5
  python simulations/benchmarks/bench_federated.py --rounds 1 --train-per-class 20 --test-per-class 10 \
      --width 16                                                                # CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console

from common.atomic import save_json
from common.config import ConfigError, load_config
from common.data import DataError

console = Console()


def rounds_to_reach(lines: list[dict[str, Any]], target: float) -> int | None:
    """The first round whose test accuracy is >= target (None when never)."""
    return next((x["round"] for x in lines if x["round"] > 0 and x["test_accuracy"] >= target), None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="cifar10_full", help="base YAML (default: cifar10_full)")
    p.add_argument("--partition", choices=("iid", "dirichlet", "shards"), default="iid")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (with --partition dirichlet)")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--pipc", type=int, default=50, help="public images per class held out on the server")
    p.add_argument("--rounds", type=int, default=None, help="default: the config's federation.rounds")
    p.add_argument("--local-epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--width", type=int, default=None, help="ConvNet width (default: the config's, 128)")
    p.add_argument("--train-per-class", type=int, default=None, help="a reduced slice (smoke runs)")
    p.add_argument("--test-per-class", type=int, default=None)
    p.add_argument("--client-cpus", type=float, default=None, help="Ray CPUs per ClientApp")
    p.add_argument("--client-gpus", type=float, default=None, help="GPU share per ClientApp (default: 1 / parallel clients)")
    p.add_argument("--target", type=float, default=0.80, help="test accuracy to count rounds to")
    p.add_argument("--output-dir", default=None)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="further config overrides")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from common.config import parse_overrides
    from simulations.commands.simulate import simulate

    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {
        "name": f"bench-federated-{args.partition}",
        "split.partition": args.partition,
        "split.alpha": args.alpha,
        "split.num_clients": args.clients,
        "split.pipc": args.pipc,
        "distill.enabled": False,
    }
    optional = {
        "federation.rounds": args.rounds,
        "federation.local_epochs": args.local_epochs,
        "federation.lr": args.lr,
        "model.width": args.width,
        "data.train_per_class": args.train_per_class,
        "data.test_per_class": args.test_per_class,
        "federation.client_num_cpus": args.client_cpus,
        "federation.client_num_gpus": args.client_gpus,
    }
    overrides.update({k: v for k, v in optional.items() if v is not None})
    if args.train_per_class is not None and args.pipc >= args.train_per_class:
        overrides["split.pipc"] = max(1, args.train_per_class // 5)
        overrides["distill.ipc"] = 1
    try:
        overrides.update(parse_overrides(args.overrides))
        cfg = load_config(args.config, overrides)
        outcome = simulate(cfg, output_dir=args.output_dir, console=console)
    except (ConfigError, DataError) as err:
        console.print(f"[red]error:[/] {err}", highlight=False)
        return 2
    lines = outcome.rounds
    reached = rounds_to_reach(lines, args.target)
    summary = {
        "partition": cfg.split.partition,
        "alpha": cfg.split.alpha if cfg.split.partition == "dirichlet" else None,
        "clients": cfg.split.num_clients,
        "pipc": cfg.split.pipc,
        "rounds": cfg.federation.rounds,
        "test_accuracy_per_round": [x["test_accuracy"] for x in lines],
        "final_test_accuracy": lines[-1]["test_accuracy"],
        "best_test_accuracy": max(x["test_accuracy"] for x in lines),
        "seconds": round(outcome.seconds, 1),
        "target": args.target,
        "rounds_to_target": reached,
    }
    save_json(outcome.run_dir / "bench_federated.json", summary)
    console.print(
        f"[bold]{cfg.split.partition}[/] ({cfg.split.num_clients} clients, pipc={cfg.split.pipc}): "
        f"final {summary['final_test_accuracy']:.4f}, best {summary['best_test_accuracy']:.4f}, "
        f"total {summary['seconds']:.1f} s, rounds to {args.target:.0%}: {reached if reached is not None else 'not reached'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
