"""Do the faster evaluation modes change the accuracies? Re-evaluates distilled sets under each mode, same seeds.

    python -m simulations.benchmarks.eval_modes docs/results/cpu-pipc50/table/cells/pipc50-ipc10-dm-seed0 ... \
        --modes fp32,compile,compile+bf16 --out docs/results/eval-modes-cpu.json

Each folder (a distill folder, one of its seed_<k> folders, or an evidence cell) is packed (`synthetic_pack`) and
its recorded protocol re-run (its epochs and evaluation seeds) in every mode: `fp32` (the reference, which
reproduces the recorded accuracies on the CPU), `compile` (evaluation.compile), `bf16`, `compile+bf16`. Written per
(folder, mode): every net's accuracy, its difference to the recorded one, and seconds per net, timed after a
2-epoch warm-up of the mode (the one-off compile, reported apart); the table beside it (.md) compares each mode
with fp32 on the same sets and seeds. Resumable: finished pairs in --out are kept.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_write, save_json
from common.runtime import describe_machine, git_commit, pick_device
from simulations.commands.synthetic_pack import EvaluationMode, evaluate_pack, export_pack, load_pack, pack_test_set


def evaluate_modes(folders: Sequence[Path], modes: Sequence[EvaluationMode], data: str | None, device: torch.device,
                   out: Path) -> dict[str, Any]:
    """Every (folder, mode) not yet in `out`, appended to it after each one (atomic writes)."""
    report = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    report.update(machine=describe_machine(device), commit=git_commit())
    done = {(r["folder"], r["mode"]) for r in report["runs"]}
    warmed: set[str] = set()  # (mode, set size) pairs compiled in this process; their seconds go to the report
    with tempfile.TemporaryDirectory() as tmp:
        for folder in folders:
            todo = [m for m in modes if (str(folder), m.name) not in done]
            if not todo:
                continue
            pack = load_pack(export_pack(folder, Path(tmp) / "pack.pt"))  # a folder's seed_0, or the seed folder
            test_x, test_y = pack_test_set(pack, data, device)
            recorded = pack.meta["evaluation"]["accuracies"]
            for mode in todo:
                shape = f"{mode.name}, {pack.images.shape[0]} images"
                if shape not in warmed:  # in this process: the compile for these shapes, outside the timing
                    start = time.perf_counter()
                    evaluate_pack(pack, test_x, test_y, device, epochs=2, nets=1, mode=mode)
                    report.setdefault("warmup_s", {})[shape] = time.perf_counter() - start
                    warmed.add(shape)
                start = time.perf_counter()
                accuracies = evaluate_pack(pack, test_x, test_y, device, mode=mode)
                seconds = (time.perf_counter() - start) / len(accuracies)
                report["runs"].append({
                    "folder": str(folder), "mode": mode.name, "method": pack.meta["method"], "ipc": pack.meta["ipc"],
                    "epochs": pack.config.evaluation.epochs, "seeds": pack.meta["evaluation"]["seeds"],
                    "accuracies": accuracies, "recorded": recorded,
                    "diff_to_recorded": [a - r for a, r in zip(accuracies, recorded, strict=False)], "seconds_per_net": seconds,
                })
                save_json(out, report)
                print(f"{folder.name} {mode.name}: {' '.join(f'{a:.4f}' for a in accuracies)} "
                      f"(recorded {' '.join(f'{r:.4f}' for r in recorded)}), {seconds:.1f} s/net", flush=True)
    return report


def markdown(report: dict[str, Any]) -> str:
    """Per (ipc, mode): nets, mean accuracy, its difference to the fp32 mode on the same sets and seeds (for fp32:
    to the recorded accuracies) as mean and largest, and seconds per net."""
    fp32 = {r["folder"]: r["accuracies"] for r in report["runs"] if r["mode"] == "fp32"}
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for run in report["runs"]:
        groups.setdefault((run["ipc"], run["mode"]), []).append(run)
    lines = ["| ipc | mode | nets | mean acc (%) | against | mean diff (points) | largest diff (points) | s / net |",
             "|---|---|---|---|---|---|---|---|"]
    for (ipc, mode), runs in sorted(groups.items()):
        against = "recorded" if mode == "fp32" else "fp32 here"
        pairs = [(a, b) for r in runs for a, b in zip(r["accuracies"], r["recorded"] if mode == "fp32"
                                                       else fp32.get(r["folder"], []), strict=False)]
        accs = [a for r in runs for a in r["accuracies"]]
        secs = sum(r["seconds_per_net"] * len(r["accuracies"]) for r in runs) / len(accs)
        diffs = [a - b for a, b in pairs]
        mean_diff = f"{100 * sum(diffs) / len(diffs):+.2f}" if diffs else "-"
        largest = f"{100 * max(diffs, key=abs):+.2f}" if diffs else "-"
        lines.append(f"| {ipc} | {mode} | {len(accs)} | {100 * sum(accs) / len(accs):.2f} | {against} | {mean_diff} "
                     f"| {largest} | {secs:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path, help="distill, seed_<k> or evidence cell folders")
    p.add_argument("--modes", default="fp32,compile,compile+bf16", help="comma list of fp32, compile, bf16, compile+bf16")
    p.add_argument("--out", type=Path, required=True, help="the JSON report (resumed when it exists); a .md beside it")
    p.add_argument("--data", default=None, help="the dataset archive (default: the config's data.path / $FEDDISTILL_DATA)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [EvaluationMode.parse(m) for m in args.modes.split(",") if m]
    report = evaluate_modes(args.folders, modes, args.data, pick_device(args.device), args.out)
    table = markdown(report)
    atomic_write(args.out.with_suffix(".md"), lambda tmp: tmp.write_text(table))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
