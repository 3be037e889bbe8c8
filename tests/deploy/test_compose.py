"""docker-compose.yml, statically: the same commands as the native topology (deploy/deployment.py) and per-node
volumes. tests/deploy/test_compose_up.py brings it up on a real Docker engine."""

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
    data_path="/data/client-{k}.tar.gz",
)
NODES_DIR = "${FEDDISTILL_NODES_DIR:-./nodes}"


def _volume(volume: str) -> tuple[str, str, str]:
    """(host path, container path, mode) of a short-syntax volume whose host path may hold ${VAR:-default}."""
    source, target, mode = re.fullmatch(r"((?:\$\{[^}]*\}|[^:$])+):([^:]+)(?::(ro|rw))?", volume).groups()
    return source, target, mode or "rw"


def _compose(*files: str) -> dict:
    """The services after merging override files the way `docker compose -f a -f b` does for these keys: a later
    file's keys replace earlier ones, except volumes, which are merged by their path in the container."""
    services: dict = {}
    for name in files:
        doc = yaml.safe_load((ROOT / name).read_text())
        for service, spec in doc["services"].items():
            merged = services.setdefault(service, {})
            volumes = {_volume(v)[1]: v for v in merged.get("volumes", []) + spec.get("volumes", [])}
            merged.update(spec)
            if volumes:
                merged["volumes"] = list(volumes.values())
    return services


def _argv(spec: dict) -> list[str]:
    """What the container runs: its entrypoint (the service's own, else deploy/Dockerfile's) and command."""
    return spec.get("entrypoint", ["flower-superexec"]) + spec["command"]


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
    assert _argv(services["superlink"]) == superlink_args(t)
    assert _argv(services["superexec-serverapp"]) == serverapp_superexec_args(t)
    for k in range(NODES):
        assert _argv(services[f"supernode-{k + 1}"]) == supernode_args(t, k)
        assert _argv(services[f"superexec-clientapp-{k + 1}"]) == clientapp_superexec_args(t, k)
    assert 'ENTRYPOINT ["flower-superexec"]' in (ROOT / "deploy" / "Dockerfile").read_text()


def test_tls_override_matches_the_native_tls_topology():
    services = _compose("docker-compose.yml", "docker-compose.tls.yml")
    t = Topology(**{**COMPOSE_TOPOLOGY.__dict__, "tls": Tls(Path("/app/certificates"))})
    assert _argv(services["superlink"]) == superlink_args(t)
    assert "--enable-supernode-auth" in services["superlink"]["command"]
    assert _argv(services["superexec-serverapp"]) == serverapp_superexec_args(t)
    for k in range(NODES):
        assert _argv(services[f"supernode-{k + 1}"]) == supernode_args(t, k)
    server_volumes = services["superexec-serverapp"]["volumes"]
    assert _data_mounts({"volumes": server_volumes}) == _data_mounts(_compose("docker-compose.yml")["superexec-serverapp"])


def _certificate_mounts(spec: dict) -> dict[str, str]:
    """Container path -> host path of the service's read-only mounts under /app/certificates."""
    mounts = {}
    for volume in spec.get("volumes", []):
        source, target, mode = _volume(volume)
        if target.startswith("/app/certificates"):
            assert mode == "ro", volume
            mounts[target] = source
    return mounts


def test_tls_each_service_mounts_only_the_keys_it_uses():
    services = _compose("docker-compose.yml", "docker-compose.tls.yml")
    certs = "${FEDDISTILL_CERTS_DIR:-./deploy/certs}"
    ca = {"/app/certificates/ca.crt": f"{certs}/ca.crt"}
    assert _certificate_mounts(services["superlink"]) == ca | {
        f"/app/certificates/{f}": f"{certs}/{f}" for f in ("server.pem", "server.key")}
    assert _certificate_mounts(services["superexec-serverapp"]) == ca
    for k in range(NODES):
        own = f"keys/node{k + 1}"
        assert _certificate_mounts(services[f"supernode-{k + 1}"]) == ca | {f"/app/certificates/{own}": f"{certs}/{own}"}
        assert _certificate_mounts(services[f"superexec-clientapp-{k + 1}"]) == {}
    # every path a command names under /app/certificates is mounted into that service
    for name, spec in services.items():
        named = {a for a in spec.get("command", []) if a.startswith("/app/certificates/")}
        assert named <= set(_certificate_mounts(spec)), name


