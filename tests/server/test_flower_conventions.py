"""Flower's conventions, checked by Flower itself: the app builds into a FAB with flwr 1.42's own checks (publisher,
version, license file, target version), and the SuperLink connections `flwr run . <superlink>` takes are where flwr
1.42 reads them ($FLWR_HOME/config.toml), not in pyproject.toml (where `flwr run` would migrate them and rewrite the
file)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
FLWR = Path(sys.executable).with_name("flwr")

pytestmark = pytest.mark.skipif(not FLWR.exists(), reason="the flwr CLI is not installed beside this Python")


def flwr(args: list[str], cwd: Path, flwr_home: Path) -> str:
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "COLUMNS": "200"}
    done = subprocess.run([str(FLWR), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout + done.stderr


def test_pyproject_declares_the_app_as_flower_examples_do_and_no_legacy_federations():
    config = tomllib.loads((PROJECT / "pyproject.toml").read_text())
    app = config["tool"]["flwr"]["app"]
    assert app["publisher"] and app["fab-format-version"] == 1 and app["flwr-version-target"] == "1.42.0"
    assert set(app["components"]) == {"serverapp", "clientapp"}
    assert config["project"]["version"] and config["project"]["license"] == {"file": "LICENSE"}
    assert (PROJECT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert "federations" not in config["tool"]["flwr"]  # flwr 1.42 would migrate it and rewrite pyproject.toml


def test_flwr_build_accepts_the_app_and_leaves_pyproject_unchanged(tmp_path):
    before = (PROJECT / "pyproject.toml").read_bytes()
    output = flwr(["build", "--app", str(PROJECT)], cwd=tmp_path, flwr_home=tmp_path / "flwr-home")
    (fab,) = tmp_path.glob("*.fab")
    assert fab.name.startswith("feddistill.feddistill.0-1-0."), output
    assert fab.stat().st_size < 10 * 2**20  # flwr's FAB_MAX_SIZE
    assert "warning" not in output.lower(), output
    assert (PROJECT / "pyproject.toml").read_bytes() == before


def test_superlink_connections_are_those_flwr_lists(tmp_path):
    fresh = flwr(["config", "list"], cwd=tmp_path, flwr_home=tmp_path / "fresh")
    assert re.search(r"^\s*local \(default\)\s*$", fresh, flags=re.MULTILINE), fresh  # `flwr run .` and `flwr run . local`
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copy(PROJECT / "deploy" / "flwr-home" / "config.toml", shipped / "config.toml")
    listed = flwr(["config", "list"], cwd=tmp_path, flwr_home=shipped)
    names = re.findall(r"^\s{2}(\S+)", listed.split("SuperLink connections:", 1)[1], flags=re.MULTILINE)
    assert names == ["local", "compose", "compose-tls"], listed  # `flwr run . compose` with FLWR_HOME=deploy/flwr-home
