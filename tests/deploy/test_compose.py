"""docker-compose.yml (no Docker engine here) is checked against the commands the native test runs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from deploy.deployment import (
    Tls,
    Topology,
    clientapp_superexec_args,
    serverapp_superexec_args,
    superlink_args,
    supernode_args,
)

ROOT = Path(__file__).resolve().parents[2]
NODES = 3
COMPOSE_TOPOLOGY = Topology(
    superlink_host="superlink",
    superlink_port=8000,
    supernode_ports=(9094, 9095, 9096),
    bind_host="0.0.0.0",
    supernode_hosts=tuple(f"supernode-{k + 1}" for k in range(NODES)),
)


def _compose(*files: str) -> dict:
    """The services after merging override files the way `docker compose -f a -f b` does for these keys."""
    services: dict = {}
    for name in files:
        doc = yaml.safe_load((ROOT / name).read_text())
        for service, spec in doc["services"].items():
            services.setdefault(service, {}).update(spec)
    return services


@pytest.fixture(scope="module")
def services() -> dict:
    return _compose("docker-compose.yml")


def test_services_are_one_superlink_three_supernodes_and_their_superexecs(services):
    expected = {"superlink", "superexec-serverapp"} | {
        f"{kind}-{k + 1}" for kind in ("supernode", "superexec-clientapp") for k in range(NODES)
    }
    assert set(services) == expected


def test_commands_match_the_native_topology(services):
    t = COMPOSE_TOPOLOGY
    assert services["superlink"]["command"] == superlink_args(t)[1:]
    assert services["superexec-serverapp"]["command"] == serverapp_superexec_args(t)[1:]
    for k in range(NODES):
        assert services[f"supernode-{k + 1}"]["command"] == supernode_args(t, k)[1:]
        assert services[f"superexec-clientapp-{k + 1}"]["command"] == clientapp_superexec_args(t, k)[1:]


def test_tls_override_matches_the_native_tls_topology():
    services = _compose("docker-compose.yml", "docker-compose.tls.yml")
    t = Topology(**{**COMPOSE_TOPOLOGY.__dict__, "tls": Tls(Path("/app/certificates"))})
    assert services["superlink"]["command"] == superlink_args(t)[1:]
    assert "--enable-supernode-auth" in services["superlink"]["command"]
    assert services["superexec-serverapp"]["command"] == serverapp_superexec_args(t)[1:]
    for k in range(NODES):
        assert services[f"supernode-{k + 1}"]["command"] == supernode_args(t, k)[1:]
        assert "./deploy/certs:/app/certificates:ro" in services[f"supernode-{k + 1}"]["volumes"]
    assert "./deploy/certs:/app/certificates:ro" in services["superexec-serverapp"]["volumes"]


def test_images_ports_and_flower_version_agree(services):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flwr_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("flwr["))
    version = re.search(r">=\s*([\d.]+)", flwr_pin)[1]
    assert services["superlink"]["image"] == "flwr/superlink:${FLWR_VERSION:-1.42.0}"
    assert version.startswith("1.42")
    assert services["superlink"]["ports"] == ["8000:8000"]
    for k in range(NODES):
        assert services[f"supernode-{k + 1}"]["image"].startswith("flwr/supernode:")
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "FROM flwr/superexec:${FLWR_VERSION}" in dockerfile and "ARG FLWR_VERSION=1.42.0" in dockerfile


def test_every_app_process_sees_the_data_and_the_server_writes_results(services):
    superexecs = ["superexec-serverapp"] + [f"superexec-clientapp-{k + 1}" for k in range(NODES)]
    for name in superexecs:
        spec = services[name]
        data_mount = next(v for v in spec["volumes"] if v.endswith(":/data:ro"))
        assert data_mount.startswith("${FEDDISTILL_DATA_DIR:-./data}")
        assert spec["environment"]["FEDDISTILL_DATA"].startswith("/data/")
        assert spec["build"]["dockerfile"] == "deploy/Dockerfile"
    server = services["superexec-serverapp"]
    results = server["environment"]["FEDDISTILL_OUTPUT"]
    assert any(v.endswith(f":{results}") for v in server["volumes"])
    for k in range(NODES):  # edge devices never get the results volume
        assert not any("results" in v for v in services[f"superexec-clientapp-{k + 1}"]["volumes"])


def test_gpu_reservation_is_an_optional_override(services):
    assert "deploy" not in services["superexec-serverapp"]
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]["superexec-serverapp"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_shipped_flower_config_declares_the_compose_connections():
    config = tomllib.loads((ROOT / "deploy" / "flwr-home" / "config.toml").read_text())["superlink"]
    assert config["compose"] == {"address": "127.0.0.1:8000", "insecure": True}
    assert config["compose-tls"]["root-certificates"].endswith("deploy/certs/ca.crt")
    assert config["local"]["address"] == ":local:"
