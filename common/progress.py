"""Progress of long steps (distillation iterations, evaluation nets), reported in any context.

The loops call a `Progress`: `start(task, total, done)`, `advance(task, done, metrics)`, `finish(task, text)`.
`LineProgress` writes a plain, timestamped line at most every `interval` seconds per task (and at its start and end)
to any `write` function: stdout of a batch job, a log file that `tail -f` follows, or a logger. `NoProgress` is
silent. A terminal display (rich) lives in `simulations/commands/progress.py`, above the code that reports.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol


class Progress(Protocol):
    def start(self, task: str, total: int, done: int = 0) -> None: ...

    def advance(self, task: str, done: int, metrics: Mapping[str, float] | None = None) -> None: ...

    def finish(self, task: str, text: str = "") -> None: ...


class NoProgress:
    """Reports nothing."""

    def start(self, task: str, total: int, done: int = 0) -> None:
        pass

    def advance(self, task: str, done: int, metrics: Mapping[str, float] | None = None) -> None:
        pass

    def finish(self, task: str, text: str = "") -> None:
        pass


def format_metrics(metrics: Mapping[str, float], keys: tuple[str, ...] | None = None) -> str:
    """`key=value` pairs with 4 significant digits, in `keys` order (all keys when None)."""
    return " ".join(f"{k}={metrics[k]:.4g}" for k in (keys or tuple(metrics)) if k in metrics)


@dataclass
class _Task:
    total: int
    first_done: int
    started: float
    last_line: float


class LineProgress:
    """Plain lines: `2026-11-25 16:40:01 dm+dkkt seed 0: 120/300 (40%) elapsed 1m12s eta 1m48s loss=... dm=...`."""

    def __init__(self, write: Callable[[str], None] | None = None, interval: float = 30.0,
                 keys: tuple[str, ...] | None = None) -> None:
        self.write = write or (lambda line: print(line, file=sys.stdout, flush=True))
        self.interval = interval
        self.keys = keys
        self.tasks: dict[str, _Task] = {}

    def _line(self, task: str, text: str) -> None:
        self.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {task}: {text}")

    def start(self, task: str, total: int, done: int = 0) -> None:
        now = time.monotonic()
        self.tasks[task] = _Task(total, done, now, now)
        self._line(task, f"start, {done}/{total} done" if done else f"start, {total} steps")

    def advance(self, task: str, done: int, metrics: Mapping[str, float] | None = None) -> None:
        state = self.tasks[task]
        now = time.monotonic()
        if now - state.last_line < self.interval and done < state.total:
            return
        state.last_line = now
        elapsed = now - state.started
        rate = (done - state.first_done) / elapsed if elapsed > 0 else 0.0
        eta = (state.total - done) / rate if rate > 0 else float("nan")
        text = f"{done}/{state.total} ({100 * done / max(state.total, 1):.0f}%) elapsed {_duration(elapsed)} eta {_duration(eta)}"
        if metrics:
            text += " " + format_metrics(metrics, self.keys)
        self._line(task, text)

    def finish(self, task: str, text: str = "") -> None:
        state = self.tasks.pop(task, None)
        took = f"done in {_duration(time.monotonic() - state.started)}" if state else "done"
        self._line(task, f"{took} {text}".strip())


def _duration(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