def test_images_ports_and_flower_version_agree(services):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flwr_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("flwr["))
    version = re.search(r">=\s*([\d.]+)", flwr_pin)[1]
    assert version.startswith("1.42")
    # Flower's official images by default; each overridable (e.g. by deploy/local-flwr-image.sh's stand-in).
    assert services["superlink"]["image"] == "${FEDDISTILL_SUPERLINK_IMAGE:-flwr/superlink}:${FLWR_VERSION:-1.42.0}"
    for k in range(NODES):
        assert services[f"supernode-{k + 1}"]["image"] == \
            "${FEDDISTILL_SUPERNODE_IMAGE:-flwr/supernode}:${FLWR_VERSION:-1.42.0}"
    for name in ["superexec-serverapp"] + [f"superexec-clientapp-{k + 1}" for k in range(NODES)]:
        assert services[name]["build"]["args"] == {
            "SUPEREXEC_IMAGE": "${FEDDISTILL_SUPEREXEC_IMAGE:-flwr/superexec}", "FLWR_VERSION": "${FLWR_VERSION:-1.42.0}"}
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "FROM ${SUPEREXEC_IMAGE}:${FLWR_VERSION}" in dockerfile
    assert "ARG SUPEREXEC_IMAGE=flwr/superexec" in dockerfile and "ARG FLWR_VERSION=1.42.0" in dockerfile
    assert services["superlink"]["ports"] == ["${FEDDISTILL_SUPERLINK_PORT:-8000}:8000"]


def _data_mounts(spec: dict) -> dict[str, str]:
    """{path in the container: host path} of a service's mounts under /data."""
    mounts = {}
    for volume in spec.get("volumes", []):
        source, target, mode = _volume(volume)
        if target.startswith("/data"):
            assert mode == "ro", f"{volume}: data is mounted read-only"
            mounts[target] = source
    return mounts


def test_each_edge_container_mounts_only_its_own_archive(services):
    for k in range(NODES):
        archive = COMPOSE_TOPOLOGY.data_path.format(k=k)
        # the SuperNode passes data-path in its node config; the SuperExec beside it runs the ClientApp that opens it
        command = services[f"supernode-{k + 1}"]["command"]
        node_config = command[command.index("--node-config") + 1]
        assert tomllib.loads(node_config.replace(" ", "\n"))["data-path"] == archive
        assert _data_mounts(services[f"superexec-clientapp-{k + 1}"]) == {archive: f"{NODES_DIR}/client-{k}.tar.gz"}
        assert _data_mounts(services[f"supernode-{k + 1}"]) == {}
        assert "FEDDISTILL_DATA" not in services[f"superexec-clientapp-{k + 1}"]["environment"]


def test_the_server_mounts_its_archives_and_results_and_no_client_archive(services):
    server = services["superexec-serverapp"]
    assert _data_mounts(server) == {f"/data/{name}": f"{NODES_DIR}/{name}"
                                    for name in ("manifest.json", "public.tar.gz", "test.tar.gz")}
    assert _data_mounts(services["superlink"]) == {}
    results = server["environment"]["FEDDISTILL_OUTPUT"]
    assert f"${{FEDDISTILL_RESULTS_DIR:-./results}}:{results}" in server["volumes"]
    for k in range(NODES):  # edge devices never get the results volume
        assert not any("results" in v for v in services[f"superexec-clientapp-{k + 1}"]["volumes"])


def test_the_build_context_sends_only_pyproject():
    assert (ROOT / ".dockerignore").read_text().split("\n")[1:3] == ["*", "!pyproject.toml"]


def test_gpu_reservation_is_an_optional_override(services):
    assert "deploy" not in services["superexec-serverapp"]
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]["superexec-serverapp"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_shipped_flower_config_declares_the_compose_connections():
    config = tomllib.loads((ROOT / "deploy" / "flwr-home" / "config.toml").read_text())["superlink"]
    assert config["compose"] == {"address": "127.0.0.1:8000", "insecure": True}
    assert config["compose-tls"]["root-certificates"].endswith("deploy/certs/ca.crt")
    assert config["local"]["address"] == ":local:"
