"""`feddistill`: the project's one console command (data, simulate, distill, sweep, report)."""

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


def cmd_simulate(args: argparse.Namespace) -> int:
    """Runs the federation in-process (Flower simulation engine) and prints the per-round table."""
    from simulations.simulate import simulate

    cfg = _load(args)
    simulate(cfg, output_dir=args.output_dir, console=console, verbose=args.verbose)
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    """Distils from a received model and the config's public subset, then evaluates (no Flower)."""
    from pathlib import Path

    import torch

    from common.atomic import load_torch
    from common.data import load_dataset, to_normalized_tensor
    from common.models import build_model
    from common.partition import make_split
    from common.runtime import pick_device
    from server.distill.run import run_distillation

    cfg = _load(args)
    dataset = load_dataset(cfg.data, cfg.seed)
    split = make_split(dataset.train.labels, cfg.split, cfg.seed)
    model = None
    if args.model:
        images = dataset.train.images
        model = build_model(dataset.num_classes, images.shape[-1], images.shape[1], cfg.model.width, cfg.model.depth, cfg.model.norm)
        state = load_torch(args.model)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise DataError(f"{args.model}: not a state_dict of the configured model.* ({err})") from None
    elif cfg.distill.method in ("dsv", "dm+dkkt"):
        raise ConfigError(f"distill.method={cfg.distill.method!r} needs the received model: pass --model received_model.pt")
    out_dir = Path(args.out or Path(cfg.output_dir) / f"{cfg.name}-distill-{cfg.distill.method.replace('+', '_')}").resolve()
    device = pick_device(cfg.device)
    result = run_distillation(
        cfg, model,
        to_normalized_tensor(dataset.train.images[split.public], device),
        torch.as_tensor(dataset.train.labels[split.public], device=device),
        to_normalized_tensor(dataset.test.images, device),
        torch.as_tensor(dataset.test.labels, device=device),
        out_dir, show_progress=True, num_classes=dataset.num_classes,
    )
    console.print(
        f"{cfg.distill.method}, ipc {cfg.distill.ipc}: test accuracy [bold]{100 * result['mean']:.2f} ± "
        f"{100 * result['std']:.2f} %[/] over {len(result['accuracies'])} evaluations; results: {out_dir}"
    )
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Runs (or resumes) a pipc x ipc x method x seed grid, then renders its report."""
    from pathlib import Path

    from simulations.report import markdown_table
    from simulations.sweep import load_sweep, run_sweep

    sweep = load_sweep(args.config)
    out_dir = Path(args.out or Path("runs") / f"sweep-{sweep.name}")
    table = run_sweep(sweep, out_dir, parse_overrides(args.overrides), console)
    console.print(markdown_table(table), highlight=False)
    console.print(f"results: {out_dir.resolve()}/results.csv; figures: feddistill report {out_dir}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Writes table.md, accuracy_vs_pipc.png, figure2.png and figure3.png for a sweep folder."""
    from simulations.report import render

    written = render(args.sweep_dir, args.out)
    console.print((written["table"]).read_text(), highlight=False)
    for name, path in written.items():
        console.print(f"{name}: {path}")
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
    p = add("simulate", cmd_simulate, "federated training of the edge clients, simulated in this process")
    p.add_argument("--output-dir", default=None, help="folder for the run folder (default: the config's output_dir)")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    p = add("distill", cmd_distill, "server-side distillation from a received model, then evaluation")
    p.add_argument("--model", default=None, help="received_model.pt of a run (needed by dsv and dm+dkkt)")
    p.add_argument("--out", default=None, help="output folder (default: <output_dir>/<name>-distill-<method>)")
    p = add("sweep", cmd_sweep, "the split-ratio benchmark over a YAML grid (resumes finished cells)")
    p.set_defaults(config="tiny")
    p.add_argument("--out", default=None, help="sweep folder (default: runs/sweep-<name>)")
    p = sub.add_parser("report", help="tables and figures of a sweep folder", description=cmd_report.__doc__)
    p.add_argument("sweep_dir", help="a folder written by feddistill sweep")
    p.add_argument("--out", default=None, help="where to write (default: <sweep_dir>/report)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as err:
        console.print(f"[red]error:[/] {err}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
