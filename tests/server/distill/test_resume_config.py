"""A distillation folder resumes only the configuration recorded there: by hash, or key by key for older records."""

from __future__ import annotations

import json

import pytest

from common.config import build_config, config_differences, config_hash, config_to_dict, same_configuration
from server.distill.artifacts import check_resumable

RAW = {"data": {"name": "tiny"}, "split": {"pipc": 2}, "model": {"width": 8}, "distill": {"ipc": 1, "method": "dm"}}


def recorded(tmp_path, config: dict, with_hash: bool) -> None:
    meta = {"method": "dm", "seed": 0, "config": config, **({"config_sha256": config_hash(config)} if with_hash else {})}
    (tmp_path / "seed_0").mkdir(parents=True, exist_ok=True)
    (tmp_path / "seed_0" / "checkpoint.json").write_text(json.dumps(meta))


def test_the_same_configuration_resumes_and_neutral_keys_do_not_count(tmp_path):
    cfg = config_to_dict(build_config(RAW))
    recorded(tmp_path, cfg, with_hash=True)
    check_resumable(tmp_path, cfg)
    moved = config_to_dict(build_config(RAW, {"name": "renamed", "output_dir": "/elsewhere", "distill.num_seeds": 3,
                                              "distill.log_every": 1, "distill.checkpoint_every": 7}))
    assert config_hash(moved) == config_hash(cfg)
    check_resumable(tmp_path, moved)


@pytest.mark.parametrize("with_hash", [True, False])
def test_another_configuration_is_refused_naming_each_key(tmp_path, with_hash):
    recorded(tmp_path, config_to_dict(build_config(RAW)), with_hash)
    other = config_to_dict(build_config(RAW, {"distill.lr_img": 0.5, "evaluation.epochs": 3, "seed": 4}))
    with pytest.raises(ValueError) as err:
        check_resumable(tmp_path, other)
    text = str(err.value)
    expected = ("distill.lr_img: 1.0 -> 0.5", "evaluation.epochs: 1000 -> 3", "seed: 0 -> 4")
    assert "\n" not in text and all(k in text for k in expected)


def test_a_record_from_before_a_key_existed_matches_that_key_at_its_default(tmp_path):
    old = config_to_dict(build_config(RAW))
    del old["evaluation"]["precision"]  # a key added since: the old run behaved as its default
    recorded(tmp_path, old, with_hash=False)
    check_resumable(tmp_path, config_to_dict(build_config(RAW)))
    with pytest.raises(ValueError, match="evaluation.precision"):
        check_resumable(tmp_path, config_to_dict(build_config(RAW, {"evaluation.precision": "bf16"})))
    assert same_configuration(old, config_to_dict(build_config(RAW)))
    assert config_differences(old, config_to_dict(build_config(RAW, {"evaluation.precision": "bf16"}))) == [
        'evaluation.precision: "fp32" -> "bf16"']


def test_an_unreadable_record_is_a_one_line_error(tmp_path):
    (tmp_path / "result.json").write_text("{not json")
    with pytest.raises(ValueError, match="result.json: not valid JSON"):
        check_resumable(tmp_path, config_to_dict(build_config(RAW)))


def test_auto_precision_matches_a_run_recorded_in_fp32_or_bf16_and_nothing_else():
    """`auto` runs fp32 or bf16 by the machine (their accuracy agrees): a cell recorded in either is reused or resumed
    under `auto`, and the other way round; fp32 against bf16 still differs."""
    auto = config_to_dict(build_config(RAW, {"distill.precision": "auto"}))
    for concrete in ("fp32", "bf16"):
        recorded_cfg = config_to_dict(build_config(RAW, {"distill.precision": concrete}))
        assert same_configuration(recorded_cfg, auto) and same_configuration(auto, recorded_cfg)
    assert config_differences(config_to_dict(build_config(RAW)), config_to_dict(build_config(
        RAW, {"distill.precision": "bf16"}))) == ['distill.precision: "fp32" -> "bf16"']


def test_a_compiled_run_matches_an_eager_one_either_way():
    """distill.compile gives the same losses to float rounding (test_methods.py pins the images): a cell recorded
    eager is reused or resumed compiled, and the other way round, whatever else differs is still named."""
    eager = config_to_dict(build_config(RAW))
    compiled = config_to_dict(build_config(RAW, {"distill.compile": True}))
    assert same_configuration(eager, compiled) and same_configuration(compiled, eager)
    assert config_differences(eager, config_to_dict(build_config(RAW, {"distill.compile": True, "distill.ipc": 2}))) == [
        f"distill.ipc: {eager['distill']['ipc']} -> 2"]


def test_a_checkpoint_cut_between_its_two_writes_resumes_the_previous_one(tmp_path, monkeypatch):
    """Killed after checkpoint.json and before checkpoint.pt (the window a killed sweep hit): the .pt beside it is the
    previous checkpoint, whose method, seed and config the newer .json names, so the seed resumes from it."""
    import torch

    from server.distill import artifacts
    from server.distill.methods import DistillState

    config = config_to_dict(build_config(RAW))
    meta = {"method": "dm", "seed": 0, "ipc": 1, "config": config}
    labels = torch.arange(2)

    def state(iteration: int) -> DistillState:
        return DistillState(iteration, torch.full((2, 3, 4, 4), float(iteration)), None, {}, None,
                            {"cpu": torch.get_rng_state()})

    artifacts.save_checkpoint(state(1), labels, tmp_path, meta)

    def killed(path, obj):
        raise KeyboardInterrupt  # the process dies before the .pt is replaced

    monkeypatch.setattr(artifacts, "save_torch", killed)
    with pytest.raises(KeyboardInterrupt):
        artifacts.save_checkpoint(state(2), labels, tmp_path, meta)
    assert json.loads((tmp_path / "checkpoint.json").read_text())["iteration"] == 2
    check_resumable(tmp_path, config)
    resumed = artifacts.load_checkpoint(tmp_path, "dm", 0)
    assert resumed.iteration == 1 and torch.equal(resumed.images, state(1).images)
