"""Any ImageFolder works end to end (issue 15, item 9): a Fashion-MNIST-like grey 28x28 set with 3 classes and a
colour 32x32 set with 4 classes are distilled (DM + Deep KKT), evaluated, exported and re-evaluated with their own
channels, image size, classes and normalisation."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.atomic import load_torch, save_torch
from common.config import load_config, parse_overrides
from common.data import CIFAR10_NORMALIZATION, Normalization, load_imagefolder
from common.models import model_from_config
from simulations.cli import main as cli_main
from simulations.commands.synthetic_pack import load_pack


def write_imagefolder(path: Path, classes: int, size: int, channels: int, train: int = 6, test: int = 2) -> Path:
    """A learnable ImageFolder archive: class c is a stripe pattern of its own orientation (and tint), plus noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    with tarfile.open(path, "w:gz") as tar:
        for split, count in (("train", train), ("test", test)):
            for c in range(classes):
                for i in range(count):
                    stripes = 120 + 80 * np.sin((xx * np.cos(c) + yy * np.sin(c)) * 0.7)
                    tint = np.array([1.0, 0.6 + 0.1 * c, 0.3 + 0.2 * c])[:channels]
                    pixels = stripes[..., None] * tint + rng.normal(0, 15, (size, size, channels))
                    image = np.clip(pixels, 0, 255).astype(np.uint8)
                    buffer = io.BytesIO()
                    Image.fromarray(image[..., 0] if channels == 1 else image).save(buffer, format="PNG")
                    info = tarfile.TarInfo(f"set/{split}/class{c}/{i:03d}.png")
                    info.size = buffer.tell()
                    buffer.seek(0)
                    tar.addfile(info, buffer)
    return path


@pytest.mark.parametrize(("classes", "size", "channels"), [(3, 28, 1), (4, 32, 3)], ids=["grey-28px-3", "colour-32px-4"])
def test_an_imagefolder_is_distilled_evaluated_and_exported_with_its_own_shape(classes, size, channels, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv("FEDDISTILL_CACHE", str(tmp_path / "cache"))
    archive = write_imagefolder(tmp_path / "set.tar.gz", classes, size, channels)
    overrides = ["device=cpu", "data.name=imagefolder", f"data.path={archive}", "data.train_per_class=null",
                 "data.test_per_class=null", "model.width=8", "split.pipc=4", "split.num_clients=1",
                 "distill.method=dm+dkkt", "distill.ipc=1", "distill.iterations=2", "distill.batch_real=4",
                 "distill.lambda_fit_steps=2", "evaluation.epochs=2", "evaluation.num_nets=1"]
    cfg = load_config("quickstart", parse_overrides(overrides))
    model_path = tmp_path / "received_model.pt"  # ConvNet-3 (depth 3) on the set's images: 28 px pools to 3
    save_torch(model_path, model_from_config(cfg.model, classes, channels, size).state_dict())

    out = tmp_path / "run"
    assert cli_main(["distill", "--config", "quickstart", "--model", str(model_path), "--out", str(out), *overrides]) == 0

    seed_dir = out / "seed_0"
    synthetic = load_torch(seed_dir / "synthetic.pt")
    assert synthetic["images"].shape == (classes, channels, size, size)
    with Image.open(seed_dir / "synthetic.png") as grid:
        assert grid.mode == ("L" if channels == 1 else "RGB")
    result = json.loads((out / "result.json").read_text())
    assert result["accuracies"] and all(math.isfinite(a) for a in result["accuracies"])
    own = Normalization.of(load_imagefolder(archive).train.images)
    recorded = Normalization.from_json(json.loads((seed_dir / "synthetic.json").read_text())["normalization"])
    assert recorded == own and own.channels == channels and own != CIFAR10_NORMALIZATION

    assert cli_main(["export", str(out), "--out", str(tmp_path / "pack.pt")]) == 0
    pack = load_pack(tmp_path / "pack.pt")
    assert pack.normalization == own and pack.images.shape[1] == channels
    report = tmp_path / "eval.json"
    assert cli_main(["evaluate", str(tmp_path / "pack.pt"), "--device", "cpu", "--json", str(report)]) == 0
    (row,) = json.loads(report.read_text())["results"]
    assert row["accuracies"] == pytest.approx(result["accuracies"], abs=1e-6)  # the test split normalised as the pack
    torch.testing.assert_close(synthetic["images"], pack.images)
