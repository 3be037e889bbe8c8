"""The report stage of a protocol grid: OUT/table.md (the protocol, the table, the paired gains, the time per cell),
results.csv and the figures."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

from common.atomic import atomic_write, load_torch
from common.config import ExperimentConfig
from common.runtime import git_commit
from simulations.grid.cells import failed_cells, write_results
from simulations.grid.protocol import VARIANTS, Protocol
from simulations.grid.stages import Context


def failed_statement(table_dir: Path) -> str | None:
    """The cells whose distillation diverged (not in the table), each with its error; None when there are none."""
    failed = failed_cells(table_dir)
    if not failed:
        return None
    return "\n".join([f"**{len(failed)} cell(s) failed** (distillation diverged; not in the table above, each "
                      "`failed.json` holds the error):", *(f"- `{name}`: {error}" for name, error in failed.items())])


def protocol_header(protocol: Protocol, preset: str, cfg: ExperimentConfig, edge: dict[str, Any], ratio: float | None,
                    cell_results: list[Path]) -> str:
    scale = "; ".join(
        f"ipc {ipc}: {o.get('distill.iterations', cfg.distill.iterations)} iterations, batch_real "
        f"{o.get('distill.batch_real', cfg.distill.batch_real)}, DKKT candidates/it "
        f"{o.get('distill.dkkt_candidates', 0) or 'all'}, {o.get('evaluation.epochs', cfg.evaluation.epochs)} evaluation epochs"
        for ipc, o in protocol.per_ipc.items()
    )
    records = [json.loads(p.read_text()) for p in cell_results]
    cells = sorted({r.get("commit") or "unrecorded" for r in records})
    precision = cfg.distill.precision
    if precision == "auto":
        ran = sorted({r.get("distill_precision") or r["config"]["distill"].get("precision", "fp32") for r in records})
        precision = f"auto precision (bf16 on a CPU with bf16 units, else fp32; the cells ran in {', '.join(ran) or '-'})"
    compiled = sum(bool(r["config"]["distill"].get("compile")) for r in records) if records else cfg.distill.compile
    compile_mode = ("eager" if not compiled else "compiled" if not records or compiled == len(records)
                    else f"compiled in {compiled} of {len(records)} cells, eager in the rest")
    machines = sorted({json.loads((p.parent / "cell.json").read_text()).get("machine")
                       or "CPU: 2 cores (dev VM, model unrecorded)"
                       for p in cell_results})
    reused = sum("reused_from" in json.loads((p.parent / "cell.json").read_text()) for p in cell_results)
    if protocol.pipcs:
        split = (f"pipc {', '.join(map(str, sorted(protocol.pipcs)))} public images per class, nested (each pipc's public "
                 f"subset contains the smaller ones; split.private_pipc={protocol.private_pipc}): the private pool is the "
                 f"complement of the pipc-{protocol.private_pipc} draw and the validation slice at every pipc, so one "
                 f"received model serves every column and no public image was ever private (pipc > {protocol.private_pipc} "
                 "takes its extra images from the validation slice, which nobody trained on)")
    else:
        split = f"pipc {cfg.split.pipc} public images per class"
    partition = cfg.split.partition + (f" (alpha {cfg.split.alpha:g})" if cfg.split.partition == "dirichlet" else "")
    return "\n".join([
        f"Preset `{preset}` of `python -m simulations.evidence`: cells made at commit {', '.join(cells)}; this report at "
        f"{git_commit()}, {time.strftime('%Y-%m-%d')}; cells ran on {'; '.join(machines) or 'no machine yet'}"
        + (f"; {reused} cells reused from `{protocol.reuse}` (same name and configuration; cell.json `reused_from`)."
           if reused else "."),
        f"CIFAR-10 (JPEG copy), {split}; the received model: a Flower federation of {edge['num_clients']} {partition} "
        f"edge clients on the whole private pool, {edge['rounds']} rounds, test accuracy {100 * edge['test_accuracy']:.2f} %.",
        f"Scale (reduced, not the paper's 20k iterations / 1000 epochs): {scale}; {cfg.evaluation.num_nets} evaluation nets "
        f"per seed; mean ± std over every net of every seed (seeds {', '.join(map(str, protocol.seeds))}; "
        f"ipc {', '.join(map(str, protocol.single_seed_ipcs))}: seed {protocol.seeds[0]} only). Distillation in "
        f"{precision}, {compile_mode}, evaluation in "
        f"{cfg.evaluation.precision}{', compiled' if cfg.evaluation.compile else ', eager'} (docs/benchmarks.md, "
        "\"Distillation modes\": compile, bf16 and both together each held the accuracy on the CPU protocol at ipc 1 "
        "and 10, within the spread of fp32 reruns; compile with bf16 is the fastest mode on a CPU with bf16 units, and "
        "bf16 a slowdown on one without).",
        f"dkkt_weight auto, dkkt_ratio {ratio:g} (chosen on the validation slice, calibration.json)" if ratio is not None
        else "dkkt_ratio: not calibrated yet",
    ])


def curve_statement(out: Path) -> str | None:
    """How `dm@conv`'s iteration counts were chosen (OUT/curve.json), for the table's header."""
    path = out / "curve.json"
    if not path.is_file():
        return None
    curve = json.loads(path.read_text())
    chosen = ", ".join(f"ipc {k}: {v}" for k, v in curve["converged_iterations"].items())
    return (f"DM's iteration count (`dm@conv`): chosen on DM's validation curve (`dm_curve.png`, `curve.csv`), "
            f"{curve['rule']}: {chosen} iterations; evaluated on {curve['evaluated_on']}. The gain below against "
            "`dm@conv` is the headline: against a DM that has converged.")


def variant_legend(protocol: Protocol) -> str:
    """What each column that is not a plain method changes."""
    changed = {"dm@step": "dm with the image learning rate x (1 + dkkt_ratio)",
               "dm@conv": "dm with the iteration count DM's validation curve chose",
               **{v.name: f"{v.method} with " + ", ".join(f"{k.split('.')[-1]}={val}" for k, val in v.overrides.items())
                  for v in VARIANTS.values() if v.overrides}}
    return "Columns: " + "; ".join(f"`{name}` = {changed[name]}" for name in protocol.variants if name in changed) + "."


def edge_traffic(ctx: Context, edge: dict[str, Any]) -> tuple[int | None, str]:
    """Bytes the server received from the edge in the received model's federation and where the figure comes from:
    its metrics.jsonl, or (a run from before bytes were counted) the received model's tensors once per training reply."""
    from server.traffic import bytes_received

    run = ctx.out / edge["run"]
    total = bytes_received(run)
    if total is not None:
        return total, f"recorded in `{edge['run']}/metrics.jsonl` (every reply of every round, deflated)"
    weights = sum(t.numel() * t.element_size() for t in load_torch(run / "received_model.pt").values())
    total = weights * edge["num_clients"] * edge["rounds"]
    return total, (f"computed, not recorded (the federation predates byte counting): {weights / 1e6:.2f} MB of weights "
                   f"(the received model's tensors) per training reply × {edge['num_clients']} clients × "
                   f"{edge['rounds']} rounds; the "
                   "evaluation replies carry only metrics")


