"""The real `flwr run .` on a private managed local SuperLink (simulation engine), always torn down by PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

PROJECT = Path(__file__).resolve().parents[2]
FLWR = Path(sys.executable).with_name("flwr")
OVERRIDES = (
    "name=flwr-run-test data.name=tiny data.train_per_class=null data.test_per_class=null "
    "split.pipc=2 split.num_clients=2 model.width=16 federation.rounds=1 federation.batch_size=32 distill.ipc=1 device=cpu"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state, past the "(comm)" that may hold spaces


def superlink_pids(port: int) -> list[int]:
    """The flower-superlink processes serving `port` (found by their command line)."""
    found = []
    for pid in _all_pids():
        args = _cmdline(pid)
        if any("flower-superlink" in a for a in args) and "--port" in args and str(port) in args[args.index("--port") + 1 :][:1]:
            found.append(pid)
    return found


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        parent = _parent(pid)
        if parent is not None:
            children.setdefault(parent, []).append(pid)
    out, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def kill_superlink(port: int) -> list[int]:
    """SIGTERM, then SIGKILL, the SuperLink on `port` and every process under it; returns the pids signalled."""
    targets = []
    for pid in superlink_pids(port):
        targets += descendants(pid)[::-1] + [pid]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in targets:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() and _state(p) != "Z" for p in targets):
            time.sleep(0.1)
    return targets


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def flwr(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> dict:
    proc = subprocess.run([str(FLWR), *args, "--format", "json"], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"flwr {args[0]}: rc={proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}") from None


@pytest.mark.slow
@pytest.mark.skipif(not FLWR.exists(), reason="the flwr CLI is not installed beside this Python")
def test_flwr_run_on_the_managed_local_superlink_completes(tmp_path):
    http_port, control_port = free_port(), free_port()
    out = tmp_path / "runs"
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(FLWR.parent), os.environ.get("PATH", "")]),  # flwr starts flower-superlink by name
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    try:
        started = flwr(
            [
                "run", str(PROJECT),
                "--federation-config", "num-supernodes=2 client-resources-num-cpus=1",
                "-c", f'overrides="{OVERRIDES}"',
                "-c", f'output-dir="{out}"',
            ],
            env, cwd=tmp_path,
        )
        assert started.get("success"), started
        run_id = started["run-id"]
        status, deadline = "", time.time() + 150
        while time.time() < deadline:
            runs = flwr(["list", "--run-id", str(run_id)], env, cwd=tmp_path)["runs"]
            status = runs[0]["status"] if runs else ""
            if status.startswith("finished"):
                break
            time.sleep(2)
        assert status == "finished:completed", f"{status}: {runs[0].get('status-details') if runs else ''}"

        (run_dir,) = out.iterdir()
        assert run_dir.name.startswith("flwr-run-test-")
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [x["round"] for x in lines] == [0, 1] and lines[1]["replies"] == 2
        assert (run_dir / "checkpoints" / "round_0001.pt").is_file()
        state = torch.load(run_dir / "received_model.pt", weights_only=True)
        assert state["classifier.weight"].shape == (10, 16 * 4 * 4)
    finally:
        kill_superlink(http_port)
    assert superlink_pids(http_port) == []
