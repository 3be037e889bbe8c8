"""Flower's managed local SuperLink (the one `flwr run .` uses), started with its PID recorded, and stopped by it.

    python -m deploy.local_superlink start   # the SuperLink `flwr run .` would start; PID in
                                             # $FLWR_HOME/local-superlink/superlink.pid
    flwr run . --stream                      # finds it answering on 127.0.0.1:39091 and uses it
    python -m deploy.local_superlink stop    # SIGTERM to that PID's process group (SIGKILL after 10 s)

`flwr run` (1.42, flwr/cli/local_superlink.py) starts `flower-superlink` detached when nothing answers on
127.0.0.1:$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT (39091) and leaves it running, recording no PID. `start` runs the same
command (same ports, state database and log file under $FLWR_HOME/local-superlink/, a new session so its children
share its process group) and writes the PID beside Flower's own superlink.log. `stop` signals only that PID's
group, after checking that the PID is still a flower-superlink. Both honour FLWR_HOME,
FLWR_LOCAL_SUPERLINK_HTTP_API_PORT and FLWR_LOCAL_CONTROL_API_PORT as flwr does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PID_FILE = "superlink.pid"


def flwr_home() -> Path:
    """$FLWR_HOME, else ~/.flwr (as flwr resolves it)."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()


def runtime_dir() -> Path:
    return flwr_home() / "local-superlink"


def ports() -> tuple[str, str]:
    """(HTTP API port, Control API port) of the managed local SuperLink."""
    return (os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091"),
            os.environ.get("FLWR_LOCAL_CONTROL_API_PORT", "39093"))


def answering(http_port: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=timeout) as response:
            return 200 <= response.status < 300
    except OSError:
        return False


def superlink_command(executable: str) -> list[str]:
    """The arguments flwr 1.42 starts its managed local SuperLink with."""
    http_port, control_port = ports()
    folder = runtime_dir()
    return [executable, "--insecure", "--simulation", "--isolation", "subprocess",
            "--control-api-address", f"127.0.0.1:{control_port}", "--host", "127.0.0.1", "--port", http_port,
            "--log-file", str(folder / "superlink.log"), "--log-rotation-interval-hours", "24",
            "--log-rotation-backup-count", "7", "--database", str(folder / "state.db")]


def start(timeout: float = 60.0) -> int:
    """Starts the SuperLink, records its PID and waits until it answers; returns the PID."""
    http_port, _ = ports()
    if answering(http_port):
        raise SystemExit(f"error: a SuperLink already answers on 127.0.0.1:{http_port} "
                         f"(recorded PID: {_read_pid() or 'none'}); stop it first")
    executable = shutil.which("flower-superlink") or str(Path(sys.executable).with_name("flower-superlink"))
    if not Path(executable).is_file():
        raise SystemExit("error: flower-superlink not found on PATH nor beside this Python; activate the venv")
    folder = runtime_dir()
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1"}
    process = subprocess.Popen(superlink_command(executable), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    (folder / PID_FILE).write_text(f"{process.pid}\n")
    deadline = time.monotonic() + timeout
    while not answering(http_port):
        if process.poll() is not None:
            raise SystemExit(f"error: flower-superlink exited with code {process.returncode}; see {folder / 'superlink.log'}")
        if time.monotonic() > deadline:
            stop()
            raise SystemExit(f"error: flower-superlink did not answer within {timeout:.0f} s; see {folder / 'superlink.log'}")
        time.sleep(0.2)
    return process.pid


def _read_pid() -> int | None:
    try:
        return int((runtime_dir() / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _is_superlink(pid: int) -> bool:
    try:
        return "flower-superlink" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def stop(grace: float = 10.0) -> int | None:
    """Stops the SuperLink whose PID `start` recorded, and its process group; returns the PID (None if none was)."""
    pid_file = runtime_dir() / PID_FILE
    pid = _read_pid()
    if pid is None or not _alive(pid) or (Path("/proc").is_dir() and not _is_superlink(pid)):
        pid_file.unlink(missing_ok=True)
        return None
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)  # start() made it a session (and group) leader: its children go with it
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _alive(pid):
            break
    pid_file.unlink(missing_ok=True)
    return pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local_superlink", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "pid"])
    args = parser.parse_args(argv)
    pid_file = runtime_dir() / PID_FILE
    if args.action == "start":
        print(f"local SuperLink on 127.0.0.1:{ports()[0]}, PID {start()} (in {pid_file})")
    elif args.action == "stop":
        pid = stop()
        print(f"stopped the local SuperLink, PID {pid}" if pid else f"no running SuperLink recorded in {pid_file}")
    else:
        pid = _read_pid()
        print(pid if pid and _alive(pid) else f"none recorded in {pid_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