def synthetic_sizes(table_dir: Path, results: pd.DataFrame) -> dict[int, dict[str, int]]:
    """ipc -> the size of one distilled set of that ipc (the first dm+dkkt cell's seed; every method's set of an ipc
    has the same shape)."""
    from server.distill.artifacts import synthetic_bytes
    from simulations.reports.report import set_dir

    sizes = {}
    for _, row in results[results["method"] == "dm+dkkt"].iterrows():
        seed_dir = set_dir(table_dir / "cells" / row["cell"]) / f"seed_{row['seed']}"
        if int(row["ipc"]) not in sizes and (seed_dir / "synthetic.pt").is_file():
            sizes[int(row["ipc"])] = synthetic_bytes(seed_dir)
    return sizes


def audit_summary(protocol: Protocol, results: pd.DataFrame) -> pd.DataFrame:
    """The rows of the protocol's audit folders (summary.csv) whose set is one of the table's cells (planted
    controls included)."""
    frames = [pd.read_csv(path) for d in protocol.audits if (path := Path(d) / "summary.csv").is_file()]
    if not frames:
        return pd.DataFrame()
    summary = pd.concat(frames).drop_duplicates("set", keep="last")
    return summary[summary["set"].str.split("+").str[0].isin(set(results["cell"]))]


