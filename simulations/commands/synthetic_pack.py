"""Shareable synthetic sets: one file with everything needed to reuse and re-evaluate a distilled set.

    feddistill export RUN/distill/dm_dkkt --out dm_dkkt-ipc10.pt     (a method folder, or one seed_k folder)
    feddistill export RUN/distill/dm_dkkt --format ddranking --out dm_dkkt/CIFAR10/IPC10   (DD-Ranking's layout)
    feddistill evaluate dm_dkkt-ipc10.pt [--epochs N] [--nets K] [--arch convnet resnet18 convnet:norm=batchnorm]

The pack is a `torch.save` dict that `torch.load(weights_only=True)` reads: `images` (N, C, H, W) float32 in the
normalised space, `labels` (N,), `mean`/`std` (C,) (the dataset's normalisation: pixels = images * std + mean, in
[0, 1]; `evaluate` normalises the test split with it too), and
`meta`, a JSON string: format, method, seed, ipc, the full experiment config and its sha256, the commit that made
it, the measured accuracies with their evaluation seeds and protocol. `evaluate` re-runs that protocol from the
pack and the dataset's test split alone: on the CPU with the same seeds it reproduces the recorded accuracies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.atomic import check_folder, load_torch, save_json, save_torch
from common.config import KNOWN_NUM_CLASSES, ConfigError, ExperimentConfig, build_config, config_hash
from common.data import DataError, Normalization, to_normalized_tensor
from common.holdings import load_experiment_data
from common.models import parse_architecture
from common.runtime import git_commit
from server.distill.artifacts import synthetic_normalization
from server.distill.evaluate import NetProtocol, evaluate_synthetic
from server.distill.run import eval_seeds

FORMAT = "feddistill-synthetic/1"
DDRANKING_META = "meta.json"  # beside DD-Ranking's images.pt / labels.pt / lr.pt: what `feddistill evaluate` needs


@dataclass(frozen=True)
class EvaluationMode:
    """How the evaluation nets run: `fp32` (the reference), `compile`, `bf16` or `compile+bf16`."""

    compile: bool = False
    precision: str = "fp32"

    @classmethod
    def parse(cls, spec: str) -> EvaluationMode:
        parts = set(spec.split("+"))
        if not parts <= {"fp32", "compile", "bf16"} or {"fp32", "bf16"} <= parts:
            raise ConfigError(f"evaluation mode {spec!r}: one of fp32, compile, bf16, compile+bf16")
        return cls("compile" in parts, "bf16" if "bf16" in parts else "fp32")

    @property
    def name(self) -> str:
        return "+".join(["compile"] * self.compile + [self.precision] * (self.precision != "fp32" or not self.compile))

    @property
    def updates(self) -> dict[str, Any]:
        return {"compile": self.compile, "precision": self.precision}


@dataclass(frozen=True)
class Pack:
    images: torch.Tensor
    labels: torch.Tensor
    normalization: Normalization
    meta: dict[str, Any]

    @property
    def config(self) -> ExperimentConfig:
        return build_config(self.meta["config"])


def _seed_dir(run_dir: Path, seed_index: int) -> Path:
    """A seed folder: `run_dir` itself when it holds synthetic.pt, else its seed_<k>."""
    if (run_dir / "synthetic.pt").is_file():
        return run_dir
    seed_dir = run_dir / f"seed_{seed_index}"
    if not (seed_dir / "synthetic.pt").is_file():
        raise DataError(f"{run_dir}: neither a seed folder nor a distill folder with {seed_dir.name}/synthetic.pt")
    return seed_dir


def export_pack(run_dir: Path, out: Path, seed_index: int = 0) -> Path:
    """Packs the synthetic set of `run_dir` (and its measured accuracy) into `out`."""
    return save_torch(out, _pack_contents(run_dir, seed_index))


def export_ddranking(run_dir: Path, out: Path, seed_index: int = 0) -> Path:
    """Writes the synthetic set of `run_dir` as DD-Ranking's evaluators read one, into the folder `out`.

    DD-Ranking (github.com/NUS-HPC-AI-Lab/DD-Ranking) loads a set with `torch.load(".../images.pt")` and passes the
    tensor as `compute_metrics(image_tensor=..., hard_labels=..., syn_lr=...)` (README.md, Quickstart; demo_hard.py;
    the soft-label demo also loads `labels.pt` and `lr.pt`). `ddranking/metrics/hard_label.py` takes images of shape
    (num_classes * ipc, C, H, W) and, without `hard_labels`, labels them class-major (ipc of class 0, then of class 1,
    ...); `ddranking/utils/data.py` normalises CIFAR-10's test split with mean (0.4914, 0.4822, 0.4465) and std
    (0.2023, 0.1994, 0.2010), the normalisation our CIFAR-10 images live in. So the folder holds `images.pt` (float32,
    normalised, in class-major order), `labels.pt` (int64), `lr.pt` (the evaluation lr, a 0-d tensor) and
    `meta.json` (this project's pack metadata and the mean/std), which `feddistill evaluate` reads back.
    """
    contents = _pack_contents(run_dir, seed_index)
    labels = contents["labels"]
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels)
    if (counts != counts[0]).any():
        raise DataError(f"{run_dir}: images per class differ ({counts.tolist()}); DD-Ranking expects ipc per class")
    meta = json.loads(contents["meta"])
    out = check_folder(Path(out), "--out")
    save_torch(out / "images.pt", contents["images"][order].contiguous())
    save_torch(out / "labels.pt", labels[order].contiguous())
    save_torch(out / "lr.pt", torch.tensor(meta["evaluation"]["protocol"]["lr"]))
    save_json(out / DDRANKING_META, {"meta": meta, "mean": contents["mean"].tolist(), "std": contents["std"].tolist()})
    return out


def _pack_contents(run_dir: Path, seed_index: int) -> dict[str, Any]:
    """The pack's tensors and its meta (a JSON string) for the synthetic set of `run_dir`."""
    seed_dir = _seed_dir(Path(run_dir), seed_index)
    tensors = load_torch(seed_dir / "synthetic.pt")
    info = json.loads((seed_dir / "synthetic.json").read_text())
    result_file = seed_dir / "result.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else None
    cfg = build_config(info["config"])
    meta = {
        "format": FORMAT,
        "method": info["method"],
        "seed": info["seed"],
        "ipc": info["ipc"],
        "iteration": info.get("iteration"),
        "dataset": cfg.data.name,
        "config": info["config"],
        "config_sha256": config_hash(info["config"], ignore=()),
        "commit": git_commit(),
        "evaluation": {
            "protocol": cfg.evaluation.model_dump(mode="json"),
            "model": cfg.model.model_dump(mode="json"),
            "dsa_strategy": cfg.distill.dsa_strategy,
            "seeds": eval_seeds(info["seed"], len(result["accuracies"])) if result else [],
            "accuracies": result["accuracies"] if result else [],
            "mean": result["mean"] if result else None,
        },
    }
    norm = synthetic_normalization(seed_dir)
    return {"images": tensors["images"].float(), "labels": tensors["labels"].long(),
            "mean": torch.tensor(norm.mean, dtype=torch.float64), "std": torch.tensor(norm.std, dtype=torch.float64),
            "meta": json.dumps(meta)}  # float64: the recorded statistics exactly


def _load_ddranking(folder: Path) -> dict[str, Any]:
    """A folder export_ddranking wrote, as the pack's dict; DataError naming what is missing."""
    missing = [name for name in ("images.pt", "labels.pt", DDRANKING_META) if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{folder}: no {', '.join(missing)} (a DD-Ranking folder of feddistill export --format ddranking)")
    try:
        saved = json.loads((folder / DDRANKING_META).read_text())
        mean, std = torch.tensor(saved["mean"], dtype=torch.float64), torch.tensor(saved["std"], dtype=torch.float64)
        meta = json.dumps(saved["meta"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise DataError(f"{folder / DDRANKING_META}: not the metadata feddistill export writes") from None
    return {"images": load_torch(folder / "images.pt"), "labels": load_torch(folder / "labels.pt"), "mean": mean,
            "std": std, "meta": meta}


def load_pack(path: Path) -> Pack:
    """The pack at `path` (a file of export_pack or a folder of export_ddranking); DataError naming it when it is
    not one."""
    path = Path(path)
    saved = _load_ddranking(path) if path.is_dir() else load_torch(path)
    if not isinstance(saved, dict) or not {"images", "labels", "mean", "std", "meta"} <= set(saved):
        raise DataError(f"{path}: not a synthetic-set pack (feddistill export writes them)")
    try:
        meta = json.loads(saved["meta"])
    except (TypeError, json.JSONDecodeError):
        raise DataError(f"{path}: its meta is not JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path}: format {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r}")
    if not isinstance(meta.get("config"), dict) or meta.get("config_sha256") != config_hash(meta["config"], ignore=()):
        raise DataError(f"{path}: the config does not match its sha256 (edited?)")
    images, labels = saved["images"], saved["labels"]
    num_classes = KNOWN_NUM_CLASSES.get(meta["config"].get("data", {}).get("name"))
    problem = _tensor_problem(images, labels, saved["mean"], saved["std"], num_classes)
    if problem:
        raise DataError(f"{path}: {problem}")
    try:
        norm = Normalization.from_json({"mean": saved["mean"].tolist(), "std": saved["std"].tolist()})
    except DataError as err:
        raise DataError(f"{path}: {err}") from None
    return Pack(images, labels, norm, meta)


def _tensor_problem(images: object, labels: object, mean: object, std: object, num_classes: int | None) -> str | None:
    """What makes a pack's tensors unusable (None: nothing): shapes, dtypes, label range, non-finite pixels."""
    if not all(isinstance(t, torch.Tensor) for t in (images, labels, mean, std)):
        return "images, labels, mean and std must be tensors"
    if images.dim() != 4 or not images.is_floating_point() or labels.shape != (images.shape[0],):
        return (f"images {tuple(images.shape)} ({images.dtype}) and labels {tuple(labels.shape)} do not pair up as "
                "(N, C, H, W) floats and (N,)")
    if images.shape[0] == 0 or images.shape[2] != images.shape[3] or images.shape[2] < 2:
        return f"images {tuple(images.shape)}: need N >= 1 square images of at least 2x2 pixels"
    if mean.shape != (images.shape[1],) or std.shape != (images.shape[1],):
        return f"mean/std of shapes {tuple(mean.shape)}/{tuple(std.shape)} for images of {images.shape[1]} channels"
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        return f"labels are {labels.dtype}, not integers"
    limit = num_classes if num_classes is not None else images.shape[0]  # each class has at least one image
    if int(labels.min()) < 0 or int(labels.max()) >= limit:
        return f"labels span {int(labels.min())}..{int(labels.max())}, outside 0..{limit - 1}"
    if not torch.isfinite(images).all():
        return "images hold NaN or infinite values"
    return None


def pack_test_set(pack: Pack, data: str | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split of the pack's dataset (from `data`, else its config's data.path / $FEDDISTILL_DATA), normalised
    as the pack's images were, on `device`."""
    cfg = pack.config
    if data:
        cfg = build_config(cfg.model_dump(mode="json"), {"data.path": data})
    test = load_experiment_data(cfg).test
    return to_normalized_tensor(test.images, pack.normalization, device), torch.as_tensor(test.labels, device=device)


def evaluate_pack(
    pack: Pack, test_x: torch.Tensor, test_y: torch.Tensor, device: torch.device | str, epochs: int | None = None,
    nets: int | None = None, arch: str = "convnet", mode: EvaluationMode | None = None,
) -> list[float]:
    """Accuracies of fresh nets trained on the pack: its recorded protocol and seeds unless epochs/nets are given;
    `mode` (evaluation.compile / precision) replaces the recorded one."""
    cfg = pack.config
    eval_cfg = cfg.evaluation.model_copy(update={k: v for k, v in (("epochs", epochs), ("num_nets", nets)) if v})
    if mode is not None:
        eval_cfg = eval_cfg.model_copy(update=mode.updates)
    recorded = pack.meta["evaluation"]["seeds"]
    seeds = recorded if nets is None and recorded else eval_seeds(pack.meta["seed"], eval_cfg.num_nets)
    try:
        model_cfg = parse_architecture(arch, cfg.model)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    num_classes = int(pack.labels.max()) + 1
    return evaluate_synthetic(pack.images, pack.labels, test_x, test_y,
                              NetProtocol(eval_cfg, model_cfg, num_classes, device, cfg.distill.dsa_strategy), seeds)
