"""Memory and wall time of the main `feddistill` commands at their embedded defaults (the README's hardware table).

    python -m simulations.benchmarks.bench_commands --out docs/results/hardware-cpu.json [--only data simulate ...]
        [--model RUN/received_model.pt] [--distill DIST_DIR] [--timeout SECONDS] [--append]

Each command runs in a fresh process under `/usr/bin/time -v` (its "Maximum resident set size": the largest single
process among the command and the children it waited for) while this script samples, every 0.2 s, the summed RSS
of the command's whole process tree (Ray's raylet and ClientApp workers included; shared pages count once per
process, so the sum overstates). A fresh data cache (FEDDISTILL_CACHE in the work folder) makes the first command
decode the archive; the later ones read the cache. Recorded with the machine, its load average before and after each
command (other jobs share the cores: the wall times are those of a shared machine), the date and the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common.atomic import save_json
from common.runtime import git_commit, utc_stamp


def commands(work: Path) -> dict[str, list[str]]:
    """The main commands at their embedded defaults (the quickstart config), in an order where each has its inputs."""
    fd = [sys.executable, "-m", "simulations.cli"]
    return {
        "data": fd + ["data"],
        "partition": fd + ["partition", "--out", str(work / "nodes")],
        "simulate": fd + ["simulate", "--output-dir", str(work / "runs")],
        "distill": fd + ["distill", "--model", "{run}/received_model.pt", "--out", str(work / "distill")],
        "export": fd + ["export", "{distill}", "--out", str(work / "set.pt")],
        "export-ddranking": fd + ["export", "{distill}", "--format", "ddranking", "--out", str(work / "ddr")],
        "evaluate": fd + ["evaluate", str(work / "set.pt")],
        "audit": fd + ["audit", str(work / "set.pt"), "--out", str(work / "audit")],
        "report": fd + ["report", "{run}", "--out", str(work / "report")],
        "sweep": fd + ["sweep", "--out", str(work / "sweep")],  # its embedded default: configs/sweeps/tiny.yaml
    }


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [root], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _rss_kb(pid: int) -> int:
    try:
        match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return 0
    return int(match.group(1)) if match else 0


def measure(argv: list[str], env: dict[str, str], cwd: Path, log: Path, timeout: float) -> dict[str, Any]:
    """Runs argv under /usr/bin/time -v; wall time, time's max RSS, the process tree's peak summed RSS, CPU times.
    Past `timeout` seconds the command's process tree is killed (exit code "timeout")."""
    report = log.with_suffix(".time")
    load_before = os.getloadavg()
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(["/usr/bin/time", "-v", "-o", str(report), *argv], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.wait(0.2):
                peak = max(peak, sum(_rss_kb(p) for p in _tree(proc.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            code: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in reversed(_tree(proc.pid)[1:]):  # the command and its children, not /usr/bin/time
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            proc.wait()
            code = "timeout"
        stop.set()
        sampler.join()
    wall = time.perf_counter() - start
    text = report.read_text()

    def field(name: str) -> float:
        return float(re.search(rf"{re.escape(name)}: ([\d.]+)", text).group(1))

    return {"argv": argv[2:], "exit_code": code, "wall_s": round(wall, 1),
            "max_rss_mb": round(field("Maximum resident set size (kbytes)") / 1024, 1),
            "tree_peak_rss_mb": round(peak / 1024, 1), "user_s": field("User time (seconds)"),
            "system_s": field("System time (seconds)"), "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()]}


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem / 2**20, 1), "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON to write")
    parser.add_argument("--only", nargs="*", default=None, help="a subset of the commands (they depend on each other)")
    parser.add_argument("--model", default=None, help="received_model.pt for distill/report when simulate is not run")
    parser.add_argument("--distill", default=None, metavar="DIST_DIR",
                        help="a distill folder (feddistill distill --out) for export when distill is not run")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per command before it is killed")
    parser.add_argument("--append", action="store_true", help="add to the invocations already in --out")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parents[2]
    commit, date = git_commit(), utc_stamp()  # of the code measured
    with tempfile.TemporaryDirectory(prefix="bench-commands-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "FEDDISTILL_CACHE": str(work / "cache"), "FLWR_TELEMETRY_ENABLED": "0"}
        results: dict[str, Any] = {}
        run_dir = ""
        for name, command in commands(work).items():
            if args.only and name not in args.only:
                continue
            if name in ("distill", "report") and not run_dir:
                runs = sorted((work / "runs").glob("*")) if (work / "runs").is_dir() else []
                run_dir = str(runs[-1]) if runs else str(Path(args.model).resolve().parent) if args.model else ""
            own_distill = args.distill and "distill" not in results
            distill_dir = str(Path(args.distill).resolve()) if own_distill else str(work / "distill")
            command = [c.replace("{run}", run_dir).replace("{distill}", distill_dir) for c in command]
            results[name] = measure(command, env, root, work / f"{name}.log", args.timeout)
            print(name, results[name], flush=True)
            if results[name]["exit_code"]:
                print((work / f"{name}.log").read_text()[-2000:], file=sys.stderr)
                break
        invocation = {"date": date, "commit": commit, "machine": machine(), "niceness": os.nice(0),
                      "data": os.environ.get("FEDDISTILL_DATA"), "model": args.model, "distill": args.distill,
                      "commands": results}
        out = Path(args.out)
        earlier = json.loads(out.read_text())["invocations"] if args.append and out.is_file() else []
        save_json(out, {"invocations": [*earlier, invocation]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