def gain_tables(results: pd.DataFrame) -> list[str]:
    """The paired gains of `dm+dkkt` over the baselines, then of each of its variants (other starts such as the
    top-lambda one, ablations such as `dm+primal`) over `dm+dkkt` itself and the same baselines."""
    from simulations.reports.report import paired_gains

    variants = sorted(m for m in set(results["method"])
                      if m != "dm+dkkt" and m in VARIANTS and VARIANTS[m].method == "dm+dkkt")
    return [paired_gains(results, "dm+dkkt", ("random", "dm", "dm@conv", "dm@step")),
            *(paired_gains(results, m, ("dm+dkkt", "dm", "dm@conv")) for m in variants)]


def timing_section(results: pd.DataFrame) -> str:
    """Seconds per cell, and the grid's cost: cell time and CPU-hours (cell time x the cell's torch threads, 1 where
    its machine line does not record them) in all and per method."""
    seconds = results.groupby(["ipc", "pipc", "method"]).agg(
        done=("seed", "count"), distill_s=("distill_s", "mean"), evaluate_s=("evaluate_s", "mean")).reset_index()
    rows = ["| ipc | pipc | method | seeds done | distillation s / seed | evaluation s / seed |", "|---|---|---|---|---|---|"]
    rows += [f"| {r['ipc']} | {r['pipc']} | {r['method']} | {r['done']} | {r['distill_s']:.0f} | {r['evaluate_s']:.0f} |"
             for _, r in seconds.iterrows()]
    hours = (results["distill_s"].fillna(0) + results["evaluate_s"].fillna(0)) / 3600
    threads = pd.to_numeric(results["machine"].fillna("").str.extract(r"(\d+) torch threads")[0])
    cpu_hours = (hours * threads.fillna(1)).groupby(results["method"]).sum().sort_values(ascending=False)
    per_method = ", ".join(f"{method} {h:.1f}" for method, h in cpu_hours.items())
    return (f"Time per cell (with --workers, several cells shared the machine at once); {len(results)} cells, "
            f"{hours.sum():.1f} hours of cell time, {cpu_hours.sum():.1f} CPU-hours (cell time x its torch threads, "
            f"counted as 1 for the {int(threads.isna().sum())} cells whose machine line does not record them) in all; "
            f"CPU-hours per method: {per_method}."
            "\n\n" + "\n".join(rows))


def report_stage(ctx: Context, cfg: ExperimentConfig) -> None:
    from simulations.reports.report import (
        audit_table,
        markdown_table,
        plot_accuracy_vs_pipc,
        plot_history,
        plot_method_bars,
        render,
        traffic_table,
    )

    preset = ctx.protocol.name
    table_dir = ctx.out / "table"
    results = write_results(table_dir)
    if results.empty:
        ctx.log("report: no finished table cell yet")
        return
    edge = json.loads((ctx.out / "edge_model.json").read_text())
    calibration = ctx.out / "calibration.json"
    ratio = json.loads(calibration.read_text())["chosen_dkkt_ratio"] if calibration.is_file() else None
    protocol = ctx.protocol
    title = (f"DM + DKKT against DM at pipc {', '.join(map(str, sorted(protocol.pipcs)))}" if protocol.pipcs
             else f"DM + DKKT against DM with {cfg.split.pipc} public images per class")
    audit = audit_summary(protocol, results)
    text = "\n\n".join(filter(None, [
        f"# {title} (preset `{preset}`)",
        protocol_header(protocol, preset, cfg, edge, ratio, sorted(table_dir.glob("cells/*/result.json"))),
        curve_statement(ctx.out),
        "Test accuracy (%):", markdown_table(results), failed_statement(table_dir), variant_legend(protocol),
        *gain_tables(results),
        audit_table(audit) if not audit.empty else None,
        traffic_table(edge_traffic(ctx, edge), synthetic_sizes(table_dir, results)),
        timing_section(results),
    ])) + "\n"
    atomic_write(ctx.out / "table.md", lambda tmp: tmp.write_text(text))
    atomic_write(ctx.out / "results.csv", lambda tmp: results.to_csv(tmp, index=False))
    if protocol.pipcs:
        plot_accuracy_vs_pipc(results, ctx.out / "accuracy_vs_pipc.png",
                              (f"received model ({100 * edge['test_accuracy']:.1f} %)", 100 * edge["test_accuracy"]))
    else:
        plot_method_bars(results, ctx.out / "accuracy.png")
    history = sorted((table_dir / "cells").glob("*-dm_dkkt-seed0/seed_0/history.jsonl"))
    if history:
        plot_history(history[0], ctx.out / "loss_terms.png")
    render(table_dir, ctx.out / "figures")
    ctx.log(f"report: {ctx.out / 'table.md'}")
