"""`feddistill`: the project's one console command (data, simulate, distill, sweep, report, audit, ...)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from common.atomic import check_folder, save_json
from common.config import ConfigError, ExperimentConfig, build_config, load_config, parse_overrides
from common.data import DataError
from common.holdings import Holdings
from common.runtime import FederationError
from simulations.grid.command import add_grid_arguments

console = Console()


def _load(args: argparse.Namespace) -> ExperimentConfig:
    return load_config(args.config, parse_overrides(args.overrides))


def cmd_data(args: argparse.Namespace) -> int:
    """Loads the dataset, makes the public/private split and prints images per class per holder."""
    from common.holdings import decide_holdings, load_experiment_data

    cfg = _load(args)
    dataset = load_experiment_data(cfg)
    console.print(
        f"[bold]{dataset.name}[/]: {len(dataset.train)} train / {len(dataset.test)} test images, "
        f"{dataset.num_classes} classes"
    )
    console.print(holdings_table(dataset.train.labels, decide_holdings(cfg, dataset.train.labels), dataset.classes))
    return 0


def holdings_table(labels: np.ndarray, holdings: Holdings, classes: Sequence[str]) -> Table:
    """Images per class of every holder: the server's public subset, the validation slice, each client."""
    table = Table(title="Images per class: server public subset, validation slice and private edge shards")
    table.add_column("holder", no_wrap=True)
    for name in classes:
        table.add_column(name[:5], justify="right", no_wrap=True)
    table.add_column("total", justify="right", no_wrap=True)
    rows = [("public", holdings.public), ("validation", holdings.validation)]
    rows += [(f"client {k}", idx) for k, idx in enumerate(holdings.shards)]
    for holder, idx in rows:
        counts = np.bincount(labels[idx], minlength=len(classes))
        table.add_row(holder, *(str(c) for c in counts), str(len(idx)))
    return table


def cmd_partition(args: argparse.Namespace) -> int:
    """Writes one archive per party (client-<k>, public, test) and manifest.json: each node gets only its own."""
    from simulations.commands.simulate import quiet_environment

    quiet_environment()  # before flwr-datasets is imported (it reads FLWR_TELEMETRY_ENABLED then)
    from simulations.commands.partition import MANIFEST, partition

    cfg = _load(args)
    out = check_folder(Path(args.out), "--out")
    manifest = partition(cfg, out)
    for entry in manifest["archives"].values():
        console.print(f"{entry['file']}: {sum(entry['train_per_class'])} train / {sum(entry['test_per_class'])} test "
                      f"images, sha256 {entry['sha256'][:12]}", highlight=False)
    console.print(f"{out / MANIFEST}: holdings {manifest['holdings_sha256'][:12]}, split seed {manifest['split_seed']}")
    console.print(f"{out / 'label_distribution.json'}, {out / 'label_distribution.png'}: images per class of each client")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """Runs the federation in-process (Flower simulation engine) and prints the per-round table."""
    from server.resume import load_run_config
    from simulations.commands.simulate import simulate

    if args.resume and args.overrides:
        raise ConfigError("--resume takes the config from RUN_DIR/config.yaml: drop the overrides " + " ".join(args.overrides))
    cfg = load_run_config(args.resume) if args.resume else _load(args)
    simulate(cfg, output_dir=args.output_dir, console=console, verbose=args.verbose, resume=args.resume)
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    """Distils from a received model and the config's public subset, then evaluates (no Flower)."""
    from common.config import config_to_dict
    from common.methods import method
    from common.runtime import pick_device
    from server.distill.artifacts import check_resumable
    from server.distill.run import run_distillation
    from server.server_data import distill_inputs
    from simulations.commands.progress import progress_for

    if args.resume:
        if args.overrides or args.out:
            raise ConfigError(f"--resume takes the config and folder from {args.resume}: drop the overrides and --out")
        cfg, model_path = _distill_invocation(Path(args.resume))
        model_path = args.model or model_path
        out_dir = Path(args.resume).resolve()
    else:
        cfg, model_path = _load(args), args.model
        out_dir = Path(args.out or Path(cfg.output_dir) / f"{cfg.name}-distill-{cfg.distill.method.replace('+', '_')}").resolve()
        check_folder(out_dir, "--out" if args.out else "output_dir")
    # the public subset: what the federation excluded from every shard
    inputs = distill_inputs(cfg, "test", Path(model_path) if model_path else None, device=pick_device(cfg.device))
    if model_path:
        model_path = str(Path(model_path).resolve())
    elif method(cfg.distill.method).needs_model(cfg.distill.init):
        raise ConfigError(
            f"distill.method={cfg.distill.method!r} with init={cfg.distill.init!r} needs the received model: "
            "pass --model received_model.pt"
        )
    check_resumable(out_dir, config_to_dict(cfg))  # before invocation.json is rewritten
    save_json(out_dir / INVOCATION, {"config": config_to_dict(cfg), "model": model_path})
    with progress_for(console, args.progress_every) as progress:
        result = run_distillation(cfg, inputs.model, inputs.public_x, inputs.public_y, inputs.eval_x, inputs.eval_y,
                                  out_dir, inputs.normalization, num_classes=inputs.num_classes, progress=progress)
    console.print(
        f"{cfg.distill.method}, ipc {cfg.distill.ipc}: test accuracy [bold]{100 * result['mean']:.2f} ± "
        f"{100 * result['std']:.2f} %[/] over {len(result['accuracies'])} evaluations; results: {out_dir}"
    )
    return 0


