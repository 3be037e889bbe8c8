"""Flower's deployment engine as real local processes: one SuperLink, N SuperNodes, SuperExecs, `flwr run`.

    python -m deploy.deployment [--nodes 3] [--tls] [--config quickstart] [key=value ...]

The same topology as docker-compose.yml (process isolation: a SuperExec beside the SuperLink runs the
ServerApp, one beside each SuperNode runs its ClientApp), on loopback ports picked free. The argument
lists below are the single source of truth: tests/deploy/test_compose.py checks that the compose file
runs the same commands. Every process is started in its own process group and stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from deploy.dev_certs import generate as generate_certs

PROJECT_DIR = Path(__file__).resolve().parent.parent
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


@dataclass(frozen=True)
class Tls:
    """Development certificates from deploy/generate_certs.py; `auth` adds SuperNode authentication."""

    certs: Path
    auth: bool = True

    @property
    def ca(self) -> Path:
        return self.certs / "ca.crt"

    def node_key(self, k: int) -> Path:
        return self.certs / "keys" / f"node{k + 1}"


@dataclass(frozen=True)
class Topology:
    """Addresses of one SuperLink and `len(supernode_ports)` SuperNodes."""

    superlink_host: str
    superlink_port: int
    supernode_ports: tuple[int, ...]
    bind_host: str = "127.0.0.1"
    supernode_hosts: tuple[str, ...] | None = None  # per node (compose: service names); default superlink_host
    tls: Tls | None = None
    # node_config data-path, if the nodes' data is not at $FEDDISTILL_DATA; "{k}" is replaced by the partition id
    # (e.g. "nodes/client-{k}.tar.gz": each node gets only its own archive of `feddistill partition`).
    data_path: str | None = None
    # node_config data-sha256 per node (manifest.json's sha256 of each client archive): a node then refuses any other
    data_sha256: tuple[str, ...] | None = None

    @property
    def num_nodes(self) -> int:
        return len(self.supernode_ports)

    @property
    def superlink_address(self) -> str:
        return f"{self.superlink_host}:{self.superlink_port}"

    def supernode_address(self, k: int) -> str:
        host = self.supernode_hosts[k] if self.supernode_hosts else self.superlink_host
        return f"{host}:{self.supernode_ports[k]}"


def superlink_args(t: Topology) -> list[str]:
    args = ["flower-superlink", "--isolation", "process", "--host", t.bind_host, "--port", str(t.superlink_port)]
    if t.tls is None:
        return args + ["--insecure"]
    args += ["--ssl-ca-certfile", str(t.tls.ca), "--ssl-certfile", str(t.tls.certs / "server.pem"),
             "--ssl-keyfile", str(t.tls.certs / "server.key")]
    return args + (["--enable-supernode-auth"] if t.tls.auth else [])


def supernode_args(t: Topology, k: int) -> list[str]:
    node_config = f"partition-id={k} num-partitions={t.num_nodes}"
    if t.data_path:
        node_config += f' data-path="{t.data_path.format(k=k)}"'
    if t.data_sha256:
        node_config += f' data-sha256="{t.data_sha256[k]}"'
    args = ["flower-supernode", "--superlink", t.superlink_address, "--isolation", "process",
            "--host", t.bind_host, "--port", str(t.supernode_ports[k]), "--node-config", node_config]
    if t.tls is None:
        return args + ["--insecure"]
    args += ["--root-certificates", str(t.tls.ca)]
    return args + (["--auth-supernode-private-key", str(t.tls.node_key(k))] if t.tls.auth else [])


def serverapp_superexec_args(t: Topology) -> list[str]:
    args = ["flower-superexec", "--runtime-api-address", t.superlink_address]
    return args + (["--insecure"] if t.tls is None else ["--root-certificates", str(t.tls.ca)])


def clientapp_superexec_args(t: Topology, k: int) -> list[str]:
    # The SuperNode's own runtime API stays plain HTTP on its host: TLS covers the SuperLink link.
    return ["flower-superexec", "--runtime-api-address", t.supernode_address(k), "--insecure"]


def connection_toml(name: str, t: Topology) -> str:
    """A `[superlink.<name>]` table for $FLWR_HOME/config.toml."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{t.superlink_address}"']
    lines.append("insecure = true" if t.tls is None else f'root-certificates = "{t.tls.ca}"')
    return "\n".join(lines) + "\n"


