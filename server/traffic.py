"""Bytes on the edge-to-server link: what each client received and sent in each round.

A message's size here is the serialised size of its content as Flower 1.42 transfers it: the content is a tree of
content-addressed objects (RecordDict -> ArrayRecord / MetricRecord / ConfigRecord -> Array -> array chunks), each
pushed once as its `deflate()` bytes; `content_bytes` sums those over the distinct objects of the tree. Message
metadata and the transport's framing are not counted. Down = the train (and evaluate) instructions a client was
sent: the global model's ArrayRecord and the round's ConfigRecord; up = its replies: the ArrayRecord and MetricRecord
of a train reply, the MetricRecord of an evaluate reply (an error reply has no content: 0).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Message, RecordDict

from server.resume import METRICS_FILE


def content_bytes(content: RecordDict) -> int:
    """Serialised bytes of a message's content: every distinct object of its tree, deflated, once."""
    seen: set[str] = set()
    stack: list[Any] = [content]
    total = 0
    while stack:
        obj = stack.pop()
        if obj.object_id in seen:
            continue
        seen.add(obj.object_id)
        total += len(obj.deflate())
        stack.extend((obj.children or {}).values())
    return total


class Traffic:
    """Bytes down (server -> client) and up (client -> server) per round and node id."""

    def __init__(self) -> None:
        self.rounds: dict[int, dict[int, dict[str, int]]] = {}

    def _add(self, server_round: int, node: int, direction: str, size: int) -> None:
        entry = self.rounds.setdefault(server_round, {}).setdefault(node, {"up": 0, "down": 0})
        entry[direction] += size

    def sent(self, server_round: int, messages: Iterable[Message]) -> None:
        """Counts the messages the server is about to send (one content size per distinct content object)."""
        sizes: dict[int, int] = {}
        for msg in messages:
            key = id(msg.content)
            if key not in sizes:
                sizes[key] = content_bytes(msg.content)
            size = sizes[key]
            self._add(server_round, msg.metadata.dst_node_id, "down", size)

    def received(self, server_round: int, replies: Iterable[Message]) -> None:
        """Counts the replies that arrived (an error reply carries no content)."""
        for msg in replies:
            self._add(server_round, msg.metadata.src_node_id, "up", 0 if msg.has_error() else content_bytes(msg.content))

    def round_record(self, server_round: int) -> dict[str, Any]:
        """metrics.jsonl's bytes of one round: totals and {node id: {"up", "down"}}."""
        nodes = self.rounds.get(server_round, {})
        return {
            "bytes_up": sum(x["up"] for x in nodes.values()),
            "bytes_down": sum(x["down"] for x in nodes.values()),
            "client_bytes": {str(node): dict(x) for node, x in sorted(nodes.items())},
        }


def traffic_totals(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over a run's metrics.jsonl lines: bytes up and down, and per node id. Rounds recorded before bytes
    were (no `bytes_up` key) are counted in `rounds_without_bytes`."""
    per_client: dict[str, dict[str, int]] = {}
    missing = 0
    for line in lines:
        if line.get("round", 0) > 0 and "bytes_up" not in line:
            missing += 1
        for node, x in line.get("client_bytes", {}).items():
            entry = per_client.setdefault(node, {"up": 0, "down": 0})
            entry["up"] += x["up"]
            entry["down"] += x["down"]
    return {
        "bytes_up": sum(line.get("bytes_up", 0) for line in lines),
        "bytes_down": sum(line.get("bytes_down", 0) for line in lines),
        "per_client": per_client,
        "rounds_without_bytes": missing,
    }


def bytes_received(run_dir: Path) -> int | None:
    """Total bytes the server received from the edge clients in a run folder (from its metrics.jsonl); None when
    the run predates byte counting (some round has no `bytes_up`)."""
    lines = [json.loads(x) for x in (Path(run_dir) / METRICS_FILE).read_text().splitlines() if x.strip()]
    totals = traffic_totals(lines)
    return None if totals["rounds_without_bytes"] else totals["bytes_up"]