INVOCATION = "invocation.json"  # what `feddistill distill --resume OUT_DIR` reads back: the config and --model


def _distill_invocation(out_dir: Path) -> tuple[ExperimentConfig, str | None]:
    """The config and --model an earlier `feddistill distill` wrote into its output folder."""
    path = out_dir / INVOCATION
    if not path.is_file():
        raise ConfigError(f"--resume {out_dir}: no {INVOCATION} there (not an output folder of feddistill distill)")
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if (not isinstance(saved, dict) or not isinstance(saved.get("config"), dict)
            or not isinstance(saved.get("model"), (str, type(None)))):
        raise ConfigError(f"{path}: must be a JSON object with 'config' (an object) and 'model' (a path or null)")
    return build_config(saved["config"]), saved["model"]


def cmd_sweep(args: argparse.Namespace) -> int:
    """Runs (or resumes) a grid of configs/grids/: a sweep (pipc x ipc x method x seed, then its table) or a protocol
    grid (`kind: protocol`: the evidence protocol's stages)."""
    from simulations.grid.command import run_protocol
    from simulations.grid.protocol import grid_path, load_protocol, read_grid
    from simulations.grid.sweep import load_sweep, run_sweep
    from simulations.reports.report import markdown_table

    path = grid_path(args.config)
    if read_grid(path).get("kind") == "protocol":
        protocol = load_protocol(path)
        out_dir = check_folder(args.out or Path("runs") / f"sweep-{protocol.name}", "--out" if args.out else "the grid folder")
        return run_protocol(protocol, out_dir, args, args.overrides)
    sweep = load_sweep(path)
    out_dir = check_folder(args.out or Path("runs") / f"sweep-{sweep.name}", "--out" if args.out else "the sweep folder")
    table = run_sweep(sweep, out_dir, parse_overrides(args.overrides), console, args.progress_every, args.workers,
                      args.address)
    console.print(markdown_table(table), highlight=False)
    console.print(f"results: {out_dir.resolve()}/results.csv; figures: feddistill report {out_dir}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Packs a distilled set (images, labels, normalisation, config and its hash, commit, accuracy) into one file, or
    writes it as DD-Ranking's evaluators read one (--format ddranking: a folder)."""
    from simulations.commands.synthetic_pack import export_ddranking, export_pack, load_pack

    export = export_ddranking if args.format == "ddranking" else export_pack
    path = export(Path(args.run_dir), Path(args.out), args.seed_index)
    pack = load_pack(path)
    accuracy = pack.meta["evaluation"]["mean"]
    console.print(f"{path}: {pack.meta['method']}, {len(pack.labels)} images (ipc {pack.meta['ipc']}), config "
                  f"sha256 {pack.meta['config_sha256'][:12]}"
                  + (f", measured {100 * accuracy:.2f} %" if accuracy is not None else ""),
                  highlight=False)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Re-evaluates a pack on its dataset's test split, with its own protocol or other epochs, nets and architectures."""
    from common.runtime import pick_device
    from server.distill.evaluate import mean_std
    from simulations.commands.synthetic_pack import EvaluationMode, evaluate_pack, load_pack, pack_test_set

    mode = EvaluationMode.parse(args.mode) if args.mode else None
    pack = load_pack(Path(args.pack))
    device = pick_device(args.device or pack.config.device)
    test_x, test_y = pack_test_set(pack, args.data, device)
    recorded = pack.meta["evaluation"]
    if recorded["accuracies"]:
        console.print(f"recorded: {100 * recorded['mean']:.2f} % over seeds {recorded['seeds']} "
                      f"({recorded['protocol']['epochs']} epochs, {pack.meta['config']['model']})", highlight=False)
    rows = []
    for arch in args.arch:
        accuracies = evaluate_pack(pack, test_x, test_y, device, args.epochs, args.nets, arch, mode)
        mean, std = mean_std(accuracies)
        rows.append({"arch": arch, "accuracies": accuracies, "mean": mean, "std": std})
        console.print(f"{arch}: {100 * mean:.2f} ± {100 * std:.2f} % ({' '.join(f'{a:.4f}' for a in accuracies)})",
                      highlight=False)
    if args.json:
        save_json(Path(args.json), {"pack": str(args.pack), "epochs": args.epochs, "nets": args.nets,
                                    "mode": args.mode, "results": rows})
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """The leakage audit of synthetic sets against the private pool (offline, for a data owner; never in the
    ServerApp): nearest private, held-out and public images of each synthetic image, per-image flags, the fraction
    closer to a private image, a membership AUC, a gallery."""
    from simulations.commands.audit_sets import run_audit

    out = check_folder(Path(args.out), "--out")
    if args.planted < 0:
        raise ConfigError(f"--planted={args.planted}: must be >= 0")
    frame = run_audit([Path(t) for t in args.targets], out, Path(args.feature_net or out / "feature_net.pt"), args.seed,
                      args.data, args.planted, log=lambda line: console.print(line, highlight=False))
    for row in frame.to_dict("records"):
        console.print(f"{row['set']}: closer to a private image {row['pixel_fraction']:.3f} "
                      f"[{row['pixel_fraction_low']:.3f}, {row['pixel_fraction_high']:.3f}] "
                      f"(null {row['pixel_null_fraction']:.3f}), "
                      f"AUC {row['pixel_auc']:.3f} [{row['pixel_auc_low']:.3f}, {row['pixel_auc_high']:.3f}], "
                      f"flagged {row['pixel_flagged']}/{row['images']} (set p {row['pixel_set_p']:.2g}); "
                      f"features: {row['feature_fraction']:.3f}, AUC {row['feature_auc']:.3f}, flagged {row['feature_flagged']}",
                      highlight=False)
    console.print(f"results: {out.resolve()}/summary.csv")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """A sweep folder: table.md, accuracy_vs_pipc.png, figure2.png, figure3.png, loss_curves.png. A run folder:
    federation_accuracy.png (per round) and each distilled method's loss terms and gradient shares."""
    from simulations.reports.report import render, render_run

    if (Path(args.sweep_dir) / "metrics.jsonl").is_file():  # a federation run folder
        written = render_run(Path(args.sweep_dir), args.out)
    else:
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
        p.add_argument("--config", "-c", default="quickstart", help="YAML path or a name under configs/")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
        p.set_defaults(func=func)
        return p

    add("data", cmd_data, "dataset summary and the public/private split table")
    p = add("partition", cmd_partition, "one data archive per party (edge clients, public subset, test set)")
    p.add_argument("--out", required=True, help="folder for client-<k>.tar.gz, public.tar.gz, test.tar.gz, manifest.json")
    p = add("simulate", cmd_simulate, "federated training of the edge clients, simulated in this process")
    p.add_argument("--output-dir", default=None, help="folder for the run folder (default: the config's output_dir)")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a crashed run after its last complete round")
    p = add("distill", cmd_distill, "server-side distillation from a received model, then evaluation")
    p.add_argument("--model", default=None, help="received_model.pt of a run (needed by dsv and dm+dkkt)")
    p.add_argument("--out", default=None, help="output folder (default: <output_dir>/<name>-distill-<method>)")
    p.add_argument("--resume", default=None, metavar="OUT_DIR", help="continue an interrupted distill in its output folder")
    p.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                   help="outside a terminal: a progress line per task at most this often (default 30)")
    p = add("sweep", cmd_sweep, "a benchmark grid of configs/grids/ (a sweep or the evidence protocol; resumes)")
    p.set_defaults(config="tiny-sweep")
    p.add_argument("--out", default=None, help="grid folder (default: runs/sweep-<name>)")
    p.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                   help="outside a terminal: a progress line per task at most this often (default 30)")
    add_grid_arguments(p)
    p = sub.add_parser("export", help="pack a distilled set into one shareable file", description=cmd_export.__doc__)
    p.add_argument("run_dir", help="a distill folder (RUN/distill/<method>) or one of its seed_<k> folders")
    p.add_argument("--out", required=True, help="the pack file to write (.pt), or the folder with --format ddranking")
    p.add_argument("--format", choices=["pack", "ddranking"], default="pack",
                   help="pack: one .pt file (default); ddranking: images.pt, labels.pt, lr.pt and meta.json in a folder, "
                        "as DD-Ranking's evaluators load a set (feddistill evaluate reads both)")
    p.add_argument("--seed-index", type=int, default=0, help="which seed_<k> of a distill folder (default 0)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("evaluate", help="re-evaluate a pack (other epochs, nets, architectures)",
                       description=cmd_evaluate.__doc__)
    p.add_argument("pack", help="a file written by feddistill export, or a folder of feddistill export --format ddranking")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per net (default: the recorded protocol)")
    p.add_argument("--nets", type=int, default=None, help="nets per architecture (default: the recorded seeds)")
    p.add_argument("--arch", nargs="+", default=["convnet"],
                   help="convnet (the pack's model), convnet:width=N,depth=N,norm=instancenorm|batchnorm|none, resnet18")
    p.add_argument("--data", default=None, help="the dataset (default: the pack config's data.path, else $FEDDISTILL_DATA)")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    p.add_argument("--mode", default=None,
                   help="fp32, compile, bf16 or compile+bf16: how the nets run (default: the recorded evaluation.compile "
                        "and precision); compile: the same protocol, faster per net after a one-off compile; bf16: "
                        "bfloat16 autocast, another protocol")
    p.add_argument("--json", default=None, help="also write the results here")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("audit", help="leakage audit: do synthetic sets look like the private images? (offline)",
                       description=cmd_audit.__doc__)
    p.add_argument("targets", nargs="+", help="packs (feddistill export), seed_<k> folders, evidence cells, distill "
                   "folders, run folders, or evidence cells folders (every finished cell)")
    p.add_argument("--out", required=True, help="folder for <set>/audit.csv, summary.json, gallery.png and summary.csv")
    p.add_argument("--feature-net", default=None, help="the feature space's ConvNet-3 (trained on half the test split and "
                   "written here when missing; default OUT/feature_net.pt)")
    p.add_argument("--seed", type=int, default=0, help="the audit's seed: test halves, samples, folds, bootstrap (default 0)")
    p.add_argument("--data", default=None, help="the dataset (default: each set config's data.path, else $FEDDISTILL_DATA)")
    p.add_argument("--planted", type=int, default=0, metavar="K",
                   help="positive control: also audit each set with K exact and K perturbed private images planted in it")
    p.set_defaults(func=cmd_audit)
    p = sub.add_parser("report", help="tables and figures of a sweep folder, or the curves of a run folder",
                       description=cmd_report.__doc__)
    p.add_argument("sweep_dir", help="a folder written by feddistill sweep, or a run folder of feddistill simulate")
    p.add_argument("--out", default=None, help="where to write (default: <sweep_dir>/report)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, FederationError, FileNotFoundError, ValueError) as err:
        # one line per problem, never wrapped
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        return 2
    except OSError as err:  # a file that cannot be read or written: name it
        text = f"{err.filename or ''}: {err.strerror or err}"
        console.print(f"[red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
