"""`feddistill audit`: finds synthetic sets (packs, seed / distill / run folders, evidence cells), audits each
against its own config's pools (`simulations/commands/audit.py`) and writes the outputs. Offline, with the private pool:
never part of the ServerApp.

    OUT/<set>/audit.csv     one row per synthetic image: distances, nearest images, SSIM, ratios, flags
    OUT/<set>/summary.json  the set's statistics, the pools and the flag's calibration
    OUT/<set>/gallery.png   synthetic | nearest private | nearest held-out | nearest public, closest pairs first
    OUT/summary.csv         one row per set (what the benchmark table joins)
    OUT/audit.json          the command's settings, the feature net, the machine, the commit, seconds
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common.atomic import atomic_write, load_torch, save_json, save_torch
from common.config import ExperimentConfig, build_config
from common.data import DataError, Dataset, Normalization, denormalize
from common.holdings import load_experiment_data, split_seed
from common.models import model_from_config
from common.runtime import describe_machine, git_commit, utc_stamp
from server.distill.artifacts import synthetic_normalization
from simulations.commands.audit import (
    FEATURE_MODEL,
    Pools,
    Space,
    audit_pools,
    audit_set,
    calibration,
    feature_embedder,
    null_auc,
    plant,
    prepare_space,
    train_feature_net,
)
from simulations.commands.synthetic_pack import load_pack


@dataclass(frozen=True)
class SyntheticSource:
    """A synthetic set to audit: its images in the normalised space, labels, normalisation and config."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    normalization: Normalization
    config: ExperimentConfig
    origin: str

    @property
    def pixels(self) -> torch.Tensor:
        return denormalize(self.images.float(), self.normalization)


def _seed_folder(name: str, folder: Path) -> SyntheticSource:
    tensors = load_torch(folder / "synthetic.pt")
    info = json.loads((folder / "synthetic.json").read_text())
    return SyntheticSource(name, tensors["images"], tensors["labels"].long(), synthetic_normalization(folder),
                           build_config(info["config"]), str(folder))


def cell_seed_folder(cell: Path) -> Path:
    """An evidence cell's seed_0, in the cell or where its cell.json says it was reused from."""
    if (cell / "seed_0" / "synthetic.pt").is_file():
        return cell / "seed_0"
    reused = json.loads((cell / "cell.json").read_text()).get("reused_from")
    if reused and (cell / reused / "seed_0" / "synthetic.pt").is_file():
        return (cell / reused / "seed_0").resolve()
    raise DataError(f"{cell}: no seed_0/synthetic.pt, here or where cell.json's reused_from points")


def find_sets(path: Path) -> list[SyntheticSource]:
    """The sets at `path`: a pack file, a seed folder, an evidence cell, a distill folder (each seed_k), a run folder
    (each distill/<method>/seed_k) or an evidence cells folder (each finished cell); DataError when there is none."""
    path = Path(path)
    if path.is_file():
        pack = load_pack(path)
        return [SyntheticSource(path.stem, pack.images, pack.labels.long(), pack.normalization, pack.config, str(path))]
    if (path / "synthetic.pt").is_file():
        return [_seed_folder(path.name, path)]
    if (path / "cell.json").is_file():
        return [_seed_folder(path.name, cell_seed_folder(path))]
    seeds = sorted(path.glob("seed_*/synthetic.pt"))
    if seeds:
        return [_seed_folder(f"{path.name}-{s.parent.name}", s.parent) for s in seeds]
    runs = sorted(path.glob("distill/*/seed_*/synthetic.pt"))
    if runs:
        return [_seed_folder(f"{s.parent.parent.name}-{s.parent.name}", s.parent) for s in runs]
    cells = sorted(c.parent for c in path.glob("*/result.json") if (c.parent / "cell.json").is_file())
    if cells:
        return [_seed_folder(cell.name, cell_seed_folder(cell)) for cell in cells]
    raise DataError(f"{path}: no synthetic set (a pack, a seed_k folder, a distill or run folder, or evidence cells)")


def load_feature_net(path: Path, dataset: Dataset, seed: int) -> tuple[torch.nn.Module, dict]:
    """The feature net at `path` (its record beside it, .json), trained and written there first when missing;
    DataError when it was trained for another dataset or seed."""
    record_path = path.with_suffix(".json")
    if not path.is_file():
        net, record = train_feature_net(dataset, seed)
        save_torch(path, net.state_dict())
        save_json(record_path, {**record, "commit": git_commit()})
    record = json.loads(record_path.read_text())
    wanted = {"dataset": dataset.name, "test_images": len(dataset.test), "seed": seed}
    if {k: record.get(k) for k in wanted} != wanted:
        raise DataError(f"{path}: trained for {[record.get(k) for k in wanted]}, this audit needs {list(wanted.values())} "
                        "(dataset, test images, seed); pass another --feature-net")
    net = model_from_config(FEATURE_MODEL, dataset.num_classes, dataset.channels, dataset.image_size)
    net.load_state_dict(load_torch(path))
    return net.eval(), record


