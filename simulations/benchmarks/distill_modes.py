"""Do the faster distillation modes change the accuracy? Re-distils evidence cells in a mode, same everything else.

    python -m simulations.benchmarks.distill_modes docs/results/cpu-pipc50/table/cells/pipc50-ipc10-dm-seed? ... \
        --modes compile,bf16 --out docs/results/distill-modes-cpu/distill-modes-cpu.json

Each evidence cell (OUT/<stage>/cells/<name>, its fp32 set distilled and evaluated) is run again from its recorded
config with `distill.compile` / `distill.precision` set by the mode (`compile`, `bf16`, `compile+bf16`), on the same
received model (OUT/edge_model.json), public subset, seed and evaluation nets, into <out folder>/<mode>/<name>.
Mode `fp32` runs the recorded fp32 protocol again: the control. Any change of float rounding (a mode, or another
CPU's kernels) sends a distillation down another path from the same seed, so a mode is judged against the spread of
such reruns, not only against the one recorded set.
Written per (cell, mode): the accuracies, the cell's recorded fp32 accuracies and the distillation seconds; the table
beside the JSON (.md) compares each mode with fp32 per (ipc, method). Resumable: finished pairs in --out are kept,
an interrupted distillation continues from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_write, save_json
from common.config import ConfigError, build_config
from common.progress import LineProgress
from common.runtime import describe_machine, git_commit, utc_stamp
from server.server_data import distill_inputs
from simulations.commands.synthetic_pack import EvaluationMode


def received_model(out: Path) -> Path:
    """The evidence run's received model (theta*), from OUT/edge_model.json."""
    return out / json.loads((out / "edge_model.json").read_text())["run"] / "received_model.pt"


def distill_modes(cells: Sequence[Path], modes: Sequence[EvaluationMode], data: str | None, out: Path,
                  command: str = "") -> dict[str, Any]:
    """Every (cell, mode) not yet in `out`, appended to it after each one (atomic writes). Each run records its
    commit and machine; the top level holds the last invocation's `command`, commit and machine."""
    from server.distill.run import run_distillation

    report = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    report.update(machine=describe_machine(torch.device("cpu")), commit=git_commit(), command=command)
    done = {(r["cell"], r["mode"]) for r in report["runs"]}
    for mode in modes:
        for cell in cells:
            if (str(cell), mode.name) in done:
                continue
            recorded = json.loads((cell / "result.json").read_text())
            updates = {f"distill.{k}": v for k, v in mode.updates.items()} | ({"data.path": data} if data else {})
            cfg = build_config(recorded["config"], updates)
            inputs = distill_inputs(cfg, "test", received_model(cell.parents[2]))
            result = run_distillation(cfg, inputs.model, inputs.public_x, inputs.public_y, inputs.eval_x, inputs.eval_y,
                                      out.parent / mode.name / cell.name, inputs.normalization,
                                      num_classes=inputs.num_classes, progress=LineProgress(interval=120.0))
            report["runs"].append({
                "cell": str(cell), "mode": mode.name, "method": recorded["method"], "ipc": recorded["ipc"],
                "seeds": recorded["seeds"], "accuracies": result["accuracies"], "recorded": recorded["accuracies"],
                "distill_s": result["timings"]["distill_s"], "recorded_distill_s": recorded["timings"]["distill_s"],
                "finished": utc_stamp(), "commit": report["commit"], "machine": report["machine"],
            })
            save_json(out, report)
            print(f"{cell.name} {mode.name}: {' '.join(f'{a:.4f}' for a in result['accuracies'])} (fp32 recorded "
                  f"{' '.join(f'{r:.4f}' for r in recorded['accuracies'])}), distill {result['timings']['distill_s']:.0f} s",
                  flush=True)
    return report


def markdown(report: dict[str, Any]) -> str:
    """Per (ipc, method, mode): cells, mean accuracy of the mode and of the recorded fp32 sets (same cells), the mean
    difference and its range over cells, the fp32 cells' seed-to-seed std (the noise), and distillation seconds."""
    groups: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    for run in report["runs"]:
        groups.setdefault((run["ipc"], run["method"], run["mode"]), []).append(run)
    lines = ["| ipc | method | mode | cells | mean acc (%) | fp32 mean acc (%) | mean diff (points) | cell diffs (points) "
             "| fp32 seed std (points) | distill s (mode / fp32 recorded) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (ipc, method_name, mode), runs in sorted(groups.items()):
        means = [statistics.fmean(r["accuracies"]) for r in runs]
        fp32 = [statistics.fmean(r["recorded"]) for r in runs]
        diffs = [100 * (a - b) for a, b in zip(means, fp32, strict=True)]
        std = f"{100 * statistics.stdev(fp32):.2f}" if len(fp32) > 1 else "-"
        secs = (f"{statistics.fmean(r['distill_s'] for r in runs):.0f} / "
                f"{statistics.fmean(r['recorded_distill_s'] for r in runs):.0f}")
        lines.append(f"| {ipc} | {method_name} | {mode} | {len(runs)} | {100 * statistics.fmean(means):.2f} | "
                     f"{100 * statistics.fmean(fp32):.2f} | {statistics.fmean(diffs):+.2f} | "
                     f"{' '.join(f'{d:+.2f}' for d in diffs)} | {std} | {secs} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cells", nargs="+", type=Path, help="evidence cell folders (OUT/<stage>/cells/<name>)")
    p.add_argument("--modes", default="compile,bf16",
                   help="comma list of compile, bf16, compile+bf16, and fp32 (the recorded mode again: the control)")
    p.add_argument("--out", type=Path, required=True, help="the JSON report (resumed when it exists); a .md beside it")
    p.add_argument("--data", default=None, help="the dataset archive (default: the config's data.path / $FEDDISTILL_DATA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        modes = [EvaluationMode.parse(m) for m in args.modes.split(",") if m]
    except ConfigError as err:
        p.error(str(err).replace("evaluation mode", "distillation mode"))
    command = "python -m simulations.benchmarks.distill_modes " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = distill_modes(args.cells, modes, args.data, args.out, command)
    table = markdown(report)
    atomic_write(args.out.with_suffix(".md"), lambda tmp: tmp.write_text(table))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
