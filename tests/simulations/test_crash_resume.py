"""kill -9 a federation and a distillation mid-way, resume them, and compare with uninterrupted runs of the same seed.

CPU results match an uninterrupted run to within 1e-6 (in practice exactly): client training, DP noise and the
distillation loop are seeded per round / restored from the checkpoint's RNG states. See docs/reliability.md for
the tolerance on a GPU.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from common.atomic import load_torch
from simulations.cli import main

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--config", "quickstart", "data.name=tiny", "data.train_per_class=null", "data.test_per_class=null",
        "model.width=8", "split.pipc=2", "distill.ipc=1", "device=cpu"]
FEDERATION = [*TINY, "split.num_clients=2", "distill.enabled=false", "federation.rounds=6",
              "federation.dp_noise_multiplier=0.3", "federation.dp_clipping_norm=0.5"]
DISTILL = [*TINY, "distill.method=dm", "distill.iterations=100", "distill.checkpoint_every=10",
           "evaluation.epochs=2", "evaluation.num_nets=1"]
TOLERANCE = 1e-6


def kill_when(args: list[str], appeared: Callable[[], Path | None], log: Path, timeout: float = 180.0) -> Path:
    """Runs `feddistill ARGS` in its own process group and SIGKILLs the group once `appeared()` returns a path."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "simulations.cli", *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while (found := appeared()) is None:
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before the kill:\n{log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed mid-way (rc {proc.returncode})"
    return found


def first(pattern: str, root: Path) -> Path | None:
    return next(iter(root.glob(pattern)), None)


def test_a_killed_federation_resumes_from_its_last_round_and_ends_like_an_uninterrupted_run(tmp_path, reliability):
    killed = tmp_path / "killed"
    checkpoint = kill_when(["simulate", *FEDERATION, "--output-dir", str(killed)],
                           lambda: first("*/checkpoints/round_0002.pt", killed), tmp_path / "killed.log")
    run_dir = checkpoint.parents[1]
    assert not (run_dir / "received_model.pt").exists()
    done_before = len((run_dir / "metrics.jsonl").read_text().splitlines())

    assert main(["simulate", "--resume", str(run_dir)]) == 0
    assert main(["simulate", *FEDERATION, "--output-dir", str(tmp_path / "reference")]) == 0
    reference_dir = first("*/received_model.pt", tmp_path / "reference").parent

    resumed, reference = load_torch(run_dir / "received_model.pt"), load_torch(reference_dir / "received_model.pt")
    worst = max((resumed[k].float() - reference[k].float()).abs().max().item() for k in reference)
    assert worst <= TOLERANCE
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == list(range(7))
    assert all(x["rejected"] == 0 and x["replies"] == 2 for x in lines[1:])  # clipped DP updates pass the guard
    summary = json.loads((run_dir / "summary.json").read_text())
    epsilon = summary["privacy"]["epsilon"]
    assert 0 < epsilon < math.inf and summary["privacy"]["delta"] == 1e-5
    assert f"epsilon = {epsilon:.4g}" in (run_dir / "summary.md").read_text()
    reliability("Crash and resume", f"`kill -9` of `feddistill simulate` (6 rounds, DP on) after {done_before - 1} rounds; "
                "`simulate --resume RUN_DIR`",
                f"rounds {done_before}-6 ran in the same folder, metrics.jsonl has rounds 0-6 once; final model "
                f"max |diff| vs. an uninterrupted run = {worst:.1e} (tolerance {TOLERANCE:g})")
    reliability("Differential privacy", "tiny DP run: noise multiplier 0.3, clipping norm 0.5, 2 clients, 6 rounds",
                f"every clipped update passed the guard; summary.json/summary.md report epsilon = {epsilon:.4g} at delta = 1e-05")


def test_a_killed_distillation_resumes_from_its_checkpoint_and_ends_with_the_same_images(tmp_path, reliability):
    killed = tmp_path / "killed"
    kill_when(["distill", *DISTILL, "--out", str(killed)],
              lambda: first("seed_0/checkpoint.pt", killed), tmp_path / "killed.log")
    assert not (killed / "seed_0" / "synthetic.pt").exists()
    iteration = int(load_torch(killed / "seed_0" / "checkpoint.pt")["iteration"])

    assert main(["distill", "--resume", str(killed)]) == 0
    assert main(["distill", *DISTILL, "--out", str(tmp_path / "reference")]) == 0
    resumed = load_torch(killed / "seed_0" / "synthetic.pt")["images"]
    reference = load_torch(tmp_path / "reference" / "seed_0" / "synthetic.pt")["images"]
    worst = (resumed - reference).abs().max().item()
    assert worst <= TOLERANCE
    reliability("Crash and resume", f"`kill -9` of `feddistill distill` (dm, 100 iterations) at its iteration-{iteration} "
                "checkpoint; `distill --resume OUT_DIR`",
                f"continued from iteration {iteration} with the saved images, optimizer and RNG states; final images "
                f"max |diff| vs. an uninterrupted run = {worst:.1e} (tolerance {TOLERANCE:g})")


def test_a_truncated_distillation_checkpoint_is_a_one_line_error(tmp_path, capsys, reliability):
    out = tmp_path / "out"
    assert main(["distill", *DISTILL, "distill.iterations=20", "--out", str(out)]) == 0
    (out / "seed_0" / "synthetic.pt").unlink()
    (out / "seed_0" / "result.json").unlink()
    checkpoint = out / "seed_0" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    capsys.readouterr()
    assert main(["distill", "--resume", str(out)]) == 2
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert len(lines) == 1 and "checkpoint.pt: cannot be loaded as a weights-only torch file" in lines[0], lines
    reliability("Loading safety", "truncated distillation checkpoint.pt given to `distill --resume`", f"exit 2: `{lines[0]}`")


@pytest.mark.parametrize("change, key", [
    (["distill.ipc=2", "split.pipc=4"], "distill.ipc: 1 -> 2"),
    (["evaluation.epochs=3"], "evaluation.epochs: 2 -> 3"),
    (["distill.lr_img=0.5"], "distill.lr_img: 1.0 -> 0.5"),
])
def test_distill_into_a_used_out_with_another_configuration_is_a_one_line_error(change, key, tmp_path, capsys, reliability):
    out = tmp_path / "out"
    assert main(["distill", *DISTILL, "distill.iterations=20", "--out", str(out)]) == 0
    before = (out / "result.json").read_bytes()
    capsys.readouterr()
    assert main(["distill", *DISTILL, "distill.iterations=20", *change, "--out", str(out)]) == 2
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert len(lines) == 1 and key in lines[0] and "holds a run of another configuration" in lines[0], lines
    assert (out / "result.json").read_bytes() == before  # nothing rewritten
    assert json.loads((out / "invocation.json").read_text())["config"]["distill"]["iterations"] == 20
    assert main(["distill", *DISTILL, "distill.iterations=20", "distill.log_every=5", "--out", str(out)]) == 0  # same run
    reliability("Resume safety", f"`distill` re-run into a used --out with {' '.join(change)}", f"exit 2: `{lines[0]}`")


def test_a_killed_distillation_relaunched_with_another_lr_img_is_refused(tmp_path, capsys, reliability):
    out = tmp_path / "out"
    assert main(["distill", *DISTILL, "distill.iterations=20", "--out", str(out)]) == 0
    for finished in ("result.json", "seed_0/result.json", "seed_0/synthetic.pt", "seed_0/synthetic.json"):
        (out / finished).unlink()  # what a kill after the checkpoint leaves
    capsys.readouterr()
    assert main(["distill", *DISTILL, "distill.iterations=20", "distill.lr_img=0.5", "--out", str(out)]) == 2
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert len(lines) == 1 and "distill.lr_img: 1.0 -> 0.5" in lines[0], lines
    assert json.loads((out / "seed_0" / "checkpoint.json").read_text())["config_sha256"]
    reliability("Resume safety", "a killed `distill` re-launched into its folder with another distill.lr_img",
                f"exit 2 before touching the checkpoint: `{lines[0]}`")
