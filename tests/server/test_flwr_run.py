"""The README's `flwr run .` block, run as written in a clean environment on a private managed local SuperLink.

The block is read from README.md (the test breaks when the README changes it), run with bash in a copy of the
project whose `.venv` is this Python's venv, with a fresh HOME, a PATH without the venv's bin, and private ports. Only
its run-config overrides are replaced by smaller ones. The SuperLink is stopped by the PID the block recorded.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PROJECT = Path(__file__).resolve().parents[2]
WRITTEN_OVERRIDES = "'overrides=\"federation.rounds=5\"'"
SMALL_OVERRIDES = (
    "'overrides=\"name=flwr-run-test data.name=tiny data.train_per_class=null data.test_per_class=null split.pipc=2 "
    "model.width=16 federation.rounds=1 federation.batch_size=32 distill.ipc=1 distill.iterations=2 "
    "evaluation.epochs=2 distill.baselines=[] device=cpu\"'"
)
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "runs", "docs", "nodes", "results", "__pycache__", "*.egg-info",
                                     ".flwr", "certs", ".pytest_cache")


def readme_block() -> str:
    """The bash block of the README that starts the SuperLink, runs `flwr run .` and stops it."""
    blocks = re.findall(r"```bash\n(.*?)```", (PROJECT / "README.md").read_text(), flags=re.S)
    (block,) = [b for b in blocks if "flwr run . " in b and "local_superlink start" in b]
    return "\n".join(line.strip() for line in block.splitlines())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_readme_block_starts_and_stops_the_superlink_by_a_recorded_pid():
    block = readme_block()
    assert block.startswith('export PATH="$PWD/.venv/bin:$PATH"')  # flwr starts flower-superlink by name
    assert block.index("local_superlink start") < block.index("flwr run .") < block.index("local_superlink stop")
    assert "pkill" not in block and block.count(WRITTEN_OVERRIDES) == 1


@pytest.mark.slow
@pytest.mark.skipif(not Path(sys.executable).with_name("flwr").exists(),
                    reason="the flwr CLI is not installed beside this Python")
def test_the_readme_flwr_run_block_completes_in_a_clean_environment(tmp_path):
    from deploy import local_superlink

    project = tmp_path / "feddistill"
    shutil.copytree(PROJECT, project, ignore=COPY_IGNORE)
    (project / ".venv").symlink_to(Path(sys.prefix))
    script = "set -eo pipefail\n" + readme_block().replace(WRITTEN_OVERRIDES, SMALL_OVERRIDES)
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "COLUMNS": "250",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    pid_file = home / ".flwr" / "local-superlink" / local_superlink.PID_FILE
    pid = None
    try:
        proc = subprocess.Popen(["bash", "-c", script], cwd=project, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        output, _ = proc.communicate(timeout=420)
        assert proc.returncode == 0, output[-3000:]
        pid = int(re.search(r"PID (\d+) \(in ", output).group(1))
        assert f"stopped the local SuperLink, PID {pid}" in output
        assert "finished:completed" in output, output[-3000:]  # flwr list
        assert not pid_file.exists() and not local_superlink._alive(pid)
    finally:
        if pid_file.exists():  # the block failed before its stop line: stop the SuperLink by the recorded PID
            subprocess.run([sys.executable, "-m", "deploy.local_superlink", "stop"], cwd=project, env=env, timeout=60)

    (run_dir,) = (project / "runs").iterdir()
    assert run_dir.name.startswith("flwr-run-test-")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [0, 1] and lines[1]["replies"] == 3
    assert len(lines[1]["client_bytes"]) == 3 and lines[1]["bytes_up"] > 0
    assert (run_dir / "label_distribution.json").is_file() and (run_dir / "label_distribution.png").is_file()
    state = torch.load(run_dir / "received_model.pt", weights_only=True)
    assert state["classifier.weight"].shape == (10, 16 * 4 * 4)
