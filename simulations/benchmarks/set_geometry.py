"""What the DKKT term changes in a synthetic set, measured on committed sets (issue 23: why ipc 1 gains nothing).

    python -m simulations.benchmarks.set_geometry CELL... --model RECEIVED_MODEL.pt --out DIR [--nets 10]

For every set (an evidence cell's seed_0, or a folder with synthetic.pt / synthetic.json), against the public pool
and the validation slice of the set's own config:
- `dm_gap`: DM's own objective, sum over classes of ||mean psi(public_c) - mean psi(set_c)||^2, averaged over
  `--nets` fresh ConvNets psi (no augmentation), per class; how far the set's class means are from what DM matches.
- `model_accuracy`, `model_margin`: the received model's accuracy on the set and its mean margin (logit of the
  label minus the largest other logit): how much the set looks like its class to the model DKKT reads.
- `prototype_accuracy`: validation accuracy of a nearest-class-mean classifier in the same random features with the
  set's class means as prototypes; with one image per class a net trained on the set is close to such a classifier.
- `spread`: mean distance of a set image's features to its class mean, over the public images' (0 at ipc 1).
- `trained_accuracy` (from the cell's result.json: nets trained on the set, test split) and `beyond_prototype`, its
  excess over `prototype_accuracy`: what a trained net gets out of the set beyond its class means.

Writes DIR/set_geometry.json (with command, commit, machine, date) and DIR/set_geometry.md (a table per ipc).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from common.atomic import atomic_write, save_json
from common.config import build_config
from common.data import DataError
from common.models import build_model
from common.runtime import describe_machine, git_commit, utc_stamp
from server.distill.artifacts import load_synthetic
from server.distill.dm import randomize_, segment_mean
from server.server_data import distill_inputs
from simulations.commands.audit_sets import cell_seed_folder


def seed_folder(cell: Path) -> Path:
    """A folder with synthetic.pt, or an evidence cell's seed folder (as `feddistill audit` finds it)."""
    if (cell / "synthetic.pt").is_file():
        return cell
    try:
        return cell_seed_folder(cell)
    except (DataError, OSError):
        raise SystemExit(f"{cell}: no synthetic.pt here, in seed_0, or where cell.json's reused_from points") from None


@torch.no_grad()
def random_features(nets: list[torch.nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    return [torch.cat([net.embed(part) for part in x.split(200)]) for net in nets]


@torch.no_grad()
def geometry(images: torch.Tensor, labels: torch.Tensor, public: tuple[torch.Tensor, torch.Tensor],
             validation: tuple[torch.Tensor, torch.Tensor], model: torch.nn.Module, nets: list[torch.nn.Module],
             public_features: list[torch.Tensor], validation_features: list[torch.Tensor],
             num_classes: int) -> dict[str, float]:
    """The measures of one set (see the module docstring)."""
    logits = model(images)
    own = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    gaps, prototype_hits, spreads = [], [], []
    for feats_pub, feats_val, net in zip(public_features, validation_features, nets, strict=True):
        feats_set = net.embed(images)
        set_mean = segment_mean(feats_set, labels, num_classes)
        pub_mean = segment_mean(feats_pub, public[1], num_classes)
        gaps.append(float(((pub_mean - set_mean) ** 2).sum()) / num_classes)
        nearest = torch.cdist(feats_val, set_mean).argmin(1)
        prototype_hits.append(float((nearest == validation[1]).float().mean()))
        set_spread = (feats_set - set_mean[labels]).norm(dim=1).mean()
        pub_spread = (feats_pub - pub_mean[public[1]]).norm(dim=1).mean()
        spreads.append(float(set_spread / pub_spread))
    n = len(nets)
    return {"dm_gap": sum(gaps) / n, "model_accuracy": float((logits.argmax(1) == labels).float().mean()),
            "model_margin": float((own - others).mean()), "prototype_accuracy": sum(prototype_hits) / n,
            "spread": sum(spreads) / n}


COLUMNS = ("dm_gap", "model_accuracy", "model_margin", "prototype_accuracy", "trained_accuracy", "beyond_prototype",
           "spread")


def table(rows: list[dict]) -> str:
    """Mean ± std over seeds per (ipc, pipc, method), one markdown table."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["ipc"], row["pipc"], row["method"])].append(row)
    keys = [key for key in COLUMNS if all(key in row for row in rows)]
    lines = ["| ipc | pipc | method | sets | " + " | ".join(keys) + " |", "|---|---|---|---|" + "---|" * len(keys)]
    for (ipc, pipc, method), group in sorted(groups.items()):
        cells = []
        for key in keys:
            values = torch.tensor([r[key] for r in group])
            std = float(values.std()) if len(group) > 1 else 0.0
            cells.append(f"{float(values.mean()):.3f} ± {std:.3f}")
        lines.append(f"| {ipc} | {pipc} | {method} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cells", nargs="+", type=Path, help="evidence cells or folders with synthetic.pt")
    parser.add_argument("--model", type=Path, required=True, help="the received model (state_dict) the sets read")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--nets", type=int, default=10, help="fresh random ConvNets to average the features over")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows, contexts = [], {}
    for cell in args.cells:
        folder = seed_folder(cell)
        syn = load_synthetic(folder)
        cfg = build_config(syn.config)
        key = json.dumps([cfg.data.model_dump(mode="json"), cfg.split.model_dump(mode="json")], sort_keys=True)
        if key not in contexts:  # the pools and features of this split, computed once
            inputs = distill_inputs(cfg, "validation", args.model)
            torch.manual_seed(0)
            nets = [randomize_(build_model(inputs.num_classes, inputs.public_x.shape[1], inputs.public_x.shape[2],
                                           cfg.model.width, cfg.model.depth, cfg.model.norm)).eval() for _ in range(args.nets)]
            contexts[key] = (inputs, nets, random_features(nets, inputs.public_x), random_features(nets, inputs.eval_x))
        inputs, nets, pub_feats, val_feats = contexts[key]
        model = inputs.model.eval()
        measures = geometry(syn.images.float(), syn.labels.long(), (inputs.public_x, inputs.public_y),
                            (inputs.eval_x, inputs.eval_y), model, nets, pub_feats, val_feats, inputs.num_classes)
        ipc = int(torch.bincount(syn.labels).max())
        result = folder / "result.json"
        if result.is_file():
            measures["trained_accuracy"] = json.loads(result.read_text())["mean"]
            measures["beyond_prototype"] = measures["trained_accuracy"] - measures["prototype_accuracy"]
        cell_json = cell / "cell.json"  # an evidence cell names its variant (dm@conv is method dm at its own count)
        variant = json.loads(cell_json.read_text())["method"] if cell_json.is_file() else syn.method
        rows.append({"set": str(cell), "method": variant, "seed": syn.seed, "ipc": ipc, "pipc": cfg.split.pipc,
                     "init": cfg.distill.init, **measures})
        print(f"{cell.name}: " + " ".join(f"{k}={v:.3f}" for k, v in measures.items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    save_json(args.out / "set_geometry.json", {
        "command": "python -m simulations.benchmarks.set_geometry " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": git_commit(), "machine": describe_machine(torch.device("cpu")), "date": utc_stamp(), "nets": args.nets,
        "seconds": round(time.perf_counter() - started, 1), "rows": rows})
    text = table(rows)
    atomic_write(args.out / "set_geometry.md", lambda path: path.write_text(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