@dataclass
class Workspace:
    """What sets of one data and split config share: the dataset, the pools and the prepared spaces."""

    dataset: Dataset
    pools: Pools
    spaces: list[Space]
    null_aucs: dict[int, dict[str, dict | None]]


def prepare(cfg: ExperimentConfig, seed: int, feature_net: Path, log) -> tuple[Workspace, dict]:
    dataset = load_experiment_data(cfg)
    pools = audit_pools(cfg, dataset, seed)
    net, record = load_feature_net(feature_net, dataset, seed)
    pixels = torch.cat([torch.as_tensor(a.images) for a in (dataset.train, dataset.test)]).permute(0, 3, 1, 2)
    pixels = pixels.float().div_(255.0)
    embed = feature_embedder(net, dataset.normalization)
    log(f"pools: {len(pools.private)} private in {len(pools.folds)} folds of {len(pools.reference_sample)}, "
        f"{len(pools.reference)} held-out, {len(pools.public)} public, {len(pools.null)} null images; embedding")
    spaces = [prepare_space("pixel", pixels.flatten(1), lambda x: x.flatten(1), 1 / math.sqrt(pixels[0].numel()), pools),
              prepare_space("feature", embed(pixels), embed, 1.0, pools)]
    return Workspace(dataset, pools, spaces, {}), record


def image_name(index: int, n_train: int) -> str:
    return f"train/{index}" if index < n_train else f"test/{index - n_train}"


def write_set(out: Path, source: SyntheticSource, pixels: torch.Tensor, ws: Workspace, seed: int,
              planted: dict | None = None) -> dict:
    """Audits one set into OUT/<name>/ and returns its summary row; `planted` describes a positive control's planted
    images (their positions), whose flags it counts."""
    size = len(source.labels)
    if size not in ws.null_aucs:
        ws.null_aucs[size] = {s.name: null_auc(s, ws.pools, size, seed) for s in ws.spaces}
    result = audit_set(pixels, source.labels, ws.pools, ws.spaces, seed, ws.null_aucs[size])
    n_train = len(ws.dataset.train)
    frame = pd.DataFrame(result.columns)
    for column in [c for c in frame.columns if c.endswith("_image")]:
        frame[column] = [image_name(int(i), n_train) for i in frame[column]]
    folder = out / source.name
    atomic_write(folder / "audit.csv", lambda tmp: frame.to_csv(tmp, index=False, float_format="%.6g"))
    cfg = source.config
    if planted:
        flags = result.columns["pixel_flag"][planted["positions"]]
        planted = {**planted, "flagged": int(flags.sum()), "feature_flagged":
                   int(result.columns["feature_flag"][planted["positions"]].sum())}
    summary = {"set": source.name, "origin": source.origin, "method": cfg.distill.method, "ipc": cfg.distill.ipc,
               "pipc": cfg.split.pipc, "seed": cfg.seed, **({"planted": planted} if planted else {}), **result.summary,
               "pools": pool_sizes(ws.pools),
               "calibration": {s.name: calibration(s, ws.pools) for s in ws.spaces}}
    save_json(folder / "summary.json", summary)
    gallery(folder / "gallery.png", pixels, result.columns, ws, source.name)
    row = {k: summary[k] for k in ("set", "method", "ipc", "pipc", "seed", "images")}
    if planted:
        row.update({"planted": len(planted["positions"]), "planted_flagged": planted["flagged"]})
    for space in ws.spaces:
        s = summary[space.name]
        row.update({
            f"{space.name}_fraction": s["fraction_closer_private"], f"{space.name}_fraction_low": s["bootstrap95"][0],
            f"{space.name}_fraction_high": s["bootstrap95"][1],
            f"{space.name}_null_fraction": s["null_fraction"].get("public", {}).get("fraction"),
            f"{space.name}_auc": s["auc"], f"{space.name}_auc_low": s["delong95"][0],
            f"{space.name}_auc_high": s["delong95"][1],
            f"{space.name}_null_auc": s["null_auc"]["auc"] if s["null_auc"] else None,
            f"{space.name}_flagged": s["flagged"], f"{space.name}_set_p": s["set_p_value"],
        })
    return row


