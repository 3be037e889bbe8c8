"""Every config error is one line that names the key and the allowed range or values."""

from __future__ import annotations

import pytest

from common.config import ConfigError, build_config, load_config, parse_overrides


@pytest.mark.parametrize(
    ("overrides", "key", "hint"),
    [
        ({"split.piipc": 3}, "split.piipc", "did you mean 'pipc'"),
        ({"federation.roundz": 3}, "federation.roundz", "allowed: rounds"),
        ({"sweep": {"a": 1}}, "sweep", "unknown key"),
        ({"split.num_clients": "three"}, "split.num_clients", "valid integer"),
        ({"federation.rounds": 2.5}, "federation.rounds", "valid integer"),
        ({"data.download": "yes"}, "data.download", "valid boolean"),
        ({"split.pipc": 6000}, "split.pipc", "between 0 and 5000"),
        ({"split.pipc": -1}, "split.pipc", "greater than or equal to 0"),
        ({"split.alpha": 0.0}, "split.alpha", "greater than 0"),
        ({"split.num_clients": 0}, "split.num_clients", "greater than or equal to 1"),
        ({"split.partition": "label-skew"}, "split.partition", "'iid', 'dirichlet' or 'shards'"),
        ({"distill.ipc": 60, "split.pipc": 50}, "distill.ipc", "must be <= split.pipc=50"),
        ({"distill.method": "dc"}, "distill.method", "'random', 'dm', 'dsv' or 'dm+dkkt'"),
        ({"split.pipc": 0}, "split.pipc=0", "needs public images"),
        ({"split.public_ratio": 0.1}, "split.pipc", "exclusive"),
        ({"split.public_ratio": 1.5, "split.pipc": None}, "split.public_ratio", "less than 1"),
        ({"federation.min_clients": 5, "split.num_clients": 3}, "federation.min_clients", "<= split.num_clients=3"),
        ({"data.train_per_class": 10, "split.pipc": 5, "split.num_clients": 100}, "split.num_clients", "<= 50"),
        ({"split.partition": "shards", "split.num_clients": 3, "split.classes_per_client": 2}, "split.classes_per_client", ">= the number of classes"),
        ({"evaluation.epochs": 0}, "evaluation.epochs", "greater than or equal to 1"),
        ({"federation.lr": -0.1}, "federation.lr", "greater than 0"),
    ],
)
def test_bad_value_names_key_and_range(overrides, key, hint):
    with pytest.raises(ConfigError) as info:
        build_config({}, overrides)
    message = str(info.value)
    assert "\n" not in message
    assert key in message
    assert hint in message


def test_defaults_are_valid_and_overrides_apply():
    cfg = build_config({"split": {"pipc": 20}}, {"federation.rounds": 7, "distill.ipc": 10})
    assert cfg.split.pipc == 20 and cfg.federation.rounds == 7 and cfg.distill.ipc == 10


def test_public_ratio_turns_into_images_per_class():
    from common.config import public_per_class

    cfg = build_config({}, {"split.pipc": None, "split.public_ratio": 0.01})
    assert public_per_class(cfg.split, 5000) == 50


def test_cli_overrides_parse_as_yaml_values():
    assert parse_overrides(["a.b=3", "c=0.5", "d=true", "e=text", "f=null"]) == {
        "a.b": 3, "c": 0.5, "d": True, "e": "text", "f": None,
    }
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        parse_overrides(["rounds"])


def test_shipped_configs_load():
    from common.config import CONFIG_DIR

    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert "quickstart" in names
    for name in names:
        load_config(name)


def test_unknown_config_name_lists_the_available_ones(tmp_path):
    with pytest.raises(ConfigError, match="available: .*quickstart"):
        load_config("no-such-config")
    bad = tmp_path / "bad.yaml"
    bad.write_text("split: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_all_images_public_is_allowed_for_distillation_only():
    cfg = build_config({}, {"split.pipc": 5000, "distill.method": "dm", "distill.ipc": 10})
    assert cfg.split.pipc == 5000
