"""Bytes on the edge-to-server link: the serialised size of message content, per round and node, and run totals."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from server.traffic import Traffic, bytes_received, content_bytes, traffic_totals


def _record(values: np.ndarray) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({"w": Array(values)}), "metrics": MetricRecord({"num-examples": 3})})


def test_content_bytes_is_the_values_plus_a_small_overhead_and_counts_each_distinct_object_once():
    values = np.arange(250_000, dtype=np.float32)  # 1 MB
    size = content_bytes(_record(values))
    assert values.nbytes < size < values.nbytes + 2_000
    twice = RecordDict({"a": ArrayRecord({"w": Array(values)}), "b": ArrayRecord({"w": Array(values)})})
    assert content_bytes(twice) < size + 1_000  # the same array is one object: sent once
    assert content_bytes(RecordDict({"metrics": MetricRecord({"num-examples": 3})})) < 500


def _message(content: RecordDict | None, **metadata: int) -> SimpleNamespace:
    """What Traffic reads of a Message (a real one needs a Flower runtime to be built; the simulation test in
    test_federation_simulation.py checks the real wiring)."""
    return SimpleNamespace(content=content, metadata=SimpleNamespace(**metadata), has_error=lambda: content is None)


def test_traffic_counts_down_and_up_per_node_and_round():
    values = np.ones(1000, dtype=np.float32)
    content = RecordDict({"arrays": ArrayRecord({"w": Array(values)}), "config": ConfigRecord({"lr": 0.1})})
    down = content_bytes(content)
    traffic = Traffic()
    traffic.sent(1, [_message(content, dst_node_id=node) for node in (11, 22)])
    reply = _record(values)
    up = content_bytes(reply)
    traffic.received(1, [_message(reply, src_node_id=11), _message(None, src_node_id=22)])  # 22: an error reply

    record = traffic.round_record(1)
    assert record["client_bytes"] == {"11": {"up": up, "down": down}, "22": {"up": 0, "down": down}}
    assert record["bytes_down"] == 2 * down and record["bytes_up"] == up
    assert traffic.round_record(2) == {"bytes_up": 0, "bytes_down": 0, "client_bytes": {}}


def test_run_totals_and_bytes_received_read_metrics_jsonl(tmp_path):
    lines = [
        {"round": 0, "bytes_up": 0, "bytes_down": 0, "client_bytes": {}},
        {"round": 1, "bytes_up": 30, "bytes_down": 100,
         "client_bytes": {"5": {"up": 10, "down": 50}, "6": {"up": 20, "down": 50}}},
        {"round": 2, "bytes_up": 20, "bytes_down": 50, "client_bytes": {"5": {"up": 20, "down": 50}}},
    ]
    totals = traffic_totals(lines)
    assert totals == {"bytes_up": 50, "bytes_down": 150, "rounds_without_bytes": 0,
                      "per_client": {"5": {"up": 30, "down": 100}, "6": {"up": 20, "down": 50}}}
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert bytes_received(tmp_path) == 50
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 0}) + "\n" + json.dumps({"round": 1}) + "\n")
    assert bytes_received(tmp_path) is None  # a run from before bytes were recorded