def pool_sizes(pools: Pools) -> dict:
    return {"private": len(pools.private), "folds": len(pools.folds), "fold_size": len(pools.folds[0]),
            "reference_sample": len(pools.reference_sample), "reference": len(pools.reference),
            "public": len(pools.public), "null": len(pools.null), "null_training_images": pools.null_public}


def gallery(path: Path, pixels: torch.Tensor, columns: dict[str, np.ndarray], ws: Workspace, title: str,
            rows: int = 10) -> Path:
    """synthetic | nearest private | nearest held-out | nearest public (pixel L2), the lowest ratio first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(columns["pixel_ratio"], kind="stable")[:rows]
    space = ws.spaces[0]
    pools = {"private": (space.private, ws.pools.private), "reference": (space.reference_sample, ws.pools.reference_sample),
             "public": (space.public, ws.pools.public)}
    shape = pixels.shape[1:]
    fig, axes = plt.subplots(len(order), 4, figsize=(6.4, 1.7 * len(order) + 0.4), squeeze=False)
    for row, i in enumerate(order):
        panels = [(pixels[i], f"synthetic #{i}" + (" FLAG" if columns["pixel_flag"][i] else ""))]
        for pool, (rows_, index) in pools.items():
            position = int(np.searchsorted(index, columns[f"pixel_{pool}_image"][i]))
            label = {"reference": "held-out"}.get(pool, pool)
            panels.append((rows_[position].view(shape),
                           f"{label} {columns[f'pixel_{pool}'][i]:.3f}\nSSIM {columns[f'ssim_{pool}'][i]:.2f}"))
        for ax, (image, text) in zip(axes[row], panels, strict=True):
            picture = image.permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy()
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, interpolation="nearest")
            ax.set_title(text, fontsize=6)
            ax.axis("off")
    fig.suptitle(f"{title}: nearest images by pixel RMSE, lowest private/held-out ratio first", fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def run_audit(targets: list[Path], out: Path, feature_net: Path, seed: int = 0, data: str | None = None,
              planted: int = 0, log=print) -> pd.DataFrame:
    """Audits every set at `targets` into `out` (module docstring); with `planted`, each set also with `planted`
    exact and `planted` perturbed private images in it (the positive control). Returns the summary rows."""
    start = time.perf_counter()
    sources = [s for target in targets for s in find_sets(Path(target))]
    workspaces: dict[str, Workspace] = {}
    records, rows = {}, []
    for source in sources:
        cfg = source.config
        if data:
            cfg = build_config(cfg.model_dump(mode="json"), {"data.path": data})
        key = json.dumps([cfg.data.model_dump(mode="json"), cfg.split.model_dump(mode="json"), split_seed(cfg)])
        if key not in workspaces:
            workspaces[key], records[key] = prepare(cfg, seed, feature_net, log)
        ws = workspaces[key]
        pixels = source.pixels
        log(f"audit {source.name}: {len(source.labels)} images")
        rows.append(write_set(out, source, pixels, ws, seed))
        if planted:
            rows.append(write_planted(out, source, pixels, ws, seed, planted))
    frame = pd.DataFrame(rows)
    atomic_write(out / "summary.csv", lambda tmp: frame.to_csv(tmp, index=False, float_format="%.6g"))
    save_json(out / "audit.json", {
        "targets": [str(t) for t in targets], "seed": seed, "planted": planted, "feature_net": str(feature_net),
        "feature_net_record": next(iter(records.values()), None), "machine": describe_machine(torch.device("cpu")),
        "commit": git_commit(), "date": utc_stamp(),
        "seconds": round(time.perf_counter() - start, 1)})
    return frame


def write_planted(out: Path, source: SyntheticSource, pixels: torch.Tensor, ws: Workspace, seed: int, count: int) -> dict:
    """The positive control: the set with `count` exact and `count` perturbed private images planted in it."""
    private_pixels = ws.spaces[0].private.view(-1, *pixels.shape[1:])
    private_labels = torch.as_tensor(ws.dataset.train.labels[ws.pools.private])
    planted_pixels, labels, positions, sources = plant(pixels, source.labels, private_pixels, private_labels, count, seed)
    name = f"{source.name}+planted{count}"
    planted_source = SyntheticSource(name, source.images, labels, source.normalization, source.config, source.origin)
    images = [image_name(int(i), len(ws.dataset.train)) for i in ws.pools.private[sources]]
    planted = {"positions": positions.tolist(), "images": images, "exact": count, "perturbed": count}
    return write_set(out, planted_source, planted_pixels, ws, seed, planted)
