"""How much each loss term moves the synthetic images: DM and DKKT gradient norms, the DKKT weight and lambda.

    python -m simulations.benchmarks.dkkt_balance --config cpu_pipc50 --model RUN/received_model.pt --ipc 1 10 50 \
        --iterations 30 --out docs/results/cpu-pipc50/balance.json [key=value ...]

For each ipc it runs `dm+dkkt` from the config's public subset (init=real) for a few iterations and reports, over
the iterations after the first `--skip`: medians of L_DM, ||grad_S L_DM||, L_DKKT, ||grad_S L_DKKT|| (unweighted) and
the weight; the DKKT/DM ratio of the gradient norms summed over those iterations, the RMS pixel step of the DKKT part,
and lambda and L_stat /
mean|theta*| at the first and the last iteration. Then, on the images and lambda of the first and the last iteration and
over every candidate (L_stat exact, whatever distill.dkkt_candidates samples per iteration): which part of L_DKKT moves
the images (each weighted part's image gradient, its norm relative to the whole and its cosine with it).
Writes JSON and prints two markdown tables.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common.atomic import save_json
from common.config import DistillConfig, load_config, parse_overrides
from server.distill.dkkt import dkkt_parts, freeze_model
from server.distill.dsa import parse_strategy, sample_dsa
from server.distill.lambdas import flat_parameters
from server.distill.methods import SyntheticSet, distill
from server.server_data import distill_inputs


def measure(cfg, model, public_x, public_y, num_classes: int, ipc: int, iterations: int, skip: int, seed: int) -> dict[str, Any]:
    """Runs `iterations` DM+DKKT steps at `ipc` and summarises every iteration's metrics."""
    dcfg = cfg.distill.model_copy(update={"method": "dm+dkkt", "ipc": ipc, "init": "real", "iterations": iterations,
                                          "log_every": 1, "checkpoint_every": 10**9})
    rows: list[dict[str, float]] = []
    sets: list[SyntheticSet] = []

    def record(it: int, metrics: dict[str, float], current: SyntheticSet) -> None:
        rows.append(metrics)
        sets[1:] = [current]  # the first and the latest

    start = time.perf_counter()
    syn = distill(model, public_x, public_y, dcfg, cfg.model, num_classes, seed, "cpu", record)
    seconds = (time.perf_counter() - start) / iterations
    parts_first, parts_last = (gradient_parts(model, s.images, s.labels, s.lambdas, dcfg, seed) for s in (sets[0], sets[-1]))
    kept = rows[skip:]
    pixels = syn.images.numel()

    def med(key: str) -> float:
        return statistics.median(r[key] for r in kept)

    dkkt_raw = [r["grad_dkkt"] / r["dkkt_weight"] for r in kept]
    return {
        "ipc": ipc,
        "iterations": iterations,
        "measured_from": skip + 1,
        "seconds_per_iteration": seconds,
        "dm": med("dm"),
        "grad_dm": med("grad_dm"),
        "dkkt": med("dkkt"),
        "grad_dkkt_unweighted": statistics.median(dkkt_raw),
        "dkkt_weight": med("dkkt_weight"),
        "grad_dkkt_weighted": med("grad_dkkt"),
        "ratio_weighted": sum(r["grad_dkkt"] for r in kept) / max(sum(r["grad_dm"] for r in kept), 1e-30),
        "share_dkkt": med("share_dkkt"),
        "dkkt_step_rms": dcfg.lr_img * med("grad_dkkt") / math.sqrt(pixels),
        "lambda_mean_first": rows[0]["lambda_mean"],
        "lambda_mean_last": rows[-1]["lambda_mean"],
        "lambda_zeros_last": rows[-1]["lambda_zeros"],
        "stat_rel_first": rows[0]["stat_rel"],
        "stat_rel_last": rows[-1]["stat_rel"],
        "stat_rel_min": min(r["stat_rel"] for r in rows),
        "parts_first": parts_first,
        "parts_last": parts_last,
    }


