"""docker-compose.yml on a real Docker engine: `docker compose up`, the quickstart with `flwr run`, per-node data.

The images are local (no registry is reachable here): deploy/local-flwr-image.sh's stand-in for Flower's images, made
once and kept by the engine, named through the compose file's image-override variables; `up --build` builds
deploy/Dockerfile on top of it. Each edge container gets only its own archive of `feddistill partition`, the server
only manifest, public and test archives. With docker-compose.tls.yml on top: a round over TLS with SuperNode
authentication, each SuperNode holding only its own key. Skipped, with the reason, where there is no engine or no
CIFAR-10 archive.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import real_archive

from deploy.deployment import FlowerCli, Tls, Topology, free_ports

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
NODES = 3
FLWR_VERSION = "1.42.0"
LOCAL_IMAGE = os.environ.get("FEDDISTILL_TEST_FLWR_IMAGE", "feddistill-local/flwr")  # repository; tag FLWR_VERSION
PROJECT = "feddistill-compose-test"
APP_UID = 49999  # Flower's images run as user "app"
# The quickstart, CPU-test sized: 600 training images, 200 test images, a narrow model, tiny distillation.
SMALL = ("data.train_per_class=60 data.test_per_class=20 model.width=16 federation.local_epochs=1 "
         "evaluation.epochs=10 evaluation.num_nets=1")
SERVER_FILES = ["manifest.json", "public.tar.gz", "test.tar.gz"]


def _run(args: list[str], timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit code {proc.returncode}"


@pytest.fixture(scope="session")
def compose_command() -> list[str]:
    """`docker compose` (v2) or `docker-compose` (v1), once a Docker engine answers; else skip, saying why."""
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI on PATH (.ci/run installs docker.io and starts dockerd)")
    info = _run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=30)
    if info.returncode != 0:
        pytest.skip(f"no Docker engine answers (start dockerd; .ci/run does): {_last_line(info)}")
    if _run(["docker", "compose", "version"], timeout=30).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("neither `docker compose` nor `docker-compose` is installed (apt-get install docker-compose)")


@pytest.fixture(scope="session")
def flwr_image(compose_command: list[str]) -> str:
    """The stand-in for flwr/superlink, flwr/supernode and flwr/superexec, built once and kept by the engine."""
    image = f"{LOCAL_IMAGE}:{FLWR_VERSION}"
    if _run(["docker", "image", "inspect", image]).returncode == 0:
        return LOCAL_IMAGE
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip(f"{image} is missing and cannot be built here: deploy/local-flwr-image.sh needs root and debootstrap")
    build = _run([str(ROOT / "deploy" / "local-flwr-image.sh"), image], timeout=1800,
                 env={**os.environ, "FLWR_VERSION": FLWR_VERSION})
    assert build.returncode == 0, f"deploy/local-flwr-image.sh failed: {build.stdout[-2000:]}{build.stderr[-2000:]}"
    return LOCAL_IMAGE


@dataclass
class ComposeStack:
    """One `docker compose` project of docker-compose.yml (and overrides), and the `flwr` CLI connected to its
    SuperLink."""

    command: list[str]
    project: str
    files: list[str]
    env: dict[str, str]
    cli: FlowerCli
    nodes: Path
    results: Path
    logs: Path

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        files = [a for f in self.files for a in ("-f", str(ROOT / f))]
        proc = _run([*self.command, "-p", self.project, *files, *args], timeout, self.env)
        assert proc.returncode == 0, f"{' '.join(args)}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        return proc

    def container(self, service: str) -> str:
        ids = self.compose("ps", "-q", service).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def exec(self, service: str, *args: str) -> subprocess.CompletedProcess:
        return _run(["docker", "exec", self.container(service), *args], timeout=60)

    def mounts(self, service: str) -> dict[str, str]:
        """{path in the container: host path} of the service's bind mounts and volumes."""
        out = _run(["docker", "inspect", "--format", "{{json .Mounts}}", self.container(service)]).stdout
        return {m["Destination"]: m["Source"] for m in json.loads(out)}

    def kill(self, *services: str) -> None:
        ids = [self.container(s) for s in services]
        proc = _run(["docker", "kill", *ids])
        assert proc.returncode == 0, proc.stderr

    def save_logs(self) -> None:
        files = [a for f in self.files for a in ("-f", str(ROOT / f))]
        self.logs.write_text(_run([*self.command, "-p", self.project, *files, "logs", "--no-color"], 120, self.env).stdout)


