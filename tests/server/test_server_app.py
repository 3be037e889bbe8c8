"""How the ServerApp turns a run config into an experiment config and a run folder."""

from __future__ import annotations

import pytest

from common.config import ConfigError, load_config
from server.federation import resolve_run_dir
from server.server_app import config_from_run_config


def test_run_config_names_a_yaml_and_overrides_it():
    cfg = config_from_run_config({"config": "quickstart", "overrides": "federation.rounds=5 model.width=32"})
    assert cfg.federation.rounds == 5 and cfg.model.width == 32 and cfg.name == "quickstart"


def test_dotted_run_config_keys_override_unless_they_hold_the_keep_value():
    cfg = config_from_run_config({"federation.rounds": 7, "split.num_clients": 0, "data.path": ""})
    base = load_config("quickstart")
    assert cfg.federation.rounds == 7 and cfg.split.num_clients == base.split.num_clients
    assert cfg.data.path == base.data.path


def test_a_bad_override_names_the_key():
    with pytest.raises(ConfigError, match="federation.lr"):
        config_from_run_config({"overrides": "federation.lr=-1"})


def test_run_folders_are_absolute_and_new(tmp_path, monkeypatch):
    cfg = load_config("quickstart")
    first = resolve_run_dir(cfg, tmp_path)
    first.mkdir()
    second = resolve_run_dir(cfg, tmp_path)
    assert first.is_absolute() and first.parent == tmp_path and first.name.startswith("quickstart-")
    assert second != first
    monkeypatch.chdir(tmp_path)
    assert resolve_run_dir(cfg, "relative").parent == tmp_path / "relative"
    with pytest.raises(ConfigError, match="run-dir"):
        resolve_run_dir(cfg, run_dir="not/absolute")


def test_an_unclosed_quote_in_the_run_configs_overrides_names_the_key():
    with pytest.raises(ConfigError, match="^run config overrides='name=\"x': No closing quotation"):
        config_from_run_config({"overrides": 'name="x'})


def test_a_bad_dsa_strategy_fails_before_the_first_round(tmp_path):
    from server.federation import run_federation

    cfg = load_config("quickstart", {"distill.dsa_strategy": "colour_crop"})
    with pytest.raises(ConfigError, match=r"^distill.dsa_strategy: unknown transform\(s\) \['colour'\]"):
        run_federation(None, cfg, tmp_path / "run")  # the grid is never reached
    assert not (tmp_path / "run").exists()
