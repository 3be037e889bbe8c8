"""`feddistill simulate`: the whole federation in this process via Flower's simulation engine (run_simulation).

One virtual SuperNode per edge client (split.num_clients), ClientApps in Ray actors with
federation.client_num_cpus / client_num_gpus each; the ServerApp runs in a thread of this process
and reports every round to a live table. The config goes to the ServerApp as an object (run_simulation
hands apps an empty run_config) and from there to the clients inside every message.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.table import Table

from common.config import ExperimentConfig
from common.runtime import FederationError, pick_device
from server.boundary import MAX_REASON_CHARS, bounded_text

ENV_DEFAULTS = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # silences Ray's FutureWarning; GPUs are assigned via num_gpus
    "TQDM_DISABLE": "1",
}


def quiet_environment() -> None:
    """Flower/Ray defaults for a local, offline run (only where the user has not set them)."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


@dataclass
class SimulationOutcome:
    run_dir: Path
    rounds: list[dict[str, Any]]
    seconds: float


def client_resources(cfg: ExperimentConfig, cuda_available: bool) -> dict[str, float]:
    """Ray resources per ClientApp. With CUDA present, device != cpu and client_num_gpus == 0, the GPU is
    shared by the clients that run at once (Ray would otherwise hide it from them)."""
    cpus = cfg.federation.client_num_cpus
    gpus = cfg.federation.client_num_gpus
    if gpus == 0 and cuda_available and cfg.device != "cpu":
        parallel = max(1, min(cfg.split.num_clients, int((os.cpu_count() or 1) // max(cpus, 1e-9))))
        gpus = round(1.0 / parallel, 4)
    return {"num_cpus": cpus, "num_gpus": gpus}


ENGINE_STOP_WAIT_S = 120.0  # after the engine failed: the longest wait for the ServerApp thread (it may be evaluating)
CHILD_STOP_WAIT_S = 5.0  # SIGTERM, then this long, then SIGKILL for the Ray processes left behind
CAUSE_CHARS = 300  # of the engine's own error message in ours


def descendants(root: int) -> list[int]:
    """The pids of every process below `root` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def stop_engine(before: set[int]) -> list[int]:
    """After the simulation engine failed: ray.shutdown(), then SIGTERM (SIGKILL after CHILD_STOP_WAIT_S) to every
    Ray process this process started since `before` (its descendants whose command line names ray) that is still
    there. Returns the pids signalled."""
    try:
        import ray

        ray.shutdown()
    except Exception as err:  # noqa: BLE001 - a half-started Ray may fail to shut down; its processes are killed below
        logging.getLogger(__name__).debug("ray.shutdown() after the engine failed: %s", err)
    left = [p for p in descendants(os.getpid()) if p not in before and "ray" in _cmdline(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + CHILD_STOP_WAIT_S
        while sig == signal.SIGTERM and time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in left):
            time.sleep(0.1)
    for pid in left:  # reap the ones that were our own children
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    return left


def engine_failure(err: BaseException) -> str | None:
    """One line for an exception that Flower's simulation engine (not the ServerApp) raised, naming its root cause;
    None for any other exception. "Ray could not start" when the chain passes through Flower's Ray backend init."""
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    frames = {f.name for e in chain for f in traceback.extract_tb(e.__traceback__)}
    if not frames & {"start_vce", "run_api", "init_ray"}:
        return None
    root = chain[-1]
    cause = bounded_text(f"{type(root).__name__}: {root}", CAUSE_CHARS)
    if "init_ray" in frames:
        return (f"Ray could not start, so no edge client ran ({cause}); check that RAY_TMPDIR / TMPDIR is a short "
                "writable path, that /dev/shm and memory have room for Ray's object store, that ports are free and "
                "that the machine is not overloaded (--verbose shows Ray's log)")
    return f"Flower's simulation engine stopped before the federation ended ({cause}); --verbose shows its log"


def rounds_table(lines: list[dict[str, Any]], title: str = "Federated training") -> Table:
    table = Table(title=title)
    for name in ("round", "clients", "lr", "train loss", "train acc", "client acc", "test loss", "test acc", "s"):
        table.add_column(name, justify="right")

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for x in lines:
        clients = "-" if x["round"] == 0 else f"{x['replies']}/{x['sampled']}" + (
            f" ({x['rejected']} rejected)" if x["rejected"] else ""
        )
        table.add_row(
            str(x["round"]),
            clients,
            fmt(x["lr"], ".4g"),
            fmt(x["train_loss"], ".3f"),
            fmt(x["train_accuracy"], ".3f"),
            fmt(x["client_eval_accuracy"], ".3f"),
            fmt(x["test_loss"], ".3f"),
            fmt(x["test_accuracy"], ".4f"),
            fmt(x["seconds"], ".1f"),
        )
    return table


class _DropDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation" not in record.getMessage()


class OneBoundedLine(logging.Filter):
    """Flower's own log records as one line of at most MAX_REASON_CHARS printable characters. The simulated
    SuperNodes log a failing ClientApp's exception whole (a client could put its private data there)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = bounded_text(record.getMessage(), MAX_REASON_CHARS)
        record.args, record.exc_info, record.exc_text = (), None, None
        return True


def simulate(
    cfg: ExperimentConfig,
    output_dir: str | Path | None = None,
    console: Console | None = None,
    verbose: bool = False,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    observer: Callable[[str, Any], None] | None = None,
    resume: str | Path | None = None,
    client_app: Any = None,
) -> SimulationOutcome:
    """Runs the federation described by `cfg` in-process; returns the run folder and the per-round records.

    `resume`: a run folder of the same config to continue after its last complete round (checked before Ray starts).
    `client_app`: another ClientApp than the edge one (a measurement's attacker, simulations/benchmarks/poisoning.py).
    """
    quiet_environment()
    import torch
    from flwr.simulation import run_simulation

    from edge_client.client_app import app as edge_app
    from server.federation import resolve_run_dir
    from server.resume import find_resume_point
    from server.server_app import make_server_app
    from server.stoppable_grid import ServerAppControl

    console = console or Console()
    pick_device(cfg.device)  # device=cuda without CUDA fails here, before Ray starts
    point = find_resume_point(Path(resume), cfg.federation.rounds) if resume is not None else None
    run_dir = Path(resume).resolve() if resume is not None else resolve_run_dir(cfg, output_dir)
    resources = client_resources(cfg, torch.cuda.is_available())
    flwr_logger = logging.getLogger("flwr")
    old_level = flwr_logger.level
    filters = [_DropDeprecation()] + ([] if verbose else [OneBoundedLine()])
    for f in filters:
        flwr_logger.addFilter(f)
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)

    lines: list[dict[str, Any]] = list(point.lines) if point is not None else []
    rounds = cfg.federation.rounds

    def render() -> Table:
        done = lines[-1]["round"] if lines else 0
        title = f"{cfg.name}: {cfg.split.num_clients} edge clients, round {done}/{rounds}"
        return rounds_table(lines, title if lines else title + " (starting Ray and the clients)")

    console.print(
        (f"[bold]resume[/] after round {point.round}: " if point is not None else "")
        + f"[bold]simulate[/] {cfg.name}: {cfg.split.num_clients} clients ({cfg.split.partition}), {rounds} rounds, "
        f"{resources['num_cpus']:g} CPU / {resources['num_gpus']:g} GPU per client -> {run_dir}"
    )
    backend_config = {
        "client_resources": resources,
        "init_args": {
            "logging_level": "ERROR" if not verbose else "INFO",
            "log_to_driver": verbose,
            "include_dashboard": False,
        },
    }
    start = time.perf_counter()
    live = Live(render(), console=console, refresh_per_second=2, transient=True, redirect_stderr=False)

    def round_done(line: dict[str, Any]) -> None:
        lines.append(line)
        live.update(render())
        if not console.is_terminal:  # a log file or a batch job: one plain, timestamped line per round
            console.print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} round {line['round']}/{rounds}: "
                          f"test acc {line['test_accuracy']:.4f}, replies {line['replies']}/{line['sampled']}, "
                          f"{line['seconds']:.1f} s, elapsed {line['elapsed']:.0f} s", highlight=False, soft_wrap=True)
        if on_round is not None:
            on_round(line)

    control = ServerAppControl()
    server_app = make_server_app(cfg, run_dir, on_round=round_done, observer=observer, resume=point, control=control)
    before = set(descendants(os.getpid()))
    try:
        with live:
            run_simulation(
                server_app=server_app,
                client_app=client_app or edge_app,
                num_supernodes=cfg.split.num_clients,
                backend_config=backend_config,
                verbose_logging=verbose,
            )
    except BaseException as err:
        # Flower raises here when its engine fails (Ray cannot start, ...) but leaves the ServerApp thread waiting
        # for replies (round_timeout per round; the process would not exit): stop its grid, let it leave, and stop
        # the Ray processes that were started.
        control.end(ENGINE_STOP_WAIT_S if isinstance(err, Exception) else 0)  # Ctrl-C: no wait
        stop_engine(before)
        message = engine_failure(err) if isinstance(err, Exception) else None
        if message is not None:
            raise FederationError(message) from err
        raise
    finally:
        for f in filters:
            flwr_logger.removeFilter(f)
        flwr_logger.setLevel(old_level)
    seconds = time.perf_counter() - start
    if len(lines) != rounds + 1:
        raise FederationError(f"the simulation ended after {max(len(lines) - 1, 0)} of {rounds} rounds; see the log above")
    console.print(rounds_table(lines, f"{cfg.name}: per-round results"))
    summary = run_dir / "summary.md"
    if cfg.distill.enabled and summary.exists():
        console.print(Markdown("## Distillation" + summary.read_text().split("## Distillation", 1)[1]))
    console.print(
        f"final test accuracy [bold]{lines[-1]['test_accuracy']:.4f}[/] after {rounds} rounds, {seconds:.1f} s wall\n"
        f"results: {run_dir}  (summary.md, metrics.jsonl, label_distribution.png, checkpoints/, received_model.pt, config.yaml"
        + (", distill/" if cfg.distill.enabled else "") + ")"
    )
    return SimulationOutcome(run_dir, lines, seconds)
