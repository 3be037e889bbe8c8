import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import runtime
from common.atomic import load_torch
from common.config import DistillConfig, ExperimentConfig, ModelConfig
from common.data import CIFAR10_NORMALIZATION
from common.models import build_model
from server.distill import norm_backward
from server.distill.artifacts import load_synthetic
from server.distill.methods import SyntheticSet, distill
from server.distill.run import run_distillation

C, SIZE, IPC, PIPC = 3, 16, 2, 4


def data(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    patterns = torch.randn(C, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    y = torch.arange(C).repeat(per_class)
    return patterns[y] + 0.5 * torch.randn(len(y), 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)), y


def experiment(method: str, **overrides: object) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "seed": 3,
            "device": "cpu",
            "data": {"name": "tiny", "tiny_per_class": 10},
            "split": {"pipc": PIPC, "num_clients": 1},
            "model": {"width": 8},
            "distill": {"method": method, "ipc": IPC, "iterations": 3, "checkpoint_every": 2, "batch_real": 4}
            | overrides,
            "evaluation": {"epochs": 2, "num_nets": 2},
        }
    )


@pytest.fixture(scope="module")
def theta_star() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(C, 3, SIZE, 8, 3)


@pytest.mark.parametrize("method", ["random", "dm", "dsv", "dm+dkkt"])
def test_each_method_runs_end_to_end_and_writes_its_artifacts(method, theta_star, tmp_path):
    public_x, public_y = data(PIPC, seed=1)
    test_x, test_y = data(5, seed=2)
    cfg = experiment(method, num_seeds=2)
    result = run_distillation(cfg, theta_star, public_x, public_y, test_x, test_y, tmp_path, CIFAR10_NORMALIZATION)

    assert result["seeds"] == [3, 4] and len(result["accuracies"]) == 4
    assert result["distill_precision"] == "fp32"
    on_disk = json.loads((tmp_path / "result.json").read_text())
    assert on_disk["accuracies"] == result["accuracies"] and on_disk["method"] == method
    for k in range(2):
        seed_dir = tmp_path / f"seed_{k}"
        tensors = load_torch(seed_dir / "synthetic.pt")  # weights_only=True
        assert tensors["images"].shape == (C * IPC, 3, SIZE, SIZE)
        assert tensors["labels"].tolist() == [0, 0, 1, 1, 2, 2]
        assert ("lambdas" in tensors) == (method in ("dsv", "dm+dkkt"))
        assert (seed_dir / "synthetic.png").stat().st_size > 0
        assert (seed_dir / "checkpoint.pt").exists() == (method != "random")
        seed_result = json.loads((seed_dir / "result.json").read_text())
        assert len(seed_result["accuracies"]) == 2 and seed_result["seed"] == 3 + k
        loaded = load_synthetic(seed_dir)
        assert loaded.method == method and loaded.config["distill"]["method"] == method
        if method != "random":  # the history: every logged iteration up to the last, within the run's time
            history = [json.loads(x) for x in (seed_dir / "history.jsonl").read_text().splitlines()]
            assert history[-1]["iteration"] == cfg.distill.iterations
            assert 0 < history[-1]["seconds"] <= seed_result["timings"]["distill_s"] + 1e-3
            assert ("share_dkkt" in history[-1]) == (method == "dm+dkkt")
            from simulations.reports.report import plot_history

            assert plot_history(seed_dir / "history.jsonl", tmp_path / f"{method}-{k}.png").stat().st_size > 0
    assert on_disk["commit"]


