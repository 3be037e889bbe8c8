"""`feddistill`: the project's one console command (subcommands: data, ...)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console

from common.config import ConfigError, ExperimentConfig, load_config, parse_overrides
from common.data import DataError

console = Console()


def _load(args: argparse.Namespace) -> ExperimentConfig:
    return load_config(args.config, parse_overrides(args.overrides))


def cmd_data(args: argparse.Namespace) -> int:
    """Loads the dataset, makes the public/private split and prints images per class per holder."""
    from common.data import load_dataset
    from common.partition import make_split, summary_table

    cfg = _load(args)
    dataset = load_dataset(cfg.data, cfg.seed)
    console.print(
        f"[bold]{dataset.name}[/]: {len(dataset.train)} train / {len(dataset.test)} test images, "
        f"{dataset.num_classes} classes"
    )
    split = make_split(dataset.train.labels, cfg.split, cfg.seed)
    console.print(summary_table(dataset.train.labels, split, dataset.classes))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feddistill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "-c", default="quickstart", help="YAML path or a name under simulations/configs/")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
        p.set_defaults(func=func)
        return p

    add("data", cmd_data, "dataset summary and the public/private split table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError) as err:
        console.print(f"[red]error:[/] {err}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