def free_ports(n: int) -> list[int]:
    """n distinct ports that were free a moment ago on 127.0.0.1."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True)
class FlowerCli:
    """The `flwr` CLI of this interpreter against one connection, in its own FLWR_HOME: submit runs, poll them."""

    flwr_home: Path
    connection: str
    app_dir: Path = PROJECT_DIR
    env: dict[str, str] = field(default_factory=dict)
    logs_hint: str = ""  # where to look when something times out

    def environment(self) -> dict[str, str]:
        # SuperExecs start flwr-serverapp / flwr-clientapp by name: put this interpreter's scripts first on PATH.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        return {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.flwr_home), "PATH": path, **self.env}

    def configure(self, t: Topology) -> None:
        """Writes $FLWR_HOME/config.toml with this connection to `t`'s SuperLink."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(connection_toml(self.connection, t))

    def __call__(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(Path(sys.executable).parent / "flwr"), *args], env=self.environment(), cwd=PROJECT_DIR,
            capture_output=True, text=True, timeout=timeout, check=True,
        )

    def online_nodes(self) -> int:
        listing = json.loads(self("supernode", "list", self.connection, "--format", "json").stdout)
        if "nodes" not in listing:  # flwr exits 0 and says why in JSON, e.g. while the SuperLink is not up yet
            raise ConnectionError(f"flwr supernode list: {listing.get('error-message', listing)}")
        return sum(node["status"] == "online" for node in listing["nodes"])

    def wait_for_nodes(self, count: int, timeout: float) -> None:
        """Blocks until `count` SuperNodes are online, so that round 1 samples the whole fleet."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.online_nodes() >= count:
                    return
            except (subprocess.CalledProcessError, ConnectionError):  # the SuperLink is not answering yet
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} SuperNodes online after {timeout:.0f} s{self.logs_hint}")
            time.sleep(0.5)

    def submit(self, run_config: dict[str, str]) -> int:
        """`flwr run <app_dir> <connection>` with TOML run-config values; returns the run id."""
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        out = self("run", str(self.app_dir), self.connection, "--run-config", overrides, "--format", "json")
        return int(json.loads(out.stdout)["run-id"])

    def wait(self, run_id: int, timeout: float = 600.0) -> dict:
        """Polls `flwr list` until the run finishes; returns its row (status "finished:completed" on success)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = json.loads(self("list", self.connection, "--run-id", str(run_id), "--format", "json").stdout)
            row = next(r for r in rows["runs"] if int(r["run-id"]) == run_id)
            if str(row["status"]).startswith("finished"):
                return row
            time.sleep(1.0)
        raise TimeoutError(f"run {run_id} did not finish within {timeout:.0f} s{self.logs_hint}")


@dataclass
class LocalDeployment:
    """Starts and stops the topology as local processes; use as a context manager."""

    topology: Topology
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    connection: str = "local-deployment"
    app_dir: Path = PROJECT_DIR

    @property
    def flwr_home(self) -> Path:
        return self.workdir / "flwr-home"

    @property
    def cli(self) -> FlowerCli:
        return FlowerCli(self.flwr_home, self.connection, self.app_dir, self.env, f"; see {self.workdir / 'logs'}")

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.workdir / "logs" / f"{name}.log", "wb")  # noqa: SIM115 (kept open for the child)
        self.processes[name] = subprocess.Popen(
            [str(Path(sys.executable).parent / args[0]), *args[1:]],
            stdout=log, stderr=subprocess.STDOUT, env=self.cli.environment(), cwd=self.workdir, start_new_session=True,
        )
        log.close()

    def start(self, timeout: float = 60.0) -> LocalDeployment:
        t = self.topology
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.cli.configure(t)
        self._spawn("superlink", superlink_args(t))
        self._spawn("superexec-serverapp", serverapp_superexec_args(t))
        self._wait_for_port(t.superlink_port, timeout)
        if t.tls is not None and t.tls.auth:
            for k in range(t.num_nodes):
                self.flwr("supernode", "register", str(t.tls.node_key(k)) + ".pub", self.connection)
        for k in range(t.num_nodes):
            self._spawn(f"supernode-{k + 1}", supernode_args(t, k))
            self._wait_for_port(t.supernode_ports[k], timeout)
            self._spawn(f"superexec-clientapp-{k + 1}", clientapp_superexec_args(t, k))
        self.wait_for_nodes(t.num_nodes, timeout)
        return self

    def online_nodes(self) -> int:
        return self.cli.online_nodes()

    def wait_for_nodes(self, count: int, timeout: float) -> None:
        self.cli.wait_for_nodes(count, timeout)

    def _wait_for_port(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = {n: p.returncode for n, p in self.processes.items() if p.poll() is not None}
            if dead:
                raise RuntimeError(f"deployment process exited early: {dead}; see {self.workdir / 'logs'}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"nothing listens on port {port} after {timeout:.0f} s; see {self.workdir / 'logs'}")

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Runs the `flwr` CLI against this deployment (its own FLWR_HOME)."""
        return self.cli(*args, timeout=timeout)

    def submit(self, run_config: dict[str, str]) -> int:
        """`flwr run . <connection>` with TOML run-config values; returns the run id."""
        return self.cli.submit(run_config)

    def wait(self, run_id: int, timeout: float = 600.0) -> dict:
        """Polls `flwr list` until the run finishes; returns its row (status "finished:completed" on success)."""
        return self.cli.wait(run_id, timeout)

    def kill(self, name: str) -> None:
        """SIGKILL one process (and its children), e.g. a SuperNode, to simulate a dead edge device."""
        proc = self.processes[name]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def stop(self) -> None:
        """Stops every process by PID: SIGTERM to its group, then SIGKILL after 10 s."""
        for proc in self.processes.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def __enter__(self) -> LocalDeployment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def local_topology(num_nodes: int, tls: Tls | None = None) -> Topology:
    ports = free_ports(num_nodes + 1)
    return Topology("127.0.0.1", ports[0], tuple(ports[1:]), tls=tls)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--config", default="quickstart", help="YAML name or absolute path")
    parser.add_argument("--tls", action="store_true", help="TLS + SuperNode authentication with fresh dev certificates")
    parser.add_argument("--workdir", type=Path, default=PROJECT_DIR / "runs" / "deployment")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    tls = None
    if args.tls:
        generate_certs(workdir / "certs", args.nodes, ["localhost", "127.0.0.1"])
        tls = Tls(workdir / "certs")
    overrides = " ".join([f"split.num_clients={args.nodes}", *args.overrides])
    with LocalDeployment(local_topology(args.nodes, tls), workdir) as deployment:
        run_id = deployment.submit({"config": args.config, "overrides": overrides, "output-dir": str(workdir / "results")})
        print(f"run {run_id} submitted; logs in {workdir / 'logs'}")
        row = deployment.wait(run_id, args.timeout)
    print(f"run {run_id}: {row['status']}; results under {workdir / 'results'}")
    return 0 if row["status"] == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
