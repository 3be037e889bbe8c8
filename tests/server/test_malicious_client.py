"""A real 3-client Flower simulation (run_simulation, Ray) with the default federation settings, in which one
client attacks the server a different way every round; the run must finish on the two honest clients and log
one bounded line per rejected or failed reply."""

from __future__ import annotations

import base64
import io
import json
import logging
import sys

import numpy as np
import pytest
from flwr.app import Array, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from common.config import ExperimentConfig, build_config
from common.protocol import read_experiment
from edge_client.client_app import evaluate_reply, train_reply
from edge_client.shard import load_shard
from server.boundary import MAX_TEXT_CHARS

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

BAD_PARTITION = 2
CFG = {
    "name": "malicious", "device": "cpu", "data": {"name": "tiny"}, "split": {"pipc": 2, "num_clients": 3},
    "model": {"width": 8}, "federation": {"rounds": 5, "batch_size": 32, "lr": 0.05}, "distill": {"ipc": 1},
}


def secret(cfg: ExperimentConfig) -> str:
    """A private training image of the bad client, base64-encoded: what an attacker would like to get out."""
    return base64.b64encode(load_shard(cfg, BAD_PARTITION).train_images[0].tobytes()).decode()


def _forged(content: RecordDict, data: bytes) -> RecordDict:
    honest = content["arrays"]["classifier.bias"]
    content["arrays"]["classifier.bias"] = Array(dtype=honest.dtype, shape=honest.shape, stype=honest.stype, data=data)
    return content


def nan_weights(content: RecordDict, request: RecordDict) -> RecordDict:
    content["arrays"]["classifier.bias"] = Array(np.full(10, np.nan, dtype=np.float32))
    return content


def npz_bytes(content: RecordDict, request: RecordDict) -> RecordDict:
    buffer = io.BytesIO()
    np.savez(buffer, bias=content["arrays"]["classifier.bias"].numpy())
    return _forged(content, buffer.getvalue())


def trailing_bytes(content: RecordDict, request: RecordDict) -> RecordDict:
    return _forged(content, content["arrays"]["classifier.bias"].data + secret(read_experiment(request["config"])).encode())


def whole_pool(content: RecordDict, request: RecordDict) -> RecordDict:
    content["metrics"]["num-examples"] = 180  # every private image of the federation (10 classes x 18)
    return content


def long_error(content: RecordDict, request: RecordDict) -> RecordDict:
    raise ValueError("cannot train: " + secret(read_experiment(request["config"])))


ATTACKS = [  # (what, forge), one per round
    ("NaN weights", nan_weights),
    (".npz bytes instead of .npy", npz_bytes),
    ("a private image appended to an array's bytes", trailing_bytes),
    ("num-examples = the whole private pool (180)", whole_pool),
    ("an error reply whose reason is a private image in base64 (4 kB)", long_error),
]

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    content = train_reply(msg.content, context.node_config)
    if int(context.node_config["partition-id"]) == BAD_PARTITION:
        content = ATTACKS[int(msg.content["config"]["server-round"]) - 1][1](content, msg.content)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    content = evaluate_reply(msg.content, context.node_config)
    if int(context.node_config["partition-id"]) == BAD_PARTITION:
        content["metrics"]["num-examples"] = 10**9  # would decide the aggregated accuracy
        content["metrics"]["eval_accuracy"] = 1.0
    return Message(content=content, reply_to=msg)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


