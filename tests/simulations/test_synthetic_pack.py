"""Shareable synthetic sets: export -> evaluate in another process reproduces the run's accuracy; other
architectures train on the same pack; a damaged pack is a one-line error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.atomic import load_torch, save_torch
from common.config import ModelConfig
from common.models import parse_architecture
from simulations.benchmarks.eval_modes import main as eval_modes_main
from simulations.cli import main as cli_main
from simulations.commands.synthetic_pack import load_pack

ROOT = Path(__file__).resolve().parents[2]
TINY = ["device=cpu", "data.name=tiny", "data.train_per_class=null", "data.test_per_class=null", "model.width=8",
        "split.pipc=4", "distill.method=dm", "distill.ipc=2", "distill.iterations=5", "distill.batch_real=4",
        "evaluation.epochs=4", "evaluation.num_nets=2"]


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pack")
    assert cli_main(["distill", "--config", "quickstart", "--out", str(root / "run"), *TINY]) == 0
    assert cli_main(["export", str(root / "run"), "--out", str(root / "dm.pt")]) == 0
    return root / "dm.pt"


def test_the_pack_holds_what_reuse_needs(pack):
    loaded = load_pack(pack)
    run = json.loads((pack.parent / "run" / "seed_0" / "result.json").read_text())
    assert loaded.images.shape == (20, 3, 32, 32) and loaded.labels.bincount().tolist() == [2] * 10
    meta = loaded.meta
    assert meta["method"] == "dm" and meta["ipc"] == 2 and len(meta["config_sha256"]) == 64 and meta["commit"]
    assert meta["evaluation"]["accuracies"] == run["accuracies"] and meta["evaluation"]["seeds"] == [0, 1]
    raw = load_torch(pack)
    assert raw["mean"].shape == (3,) and raw["std"].shape == (3,)


def test_evaluate_in_another_process_reproduces_the_recorded_accuracy(pack, tmp_path):
    out = tmp_path / "eval.json"
    subprocess.run([sys.executable, "-m", "simulations.cli", "evaluate", str(pack), "--device", "cpu", "--json", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    (row,) = json.loads(out.read_text())["results"]
    assert row["accuracies"] == pytest.approx(load_pack(pack).meta["evaluation"]["accuracies"], abs=1e-6)


def test_a_ddranking_export_is_what_dd_rankings_evaluator_loads_and_evaluate_reads_it_back(pack, tmp_path, capsys):
    folder = tmp_path / "dm" / "CIFAR10" / "IPC2"
    assert cli_main(["export", str(pack.parent / "run"), "--format", "ddranking", "--out", str(folder)]) == 0
    images = torch.load(folder / "images.pt", map_location="cpu")  # as DD-Ranking's demo_hard.py loads it
    labels = torch.load(folder / "labels.pt", map_location="cpu")
    assert isinstance(images, torch.Tensor) and images.shape == (20, 3, 32, 32) and images.dtype == torch.float32
    assert labels.tolist() == [c for c in range(10) for _ in range(2)]  # class-major: DD-Ranking's default labels
    original = load_pack(pack)
    assert float(torch.load(folder / "lr.pt")) == pytest.approx(original.meta["evaluation"]["protocol"]["lr"])
    assert torch.equal(images, original.images[torch.argsort(original.labels, stable=True)])

    out = tmp_path / "eval.json"
    assert cli_main(["evaluate", str(folder), "--device", "cpu", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["accuracies"] == pytest.approx(original.meta["evaluation"]["accuracies"], abs=1e-6)
    read_back = load_pack(folder).meta
    assert read_back.pop("commit") and original.meta["commit"]  # each export reads the commit at its own time
    assert read_back == {k: v for k, v in original.meta.items() if k != "commit"}

    (folder / "meta.json").unlink()
    capsys.readouterr()
    assert cli_main(["evaluate", str(folder)]) == 2
    assert "no meta.json" in capsys.readouterr().out


def test_other_architectures_and_protocols_train_on_the_pack(pack, tmp_path):
    out = tmp_path / "cross.json"
    assert cli_main(["evaluate", str(pack), "--device", "cpu", "--epochs", "2", "--nets", "1", "--json", str(out),
                     "--arch", "convnet:norm=batchnorm", "convnet:width=16,depth=2", "resnet18"]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["arch"] for r in rows] == ["convnet:norm=batchnorm", "convnet:width=16,depth=2", "resnet18"]
    assert all(len(r["accuracies"]) == 1 and 0 <= r["mean"] <= 1 for r in rows)


def test_architecture_specs_and_damaged_packs_give_one_line_errors(pack, tmp_path, capsys):
    assert parse_architecture("resnet18", ModelConfig()).arch == "resnet18"
    with pytest.raises(ValueError, match="--arch 'convnet:colour=red'"):
        parse_architecture("convnet:colour=red", ModelConfig())
    damaged = load_torch(pack)
    meta = json.loads(damaged["meta"])
    meta["config"]["distill"]["ipc"] = 3
    damaged["meta"] = json.dumps(meta)
    save_torch(tmp_path / "edited.pt", damaged)
    assert cli_main(["evaluate", str(tmp_path / "edited.pt")]) == 2
    assert "does not match its sha256" in capsys.readouterr().out
    save_torch(tmp_path / "other.pt", {"weights": torch.zeros(2)})
    assert cli_main(["evaluate", str(tmp_path / "other.pt")]) == 2
    assert "not a synthetic-set pack" in capsys.readouterr().out


def test_evaluate_in_another_mode(pack, tmp_path):
    out = tmp_path / "bf16.json"
    assert cli_main(["evaluate", str(pack), "--device", "cpu", "--mode", "bf16", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert report["mode"] == "bf16" and len(row["accuracies"]) == 2 and 0 <= row["mean"] <= 1


def test_eval_modes_compares_each_mode_with_fp32_and_resumes(pack, tmp_path, capsys):
    run_dir = pack.parent / "run"
    out = tmp_path / "modes.json"
    assert eval_modes_main([str(run_dir), "--modes", "fp32,bf16", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    fp32, bf16 = report["runs"]
    recorded = load_pack(pack).meta["evaluation"]["accuracies"]
    assert (fp32["mode"], bf16["mode"]) == ("fp32", "bf16") and fp32["recorded"] == recorded
    assert fp32["accuracies"] == pytest.approx(recorded, abs=1e-6)  # fp32 is the recorded protocol
    assert bf16["seconds_per_net"] > 0 and set(report["warmup_s"]) == {"fp32, 20 images", "bf16, 20 images"}
    table = out.with_suffix(".md").read_text()
    assert "| 2 | fp32 | 2 |" in table and "| 2 | bf16 | 2 |" in table and "fp32 here" in table
    capsys.readouterr()
    assert eval_modes_main([str(run_dir), "--modes", "fp32,bf16", "--out", str(out)]) == 0  # all done: nothing reruns
    assert "s/net" not in capsys.readouterr().out and len(json.loads(out.read_text())["runs"]) == 2


def test_an_unknown_mode_is_a_one_line_error(pack, capsys):
    assert cli_main(["evaluate", str(pack), "--mode", "fp16"]) == 2
    out = capsys.readouterr().out.strip()
    assert out.startswith("error: evaluation mode 'fp16'") and "compile+bf16" in out and "\n" not in out


def _damaged(pack: Path, tmp_path: Path, name: str, **changes) -> Path:
    saved = load_torch(pack)
    saved.update(changes)
    return save_torch(tmp_path / f"{name}.pt", saved)


MALFORMED = [
    ("NaN images", lambda s: {"images": torch.full_like(s["images"], float("nan"))}, "images hold NaN or infinite values"),
    ("std 0", lambda s: {"std": torch.zeros_like(s["std"])}, "has an entry <= 0"),
    ("a label near 10^8", lambda s: {"labels": torch.full_like(s["labels"], 99_999_999)},
     "labels span 99999999..99999999, outside 0..9"),
    ("a negative label", lambda s: {"labels": -s["labels"] - 1}, "outside 0..9"),
    ("float labels", lambda s: {"labels": s["labels"].float()}, "not integers"),
    ("1-pixel images", lambda s: {"images": s["images"][:, :, :1, :1].contiguous()}, "at least 2x2 pixels"),
    ("images that are not a tensor", lambda s: {"images": [1, 2, 3]}, "must be tensors"),
    ("meta that is a list", lambda s: {"meta": "[1, 2]"}, "format None"),
]


@pytest.mark.reliability
@pytest.mark.parametrize("kind, change, words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_pack_is_a_one_line_error_before_any_training(kind, change, words, pack, tmp_path, capsys, reliability):
    damaged = _damaged(pack, tmp_path, "damaged", **change(load_torch(pack)))
    capsys.readouterr()
    assert cli_main(["evaluate", str(damaged)]) == 2
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert len(lines) == 1 and words in lines[0], lines
    reliability("Loading safety", f"`feddistill evaluate` of a pack with {kind}", f"exit 2: `{lines[0]}`")
