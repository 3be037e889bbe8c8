"""Every config error is one line that names the key and the allowed range or values."""

from __future__ import annotations

from typing import get_args

import pytest
from pydantic import BaseModel

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
        ({"split.partition": "shards", "split.num_clients": 3, "split.classes_per_client": 2}, "split.classes_per_client",
         ">= the number of classes"),
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


def test_numbers_written_the_way_people_write_them_are_read_as_floats(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("federation:\n  lr: 1e-3\n  dp_delta: 1E-6\ndistill:\n  lambda_lr: +2.5e-2\n")
    cfg = load_config(str(path), parse_overrides(["evaluation.lr=5e-3", "distill.lr_img=1e1"]))
    assert (cfg.federation.lr, cfg.federation.dp_delta, cfg.distill.lambda_lr) == (1e-3, 1e-6, 2.5e-2)
    assert (cfg.evaluation.lr, cfg.distill.lr_img) == (5e-3, 10.0)
    with pytest.raises(ConfigError, match="federation.rounds='1e1'"):  # integers stay strict
        build_config({}, {"federation.rounds": "1e1"})


def _float_keys() -> list[str]:
    """Every float key of the config, dotted."""
    from common.config import ExperimentConfig

    keys = []
    for section, field in ExperimentConfig.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            keys += [f"{section}.{k}" for k, f in model.model_fields.items()
                     if f.annotation is float or float in get_args(f.annotation)]
    assert len(keys) > 20
    return keys


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_every_float_key_rejects_non_finite_values(key, value):
    with pytest.raises(ConfigError) as info:
        build_config({}, parse_overrides([f"{key}={value}"]))
    assert str(info.value).startswith(f"{key}=") and "finite" in str(info.value)


@pytest.mark.parametrize("key, value, hint", [
    ("seed", -1, "greater than or equal to 0"),
    ("seed", 2**32, "less than 4294967296"),
    ("split.seed", 2**40, "less than 4294967296"),
])
def test_seeds_outside_numpys_range_are_named(key, value, hint):
    with pytest.raises(ConfigError, match=f"^{key}={value}: .*{hint}"):
        build_config({}, {key: value})


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", "", "x" * 101, "tab\tname"])
def test_a_name_must_be_one_safe_folder_name(name):
    with pytest.raises(ConfigError, match="name=.*it names the run folder"):
        build_config({}, {"name": name})


def test_a_config_path_never_falls_back_to_the_bundled_config_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for value in (str(tmp_path / "quickstart.yaml"), "missing/quickstart", "quickstart.yaml", "quickstart.yml"):
        with pytest.raises(ConfigError, match=r"no such file$"):
            load_config(value)
    (tmp_path / "dir.yaml").mkdir()
    for value in ("dir.yaml", str(tmp_path)):
        with pytest.raises(ConfigError, match="not a file"):
            load_config(value)
    assert load_config("quickstart").name == "quickstart"


def test_an_unreadable_config_file_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(path)


def test_an_override_that_is_not_yaml_names_its_key():
    with pytest.raises(ConfigError, match="^override federation.lr: '\\[1' is not a YAML value"):
        parse_overrides(["federation.lr=[1"])
