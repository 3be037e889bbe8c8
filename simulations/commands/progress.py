"""The terminal display of common.progress: rich bars in a terminal, plain timestamped lines anywhere else."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichBars

from common.progress import LineProgress, Progress, format_metrics
from server.distill.run import SHOWN


class RichProgress:
    """common.progress.Progress on rich bars (one per task, the latest metrics beside it)."""

    def __init__(self, bars: RichBars) -> None:
        self.bars = bars
        self.ids: dict[str, int] = {}

    def start(self, task: str, total: int, done: int = 0) -> None:
        self.ids[task] = self.bars.add_task(task, total=total, completed=done, stats="")

    def advance(self, task: str, done: int, metrics: Mapping[str, float] | None = None) -> None:
        self.bars.update(self.ids[task], completed=done, stats=format_metrics(metrics or {}, SHOWN))

    def finish(self, task: str, text: str = "") -> None:
        task_id = self.ids.pop(task)
        self.bars.update(task_id, completed=self.bars.tasks[task_id].total, stats=text)


@contextmanager
def progress_for(console: Console, interval: float = 30.0) -> Iterator[Progress]:
    """Rich bars when `console` is a terminal, else a LineProgress line every `interval` seconds per task."""
    if not console.is_terminal:
        yield LineProgress(lambda line: console.print(line, highlight=False, soft_wrap=True), interval, SHOWN)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[stats]}"))
    with RichBars(*columns, console=console) as bars:
        yield RichProgress(bars)