@pytest.mark.parametrize(("flags", "ran"), [({"avx512_bf16"}, "bf16"), (set(), "fp32")])
def test_auto_precision_records_what_it_ran_as(flags, ran, theta_star, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
    public_x, public_y = data(PIPC, seed=1)
    test_x, test_y = data(5, seed=2)
    cfg = experiment("dm", precision="auto")
    result = run_distillation(cfg, theta_star, public_x, public_y, test_x, test_y, tmp_path, CIFAR10_NORMALIZATION)
    assert result["config"]["distill"]["precision"] == "auto"
    assert result["distill_precision"] == ran and [r["distill_precision"] for r in result["per_seed"]] == [ran]


def test_random_takes_public_images_and_real_init_starts_from_them():
    public_x, public_y = data(PIPC, seed=1)
    syn = distill(None, public_x, public_y, DistillConfig(method="random", ipc=IPC), ModelConfig(width=8), C, 0, "cpu")
    for img, label in zip(syn.images, syn.labels, strict=True):
        assert (public_x[public_y == label] == img).flatten(1).all(1).any()
    assert syn.lambdas is None


def test_dkkt_methods_need_the_model():
    public_x, public_y = data(PIPC, seed=1)
    for method in ("dsv", "dm+dkkt"):
        with pytest.raises(ValueError, match="needs the trained"):
            distill(None, public_x, public_y, DistillConfig(method=method, ipc=IPC), ModelConfig(width=8), C, 0, "cpu")


def test_dsv_from_noise_without_public_images_reports_metrics(theta_star):
    cfg = DistillConfig(method="dsv", init="noise", ipc=IPC, iterations=4, log_every=2, lambda_lr=0.5)
    empty_x, empty_y = torch.empty(0, 3, SIZE, SIZE), torch.empty(0, dtype=torch.long)
    seen = []

    def record(iteration: int, metrics: dict[str, float], current: SyntheticSet) -> None:
        assert current.images.shape == (C * IPC, 3, SIZE, SIZE) and current.lambdas is not None
        seen.append((iteration, metrics))

    syn = distill(theta_star, empty_x, empty_y, cfg, ModelConfig(width=8), C, 0, "cpu", record)
    assert [i for i, _ in seen] == [2, 4]
    metrics = seen[-1][1]
    assert {"loss", "dkkt", "stat", "primal", "stat_aug", "lambda_mean", "lambda_min", "lambda_zeros"} <= set(metrics)
    assert metrics["lambda_min"] >= 0 and syn.lambdas.min() >= 0 and syn.lambdas.shape == (C * IPC,)
    assert not torch.equal(syn.lambdas, torch.full((C * IPC,), cfg.lambda_init))  # lambda is optimised


def test_distill_is_reproducible_per_seed(theta_star):
    public_x, public_y = data(PIPC, seed=1)
    cfg = DistillConfig(method="dm+dkkt", ipc=IPC, iterations=2, batch_real=4)
    a = distill(theta_star, public_x, public_y, cfg, ModelConfig(width=8), C, 5, "cpu")
    b = distill(theta_star, public_x, public_y, cfg, ModelConfig(width=8), C, 5, "cpu")
    assert torch.equal(a.images, b.images) and torch.equal(a.lambdas, b.lambdas)


def test_the_distillation_core_imports_nothing_from_flwr():
    code = "import sys, server.distill.run; print(any(m.split('.')[0] == 'flwr' for m in sys.modules))"
    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "False"


def test_a_finished_checkpoint_from_another_device_is_evaluated_and_an_unfinished_one_refused(theta_star, tmp_path):
    """A cell distilled on a GPU and finished elsewhere: its final checkpoint needs no random stream any more (so
    any device may evaluate it); an unfinished one cannot continue a CUDA stream on the CPU and says so."""
    from common.atomic import save_torch

    public_x, public_y = data(PIPC, seed=1)
    test_x, test_y = data(5, seed=2)
    cfg = experiment("dm+dkkt", iterations=4)  # checkpoint_every 2: the last checkpoint is the final state
    first = run_distillation(cfg, theta_star, public_x, public_y, test_x, test_y, tmp_path, CIFAR10_NORMALIZATION)
    path = tmp_path / "seed_0" / "checkpoint.pt"
    saved = load_torch(path)
    saved["rng"]["loop"] = torch.zeros(16, dtype=torch.uint8)  # the size of a CUDA generator's state
    save_torch(path, saved)
    for result in tmp_path.rglob("result.json"):
        result.unlink()
    again = run_distillation(cfg, theta_star, public_x, public_y, test_x, test_y, tmp_path, CIFAR10_NORMALIZATION)
    assert again["accuracies"] == first["accuracies"]
    saved["iteration"] = 2  # the same state as an unfinished checkpoint of the same configuration: it must continue
    save_torch(path, saved)
    for result in tmp_path.rglob("result.json"):
        result.unlink()
    (tmp_path / "seed_0" / "synthetic.pt").unlink()
    with pytest.raises(ValueError, match="random stream was drawn on another device type"):
        run_distillation(cfg, theta_star, public_x, public_y, test_x, test_y, tmp_path, CIFAR10_NORMALIZATION)


def test_dm_then_dkkt_runs_dm_alone_first_then_refits_lambda_and_resumes_exactly(theta_star):
    """dkkt_from=0.5: the first half is exactly `dm` (same images, no DKKT metrics), then the DKKT term joins with
    lambda fitted to the images of that moment and takes its share of the gradient; a checkpoint taken before the
    switch continues to the uninterrupted result."""
    public_x, public_y = data(PIPC, seed=1)
    model_cfg = ModelConfig(width=8)
    scheduled = DistillConfig(method="dm+dkkt", ipc=IPC, iterations=4, batch_real=4, log_every=1, checkpoint_every=2,
                              dkkt_from=0.5,
                              lambda_fit_steps=20, lambda_lr=0.1)
    seen: dict[int, tuple[dict[str, float], SyntheticSet]] = {}
    states = []
    syn = distill(theta_star, public_x, public_y, scheduled, model_cfg, C, 5, "cpu",
                  lambda it, metrics, current: seen.__setitem__(it, (metrics, current)), checkpoint=states.append)
    dm_seen = {}
    distill(None, public_x, public_y, DistillConfig(method="dm", ipc=IPC, iterations=2, batch_real=4, log_every=1),
            model_cfg, C, 5, "cpu", lambda it, metrics, current: dm_seen.__setitem__(it, current))
    for it in (1, 2):
        assert "dkkt" not in seen[it][0] and "share_dkkt" not in seen[it][0]
        assert torch.equal(seen[it][1].images, dm_seen[it].images)
        assert torch.equal(seen[it][1].lambdas, torch.full((C * IPC,), scheduled.lambda_init))
    for it in (3, 4):
        assert seen[it][0]["share_dkkt"] > 0.1 and seen[it][0]["dkkt"] > 0
    # Without the refit every lambda would be lambda_init +- lambda_lr (Adam's first step has the size of its lr).
    one_step = (seen[3][1].lambdas - scheduled.lambda_init).abs()
    assert not torch.allclose(one_step, torch.full_like(one_step, scheduled.lambda_lr)) and syn.lambdas.min() >= 0
    resumed = distill(theta_star, public_x, public_y, scheduled, model_cfg, C, 5, "cpu",
                      resume=next(s for s in states if s.iteration == 2))
    assert torch.equal(resumed.images, syn.images) and torch.equal(resumed.lambdas, syn.lambdas)


@pytest.mark.skipif(not shutil.which("g++") and not shutil.which("clang++"), reason="torch.compile on the CPU needs g++")
def test_distill_compile_gives_the_eager_images(theta_star, monkeypatch):
    """distill.compile compiles the DM embedder and the backward of theta*'s instance norms in the DKKT term (it runs
    once per norm layer and chunk, and its own gradient is the double backward): the same images to float rounding."""
    calls = []
    compiled_backward = norm_backward._compiled_backward
    monkeypatch.setattr(norm_backward, "_compiled_backward",
                        lambda device_type: (calls.append(device_type), compiled_backward(device_type))[1])
    public_x, public_y = data(PIPC, seed=1)
    cfg = DistillConfig(method="dm+dkkt", ipc=IPC, iterations=4, batch_real=4, lambda_fit_steps=2)
    eager = distill(theta_star, public_x, public_y, cfg, ModelConfig(width=8), C, 5, "cpu")
    assert not calls
    fast = distill(theta_star, public_x, public_y, cfg.model_copy(update={"compile": True}), ModelConfig(width=8), C, 5,
                   "cpu")
    # iterations x views (plain, augmented) x norm layers x (theta*'s gradient, the primal term's image gradient)
    assert len(calls) == 4 * 2 * 3 * 2
    start = distill(None, public_x, public_y, cfg.model_copy(update={"method": "random"}), ModelConfig(width=8), C, 5,
                    "cpu")
    assert not torch.allclose(eager.images, start.images)  # the iterations moved the images
    torch.testing.assert_close(fast.images, eager.images, rtol=1e-4, atol=1e-5)
