"""A Grid that a driver can stop: the ServerApp's way out when the nodes it waits for will never answer.

`feddistill simulate` runs the ServerApp in a thread of its own process (Flower's run_simulation). When the simulation
engine fails (Ray cannot start: no free port, no room for the object store, a temp dir it cannot use), Flower raises in
the main thread but leaves the ServerApp thread waiting for replies up to federation.round_timeout per round (an hour
by default), and Python does not exit while that non-daemon thread lives: the command hung. Wrapped in this grid, the
ServerApp's next grid call after `stop` is set raises GridStopped, so its thread ends within one pull interval of
a wait (or at its next grid call when it is busy, e.g. evaluating round 0).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class ServerAppControl:
    """How a driver ends a ServerApp that runs in one of its threads (make_server_app(control=...)): `stop` is the
    grid's switch; `started` and `finished` are set when the ServerApp's main begins and when it returns or raises."""

    def __init__(self) -> None:
        self.stop, self.started, self.finished = threading.Event(), threading.Event(), threading.Event()

    def end(self, timeout: float) -> bool:
        """Sets `stop` and waits up to `timeout` seconds for a started ServerApp to leave; True when none is left."""
        self.stop.set()
        return not self.started.is_set() or self.finished.wait(timeout)


class GridStopped(RuntimeError):
    """The driver stopped the grid (the simulation engine is gone): the ServerApp must not wait any longer."""


class StoppableGrid(Grid):
    """Delegates to `inner`; every call after `stop` is set raises GridStopped, and send_and_receive's wait checks
    `stop` at every pull."""

    def __init__(self, inner: Grid, stop: threading.Event, pull_interval: float = 0.1) -> None:
        self._inner = inner
        self._stop = stop
        self.pull_interval = pull_interval

    def _check(self) -> None:
        if self._stop.is_set():
            raise GridStopped("the simulation engine stopped; the ServerApp stops waiting for its nodes")

    def set_run(self, run) -> None:
        self._inner.set_run(run)

    @property
    def run(self):
        return self._inner.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        self._check()
        return self._inner.get_node_ids()

    def get_nodes(self):
        self._check()
        return self._inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._check()
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._check()
        return self._inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """As Flower's grids: push, then pull until every reply is in or `timeout` seconds passed; and stop waiting
        (GridStopped) as soon as `stop` is set."""
        pending = set(self.push_messages(messages))
        end = time.monotonic() + (timeout or 0.0)
        replies: list[Message] = []
        while pending and (timeout is None or time.monotonic() < end):
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending:
                self._stop.wait(self.pull_interval)
        return replies