def gradient_parts(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, lambdas: torch.Tensor,
                   cfg: DistillConfig, seed: int) -> dict[str, Any]:
    """Each weighted part of L_DKKT on every candidate (one DSA draw from `seed` for the augmented view): its value,
    its image gradient's norm relative to the whole L_DKKT's and its cosine with it; and L_stat / mean|theta*|."""
    model = freeze_model(model, images.device)
    x = images.detach().clone().requires_grad_(True)
    aug = sample_dsa(parse_strategy(cfg.dsa_strategy), x.shape[0], torch.Generator().manual_seed(seed), x.device)
    parts, terms = dkkt_parts(model, x, labels, lambdas, cfg, aug)
    grads = {name: torch.autograd.grad(value, x, retain_graph=True)[0].flatten() for name, value in parts.items()}
    parts, terms = ({k: v.detach() for k, v in d.items()} for d in (parts, terms))
    total = torch.stack(list(grads.values())).sum(0)
    scale = total.norm().clamp(min=torch.finfo(total.dtype).tiny)
    return {
        "stat_rel": float(terms["stat"] / flat_parameters(model).abs().mean()),
        "parts": {name: {"value": float(parts[name]), "norm_rel": float(g.norm() / scale),
                         "cos": float(g @ total / (g.norm().clamp(min=1e-30) * scale))} for name, g in grads.items()},
    }


def gradient_table(results: list[dict[str, Any]], ratio: float) -> str:
    lines = [
        f"| ipc | L_DM | ‖∇L_DM‖ | L_DKKT | ‖∇L_DKKT‖ (w=1) | w (auto) | ‖w∇L_DKKT‖ / ‖∇L_DM‖ (target {ratio}) "
        "| DKKT step RMS / it "
        "| λ mean first → last | L_stat / mean|θ*| first → last | s / it |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio_text = f"{r['ratio_weighted']:.3g}" if r["grad_dm"] > 1e-4 else f"{r['ratio_weighted']:.3g} (DM ≈ 0: floor)"
        lines.append(
            f"| {r['ipc']} | {r['dm']:.4g} | {r['grad_dm']:.3g} | {r['dkkt']:.4g} | {r['grad_dkkt_unweighted']:.3g} | "
            f"{r['dkkt_weight']:.3g} | {ratio_text} | {r['dkkt_step_rms']:.3g} | "
            f"{r['lambda_mean_first']:.3g} → {r['lambda_mean_last']:.3g} | {r['stat_rel_first']:.3f} → {r['stat_rel_last']:.3f} "
            f"| {r['seconds_per_iteration']:.2f} |"
        )
    return "\n".join(lines)


def markdown(results: list[dict[str, Any]], ratio: float) -> str:
    """Both tables: DM against DKKT, then the parts of L_DKKT."""
    return gradient_table(results, ratio) + "\n\n" + parts_table(results)


def parts_table(results: list[dict[str, Any]]) -> str:
    """Which part of L_DKKT moves the images, at the first and the last logged iteration (every candidate)."""
    names = list(results[0]["parts_first"]["parts"])
    lines = ["| ipc | iteration | L_stat / mean|θ*| (all candidates) | " + " | ".join(
                 f"{n}: ‖∇‖ / ‖∇L_DKKT‖, cos" for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for r in results:
        for when, key in (("first", "parts_first"), ("last", "parts_last")):
            p = r[key]
            cells = [f"{p['parts'][n]['norm_rel']:.2f}, {p['parts'][n]['cos']:+.2f}" for n in names]
            lines.append(f"| {r['ipc']} | {when} | {p['stat_rel']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu_pipc50")
    parser.add_argument("--model", required=True, help="received_model.pt of a federation with this config's split")
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--skip", type=int, default=10, help="iterations left out of the medians (EMA warm-up)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, parse_overrides(args.overrides))
    inputs = distill_inputs(cfg, model_path=args.model)
    results = []
    for ipc in args.ipc:
        results.append(measure(cfg, inputs.model, inputs.public_x, inputs.public_y, inputs.num_classes, ipc, args.iterations,
                               args.skip, args.seed))
        print(gradient_table(results[-1:], cfg.distill.dkkt_ratio).splitlines()[-1], flush=True)
    table = markdown(results, cfg.distill.dkkt_ratio)
    print(table)
    if args.out:
        save_json(args.out, {"config": args.config, "overrides": args.overrides, "model": str(args.model),
                             "distill": cfg.distill.model_dump(mode="json"), "results": results, "table": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