def test_one_malicious_client_of_three_is_rejected_every_round_and_the_run_finishes(tmp_path, reliability):
    import ray.cloudpickle
    from flwr.simulation import run_simulation

    from server.server_app import make_server_app
    from simulations.commands.simulate import quiet_environment

    quiet_environment()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers get this test's ClientApp by value
    cfg = build_config(CFG)
    run_dir = tmp_path / "run"
    lines = _Lines()
    logger = logging.getLogger("flwr.feddistill")
    logger.addHandler(lines)
    try:
        run_simulation(
            server_app=make_server_app(cfg, run_dir), client_app=app, num_supernodes=3,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": {"logging_level": "ERROR", "log_to_driver": False, "include_dashboard": False}},
        )
    finally:
        logger.removeHandler(lines)
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])

    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4, 5] and (run_dir / "received_model.pt").is_file()
    leaked = secret(cfg)
    for server_round, (what, _) in enumerate(ATTACKS, start=1):
        r = rounds[server_round]
        assert (r["replies"], r["rejected"] + r["failed"]) == (2, 1), r
        train_lines = [x for x in lines.records if x.startswith(f"round {server_round} train:")]
        eval_lines = [x for x in lines.records if x.startswith(f"round {server_round} evaluate:")]
        assert len(train_lines) == 1 and len(eval_lines) == 1, lines.records
        for line in train_lines + eval_lines:  # at most MAX_TEXT_CHARS of what the client wrote reach the log
            assert "\n" not in line and len(line) < 500 and leaked[:MAX_TEXT_CHARS] not in line, line
        assert "exceeds the largest held-out slice" in eval_lines[0]
        reliability("One malicious client of three (real simulation, default federation settings)",
                    f"round {server_round}: {what}; every round its evaluate reply claims num-examples = 10^9",
                    f"logged `{train_lines[0]}`; the round aggregated the 2 honest clients; the run finished 5 rounds")
    for path in run_dir.rglob("*"):
        if path.suffix in (".json", ".jsonl", ".md", ".yaml"):
            assert leaked[:MAX_TEXT_CHARS] not in path.read_text(), path



def test_flowers_own_log_records_are_one_bounded_line_in_feddistill_simulate():
    from server.boundary import MAX_REASON_CHARS
    from simulations.commands.simulate import OneBoundedLine

    logger, lines, one_line = logging.getLogger("flwr"), _Lines(), OneBoundedLine()
    logger.addHandler(lines)
    logger.addFilter(one_line)
    try:
        logger.error("ClientAppException occurred. Message:\n%s", "QUFB" * 2000)  # what the simulated SuperNodes log
        try:
            raise ValueError("x" * 5000)
        except ValueError:
            logger.exception("the ClientApp raised")
    finally:
        logger.removeFilter(one_line)
        logger.removeHandler(lines)
    assert len(lines.records) == 2
    assert all("\n" not in x and len(x) <= MAX_REASON_CHARS and "QUFB" * 100 not in x for x in lines.records)


def test_a_reversed_and_boosted_update_in_a_real_simulation_is_rejected_under_the_default_rule(tmp_path, monkeypatch,
                                                                                              reliability):
    """The sign-flip attack of simulations/benchmarks/poisoning.py (1 client of 4 reverses its update x5) in Ray: the default
    rule's direction check rejects it in the first round, from a fresh model, when the honest updates agree most, and
    in the second."""
    import ray.cloudpickle

    import simulations.benchmarks.poisoning as poisoning
    from simulations.commands.simulate import simulate

    monkeypatch.setenv(poisoning.POISON_ENV, "3,5.0")  # read by the Ray workers this run starts
    cfg = build_config({**CFG, "split": {"pipc": 2, "num_clients": 4}, "federation": {**CFG["federation"], "rounds": 2}})
    ray.cloudpickle.register_pickle_by_value(poisoning)
    try:
        outcome = simulate(cfg, output_dir=tmp_path, client_app=poisoning.app)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(poisoning)
    first, second = outcome.rounds[1], outcome.rounds[2]
    assert (first["replies"], first["rejected"]) == (3, 1), first
    assert (second["replies"], second["rejected"]) == (3, 1), second  # against the round-1 step, if not the median
    assert len(outcome.rounds) == 3 and (outcome.run_dir / "received_model.pt").is_file()
    reliability("One malicious client of four (real simulation, default federation settings)",
                "its own update reversed and scaled x5 (under max_update_norm_ratio=10)",
                "round 1: rejected by the direction check (cosine with the coordinate-wise median update < 0); the run "
                "finished; round 2: rejected again (the median or the previous round's step); docs/benchmarks.md, Poisoning")
