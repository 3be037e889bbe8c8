"""Progress in any context: `feddistill distill` with its output in a file writes timestamped lines while it runs."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from common.progress import LineProgress

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d dm seed 0: \d+/400 \(\d+%\) elapsed \S+ eta \S+ loss=")


def test_distill_redirected_to_a_file_shows_progress_before_it_ends(tmp_path):
    log = tmp_path / "run.log"
    args = [sys.executable, "-m", "simulations.cli", "distill", "--config", "quickstart", "--out", str(tmp_path / "out"),
            "--progress-every", "0", "device=cpu", "data.name=tiny", "data.train_per_class=null",
            "data.test_per_class=null", "model.width=8", "split.pipc=4", "distill.method=dm", "distill.ipc=1",
            "distill.iterations=400", "distill.log_every=5", "distill.batch_real=4", "evaluation.epochs=5"]
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        seen_while_running = False
        while proc.poll() is None:
            if any(LINE.match(line) for line in log.read_text().splitlines()):
                seen_while_running = proc.poll() is None
                break
            time.sleep(0.05)
        assert proc.wait(timeout=300) == 0, log.read_text()
    text = log.read_text()
    assert seen_while_running, text
    assert "\x1b[" not in text  # no terminal control codes in a file
    assert re.search(r"dm seed 0: done in \S+ loss=", text) and "evaluate dm seed 0: done in" in text


def test_line_progress_rate_limits_and_always_reports_the_end():
    lines: list[str] = []
    progress = LineProgress(lines.append, interval=3600)
    progress.start("job", 10)
    for i in range(1, 11):
        progress.advance("job", i, {"loss": 1.0 / i})
    progress.finish("job", "ok")
    assert len(lines) == 3  # start, the last step (never rate-limited), finish
    assert "10/10 (100%)" in lines[1] and "loss=0.1" in lines[1] and lines[2].endswith("ok")
