"""Files of a distillation run, all written atomically.

<dir>/<name>.pt    images, labels, lambdas (loadable with torch.load(weights_only=True))
<dir>/<name>.json  method, seed, ipc, iteration, the normalisation of the images (mean, std), full config
<dir>/<name>.png   a grid, one row per class (greyscale for one-channel images)
<dir>/result.json  accuracies, mean, std, method, ipc, seed, timings
<dir>/checkpoint.pt   the synthetic set so far plus what resuming needs (iteration, optimizer and RNG states)
<dir>/checkpoint.json method, seed, ipc, iteration, full config

Every JSON that records the config also records its hash (config_sha256); `check_resumable` lets a call continue in a
folder only when the config recorded there is the one it runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from common.atomic import atomic_write, load_torch, save_json, save_torch
from common.config import RESUME_NEUTRAL, config_differences, config_hash
from common.data import CIFAR10_NORMALIZATION, Normalization, denormalize
from server.distill.methods import DistillState, SyntheticSet

CHECKPOINT = "checkpoint"


def save_synthetic(
    syn: SyntheticSet, out_dir: Path, normalization: Normalization, name: str = "synthetic", iteration: int | None = None
) -> Path:
    """Writes <name>.pt and <name>.json (with the `normalization` the images live in) under out_dir; returns the .pt
    path."""
    out_dir = Path(out_dir)
    tensors = {"images": syn.images.detach().cpu(), "labels": syn.labels.cpu()}
    if syn.lambdas is not None:
        tensors["lambdas"] = syn.lambdas.detach().cpu()
    path = save_torch(out_dir / f"{name}.pt", tensors)
    ipc = int(torch.bincount(syn.labels).max()) if syn.labels.numel() else 0
    meta = {"method": syn.method, "seed": syn.seed, "ipc": ipc, "iteration": iteration,
            "normalization": normalization.to_json(), "config": syn.config,
            **({"config_sha256": config_hash(syn.config)} if isinstance(syn.config, dict) else {})}
    save_json(out_dir / f"{name}.json", meta)
    return path


def load_synthetic(out_dir: Path, name: str = "synthetic") -> SyntheticSet:
    """Reads back what save_synthetic wrote (tensors with weights_only=True)."""
    out_dir = Path(out_dir)
    tensors = load_torch(out_dir / f"{name}.pt")
    meta = json.loads((out_dir / f"{name}.json").read_text())
    lambdas = tensors.get("lambdas")
    return SyntheticSet(tensors["images"], tensors["labels"], lambdas, meta["method"], meta["seed"], meta["config"])


def synthetic_normalization(out_dir: Path, name: str = "synthetic") -> Normalization:
    """The normalisation of the images save_synthetic wrote; CIFAR-10's for a set written before it was recorded
    (every dataset was normalised with CIFAR-10's statistics then)."""
    meta = json.loads((Path(out_dir) / f"{name}.json").read_text())
    return Normalization.from_json(meta["normalization"]) if "normalization" in meta else CIFAR10_NORMALIZATION


def synthetic_bytes(out_dir: Path, name: str = "synthetic") -> dict[str, int]:
    """The size of the synthetic set in `out_dir`: its images and labels as stored (`stored`: float32 images, int64
    labels) and as 8-bit images (`uint8`: one byte per pixel and channel, one per label); the λ are not counted."""
    tensors = load_torch(Path(out_dir) / f"{name}.pt")
    images, labels = tensors["images"], tensors["labels"]
    stored = images.numel() * images.element_size() + labels.numel() * labels.element_size()
    return {"stored": stored, "uint8": images.numel() + labels.numel()}


def save_checkpoint(state: DistillState, labels: torch.Tensor, out_dir: Path, meta: dict[str, Any]) -> Path:
    """<out_dir>/checkpoint.json (`meta` plus the iteration), then checkpoint.pt (readable by load_synthetic too).

    In that order, a process killed between the two writes leaves a checkpoint.pt with a checkpoint.json at least as
    new beside it, naming its method, seed and config (check_resumable, load_checkpoint); the .pt's own iteration is
    the one resumed."""
    out_dir = Path(out_dir)
    tensors = {
        "images": state.images,
        "labels": labels.cpu(),
        "iteration": state.iteration,
        "opt_img": state.opt_img,
        "opt_lambda": state.opt_lambda,
        "rng": state.rng,
        "balance": state.balance,
    }
    if state.lambdas is not None:
        tensors["lambdas"] = state.lambdas
    save_json(out_dir / f"{CHECKPOINT}.json",
              {**meta, "config_sha256": config_hash(meta["config"]), "iteration": state.iteration})
    return save_torch(out_dir / f"{CHECKPOINT}.pt", tensors)


def check_resumable(out_dir: Path, config: dict[str, Any]) -> None:
    """ValueError (one line, naming the keys that differ) when a folder of `run_distillation` holds a run of another
    resolved config (config_to_dict) than `config`: its result.json, or a seed's synthetic.json or checkpoint.json.

    A recorded config_sha256 equal to the config's hash matches; otherwise (a different hash, or a record from before
    the hash) the recorded config is compared key by key, a key added since counting as its default
    (common.config.config_differences). Keys that do not change a seed's result (RESUME_NEUTRAL) are not compared."""
    out_dir = Path(out_dir)
    digest = config_hash(config)
    records = [out_dir / "result.json", *sorted(out_dir.glob("seed_*/synthetic.json")),
               *sorted(out_dir.glob(f"seed_*/{CHECKPOINT}.json"))]
    for path in records:
        if not path.is_file():
            continue
        try:
            meta = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({type(err).__name__}); remove it to start over") from None
        recorded = meta.get("config") if isinstance(meta, dict) else None
        if not isinstance(recorded, dict):
            raise ValueError(f"{path}: records no config; remove {out_dir} or use another output folder")
        if meta.get("config_sha256") == digest:
            continue
        differ = config_differences(recorded, config, ignore=RESUME_NEUTRAL)
        if differ:
            shown = "; ".join(differ[:5]) + (f"; {len(differ) - 5} more" if len(differ) > 5 else "")
            raise ValueError(
                f"{out_dir} holds a run of another configuration ({shown}); it resumes only the same configuration: "
                "use another output folder or remove this one"
            )


def load_checkpoint(out_dir: Path, method: str, seed: int) -> DistillState | None:
    """The DistillState in <out_dir>/checkpoint.pt, None when there is none; ValueError when it is unreadable or
    belongs to another method or seed."""
    path = Path(out_dir) / f"{CHECKPOINT}.pt"
    if not path.exists():
        return None
    saved = load_torch(path)
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if (meta.get("method"), meta.get("seed")) != (method, seed) or not isinstance(saved, dict) or "rng" not in saved:
        raise ValueError(f"{path}: not a checkpoint of method {method!r}, seed {seed}; remove it to start over")
    return DistillState(
        iteration=int(saved["iteration"]),
        images=saved["images"],
        lambdas=saved.get("lambdas"),
        opt_img=saved["opt_img"],
        opt_lambda=saved["opt_lambda"],
        rng=saved["rng"],
        balance=saved.get("balance"),
    )


def save_grid(
    images: torch.Tensor, labels: torch.Tensor, path: Path, normalization: Normalization, num_classes: int | None = None
) -> Path:
    """PNG of the de-normalised images, one row per class (shorter rows padded with black); an RGB PNG for colour
    images, a greyscale one for one-channel images."""
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    per_class = [images[labels == c] for c in range(num_classes)]
    width = max(max(len(p) for p in per_class), 1)
    rows = []
    for p in per_class:
        pad = images.new_zeros((width - len(p), *images.shape[1:]))
        rows.append(torch.cat([denormalize(p.detach().cpu().float(), normalization), pad.cpu().float()]))
    grid = make_grid(torch.cat(rows), nrow=width, padding=2, pad_value=1.0)[: images.shape[1]]  # make_grid makes 3
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(np.ascontiguousarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels))
    return atomic_write(path, lambda tmp: picture.save(tmp, format="png"))


def save_result(path: Path, result: dict[str, Any]) -> Path:
    """result.json (atomic)."""
    return save_json(path, result)