def _bring_up(compose_command: list[str], flwr_image: str, work: Path, project: str, files: list[str],
              tls: Tls | None = None) -> Iterator[ComposeStack]:
    """Partitions the quickstart's data into work/nodes, brings the project up (with `tls`: its certificates, the
    SuperLink first and the node keys registered before the SuperNodes start, as README's TLS steps do), yields it,
    takes it down."""
    archive = real_archive()
    if archive is None:
        pytest.skip("the CIFAR-10 archive is not here (set FEDDISTILL_DATA): the edge nodes' archives are cut from it")
    from simulations.cli import main as cli_main

    nodes, results = work / "nodes", work / "results"
    assert cli_main(["partition", "--config", "quickstart", "--out", str(nodes), f"data.path={archive}",
                     *SMALL.split()]) == 0
    results.mkdir()
    results.chmod(0o777)  # the containers run as Flower's non-root user "app"
    port = free_ports(1)[0]
    env = {**os.environ, "FEDDISTILL_NODES_DIR": str(nodes), "FEDDISTILL_RESULTS_DIR": str(results),
           "FEDDISTILL_SUPERLINK_PORT": str(port), "FLWR_VERSION": FLWR_VERSION,
           **({"FEDDISTILL_CERTS_DIR": str(tls.certs)} if tls else {}),
           **{f"FEDDISTILL_{role}_IMAGE": flwr_image for role in ("SUPERLINK", "SUPERNODE", "SUPEREXEC")}}
    cli = FlowerCli(work / "flwr-home", "compose", logs_hint=f"; see {work / 'compose.log'}")
    cli.configure(Topology("127.0.0.1", port, (), tls=tls))
    stack = ComposeStack(compose_command, project, files, env, cli, nodes, results, work / "compose.log")
    stack.compose("down", "-v", "--remove-orphans")  # leftovers of an interrupted session
    try:
        start = time.monotonic()
        if tls is not None:  # a SuperNode whose key is not registered yet exits (Flower exit code 305)
            stack.compose("up", "--build", "-d", "superlink", timeout=1200)
            _register_nodes(cli, tls, timeout=120)
        stack.compose("up", "--build", "-d", timeout=1200)
        cli.wait_for_nodes(NODES, timeout=180)
        print(f"compose up: {time.monotonic() - start:.0f} s")
        yield stack
    finally:
        stack.save_logs()
        stack.compose("down", "-v", "--remove-orphans")


def _register_nodes(cli: FlowerCli, tls: Tls, timeout: float) -> None:
    """`flwr supernode register` of every node's public key, retried until the SuperLink answers."""
    deadline = time.monotonic() + timeout
    for k in range(NODES):
        while True:
            try:
                cli("supernode", "register", f"{tls.node_key(k)}.pub", cli.connection)
                break
            except subprocess.CalledProcessError as err:
                assert time.monotonic() < deadline, f"flwr supernode register node{k + 1}: {err.stdout}{err.stderr}"
                time.sleep(1.0)


@pytest.fixture(scope="module")
def stack(compose_command: list[str], flwr_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeStack]:
    yield from _bring_up(compose_command, flwr_image, tmp_path_factory.mktemp("compose"), PROJECT, ["docker-compose.yml"])


