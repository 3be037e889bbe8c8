"""`summary.md` of a run folder: the federated rounds and, when distillation ran, one row per method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.atomic import atomic_write
from common.config import ExperimentConfig
from server.traffic import traffic_totals

AGGREGATOR_NAMES = {"fedavg": "FedAvg", "fedmedian": "FedMedian", "fedtrimmedavg": "FedTrimmedAvg", "krum": "Krum"}


def summary_markdown(
    cfg: ExperimentConfig,
    rounds: list[dict[str, Any]],
    distill: dict[str, dict[str, Any]] | None,
    privacy: dict[str, float] | None = None,
) -> str:
    """Markdown with the per-round federation table, the DP guarantee and the distillation results (accuracies in %)."""
    s, f = cfg.split, cfg.federation
    pipc = s.pipc if s.pipc is not None else f"{s.public_ratio:.0%} of each class"
    lines = [
        f"# {cfg.name}",
        "",
        f"{s.num_clients} edge clients ({s.partition}), {f.rounds} rounds ({AGGREGATOR_NAMES[f.aggregator]}); "
        f"the server holds pipc = {pipc} "
        f"public images per class; data {cfg.data.name}, seed {cfg.seed}.",
        "",
        *_privacy_lines(privacy),
        "## Federated training (received model)",
        "",
        "| round | replies | test accuracy (%) | test loss | MB down / up (all clients) |",
        "|---|---|---|---|---|",
    ]
    for r in rounds:
        replies = f"{r['replies']}/{r['sampled']}" if r.get("round", 0) > 0 else "-"
        counted = r.get("round", 0) > 0 and "bytes_up" in r
        traffic = f"{r['bytes_down'] / 1e6:.2f} / {r['bytes_up'] / 1e6:.2f}" if counted else "-"
        lines.append(f"| {r['round']} | {replies} | {100 * r['test_accuracy']:.2f} | {r['test_loss']:.4f} | {traffic} |")
    totals = traffic_totals(rounds)
    if totals["per_client"]:
        lines += ["", f"Bytes on the edge-to-server link (serialised message content, `metrics.jsonl` has them per client "
                      f"and round): {totals['bytes_down'] / 1e6:.2f} MB down, {totals['bytes_up'] / 1e6:.2f} MB up over "
                      f"{len(totals['per_client'])} clients."]
    if distill:
        d, e = cfg.distill, cfg.evaluation
        lines += [
            "",
            f"## Distillation (ipc {d.ipc}, {d.iterations} iterations; evaluation: {e.num_nets} nets x "
            f"{d.num_seeds} seeds, {e.epochs} epochs)",
            "",
            "| method | test accuracy (%) | distill s | evaluate s | images |",
            "|---|---|---|---|---|",
        ]
        for method, result in distill.items():
            t = result["timings"]
            folder = method.replace("+", "_")
            lines.append(
                f"| {method} | {100 * result['mean']:.2f} ± {100 * result['std']:.2f} | {t['distill_s']:.1f} | "
                f"{t['evaluate_s']:.1f} | `distill/{folder}/seed_0/synthetic.png` |"
            )
    return "\n".join(lines) + "\n"


def _privacy_lines(privacy: dict[str, float] | None) -> list[str]:
    if privacy is None:
        return []
    return [
        f"Differential privacy (client level): epsilon = {privacy['epsilon']:.4g} at delta = {privacy['delta']:g} "
        f"(noise multiplier {privacy['noise_multiplier']:g}, clipping norm {privacy['clipping_norm']:g}, "
        f"sampling rate {privacy['sampling_rate']:.3g}, {privacy['rounds']} rounds; RDP accountant of dp-accounting).",
        "",
    ]


def write_summary(
    run_dir: Path,
    cfg: ExperimentConfig,
    rounds: list[dict[str, Any]],
    distill: dict[str, dict[str, Any]] | None,
    privacy: dict[str, float] | None = None,
) -> Path:
    text = summary_markdown(cfg, rounds, distill, privacy)
    return atomic_write(Path(run_dir) / "summary.md", lambda tmp: tmp.write_text(text))