@pytest.fixture(scope="module")
def tls_stack(compose_command: list[str], flwr_image: str, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[ComposeStack]:
    """docker-compose.yml + docker-compose.tls.yml with fresh development certificates, owned by the containers'
    user "app" (uid 49999) as README's TLS steps say."""
    from deploy.dev_certs import generate

    if os.geteuid() != 0:
        pytest.skip(f"the certificates must be chowned to the containers' user (uid {APP_UID}): that needs root")
    work = tmp_path_factory.mktemp("compose-tls")
    certs = work / "certs"
    generate(certs, NODES, ["superlink", "localhost", "127.0.0.1"])
    for path in [certs, *certs.rglob("*")]:
        os.chown(path, APP_UID, APP_UID)
    yield from _bring_up(compose_command, flwr_image, work, f"{PROJECT}-tls",
                         ["docker-compose.yml", "docker-compose.tls.yml"], Tls(certs))


def _run_folder(results: Path) -> Path:
    folders = [p.parent for p in results.glob("*/metrics.jsonl")]
    assert len(folders) == 1, f"expected one run folder under {results}, got {folders}"
    return folders[0]


def _metrics(results: Path) -> list[dict]:
    return [json.loads(line) for line in (_run_folder(results) / "metrics.jsonl").read_text().splitlines()]


def test_the_quickstart_runs_on_compose_and_the_results_volume_holds_model_and_distillation(stack):
    import torch

    run_id = stack.cli.submit({"config": "quickstart", "overrides": f"{SMALL} federation.rounds=1",
                               "node-data": "/data", "output-dir": "/results/quickstart"})
    row = stack.cli.wait(run_id, timeout=900)
    assert row["status"] == "finished:completed", row
    results = stack.results / "quickstart"
    rounds = _metrics(results)
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["clients_online"] == rounds[1]["replies"] == NODES
    folder = _run_folder(results)
    model = torch.load(folder / "received_model.pt", weights_only=True)
    assert model and all(torch.isfinite(v.float()).all() for v in model.values())
    for method in ("random", "dm", "dm+dkkt"):
        out = folder / "distill" / method.replace("+", "_")
        result = json.loads((out / "result.json").read_text())
        assert result["method"] == method and len(result["accuracies"]) == 1 and 0.0 < result["mean"] <= 1.0, result
        assert (out / "seed_0" / "synthetic.pt").stat().st_size > 0


def test_no_edge_container_holds_another_partys_data_and_the_server_no_client_archive(stack):
    for k in range(NODES):
        archive = f"client-{k}.tar.gz"
        service = f"superexec-clientapp-{k + 1}"
        assert stack.mounts(service) == {f"/data/{archive}": str(stack.nodes / archive)}
        listing = stack.exec(service, "ls", "-A", "/data")
        assert listing.stdout.split() == [archive], listing
        others = [f"/data/client-{j}.tar.gz" for j in range(NODES) if j != k] + [f"/data/{f}" for f in SERVER_FILES]
        assert stack.exec(service, "cat", *others).returncode != 0
    server = stack.mounts("superexec-serverapp")
    assert server == {**{f"/data/{f}": str(stack.nodes / f) for f in SERVER_FILES}, "/results": str(stack.results)}
    assert stack.exec("superexec-serverapp", "ls", "-A", "/data").stdout.split() == SERVER_FILES
    for service in ["superlink"] + [f"supernode-{k + 1}" for k in range(NODES)]:  # data only where apps run
        assert stack.mounts(service) == {}
        assert stack.exec(service, "ls", "/data").returncode != 0


def test_a_killed_edge_device_leaves_a_finished_run_that_records_the_dropout(stack):
    results = stack.results / "dropout"
    run_id = stack.cli.submit({
        "config": "quickstart", "node-data": "/data", "output-dir": "/results/dropout",
        "overrides": f"{SMALL} federation.rounds=2 federation.min_clients=2 federation.round_timeout=60 "
                     "distill.enabled=false",
    })
    deadline = time.monotonic() + 600
    while not (list(results.glob("*/metrics.jsonl")) and len(_metrics(results)) >= 2):
        assert time.monotonic() < deadline, "round 1 did not finish"
        time.sleep(0.5)
    stack.kill("supernode-3", "superexec-clientapp-3")  # edge device 3 dies as round 2 starts
    row = stack.cli.wait(run_id, timeout=600)
    assert row["status"] == "finished:completed", row
    rounds = _metrics(results)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[1]["clients_online"] == rounds[1]["replies"] == NODES
    assert rounds[2]["replies"] == NODES - 1  # the dropout, recorded: offline, or sampled without a reply
    assert rounds[2]["clients_online"] < NODES or rounds[2]["sampled"] == NODES
    assert rounds[2]["test_loss"] is not None


def test_over_tls_with_node_auth_a_round_completes_and_each_node_holds_only_its_own_key(tls_stack):
    results = tls_stack.results / "tls"
    run_id = tls_stack.cli.submit({"config": "quickstart", "node-data": "/data", "output-dir": "/results/tls",
                                   "overrides": f"{SMALL} federation.rounds=1 distill.enabled=false"})
    row = tls_stack.cli.wait(run_id, timeout=600)
    assert row["status"] == "finished:completed", row
    rounds = _metrics(results)
    assert [r["round"] for r in rounds] == [0, 1] and rounds[1]["replies"] == NODES
    certs = Path(tls_stack.env["FEDDISTILL_CERTS_DIR"])
    for k in range(NODES):
        service = f"supernode-{k + 1}"
        assert tls_stack.mounts(service) == {"/app/certificates/ca.crt": str(certs / "ca.crt"),
                                             f"/app/certificates/keys/node{k + 1}": str(certs / "keys" / f"node{k + 1}")}
        assert tls_stack.exec(service, "ls", "/app/certificates/keys").stdout.split() == [f"node{k + 1}"]
    assert "server.key" not in tls_stack.exec("superexec-serverapp", "ls", "/app/certificates").stdout
