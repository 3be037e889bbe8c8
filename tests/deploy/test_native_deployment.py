"""The compose topology as real processes: SuperLink, 3 SuperNodes, SuperExecs, `flwr run` on loopback."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from deploy.deployment import LocalDeployment, Tls, local_topology
from deploy.dev_certs import generate

NODES = 3
TINY = (
    "data.name=tiny data.tiny_per_class=12 data.train_per_class=null data.test_per_class=null "
    "model.width=8 split.pipc=2 split.num_clients=3 federation.batch_size=16 federation.eval_batch_size=64 "
    "federation.fraction_evaluate=0 distill.enabled=false"
)

pytestmark = pytest.mark.slow


def _metrics(results: Path) -> list[dict]:
    files = list(results.glob("*/metrics.jsonl"))
    assert len(files) == 1, f"expected one run folder under {results}, got {files}"
    return [json.loads(line) for line in files[0].read_text().splitlines()]


def test_three_supernodes_complete_a_run_over_tls_with_node_auth(tmp_path):
    generate(tmp_path / "certs", NODES, ["localhost", "127.0.0.1"])
    deployment = LocalDeployment(local_topology(NODES, Tls(tmp_path / "certs")), tmp_path)
    with deployment:
        run_id = deployment.submit(
            {"config": "quickstart", "overrides": f"{TINY} federation.rounds=1", "output-dir": str(tmp_path / "results")}
        )
        row = deployment.wait(run_id, timeout=300)
        online = deployment.online_nodes()
    assert row["status"] == "finished:completed", row
    assert online == NODES
    rounds = _metrics(tmp_path / "results")
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["replies"] == NODES
    assert next((tmp_path / "results").glob("*/received_model.pt")).stat().st_size > 0
    assert all(p.poll() is not None for p in deployment.processes.values())  # everything stopped


def test_a_dead_supernode_leaves_a_finished_run_that_records_the_dropout(tmp_path):
    deployment = LocalDeployment(local_topology(NODES), tmp_path)
    results = tmp_path / "results"
    with deployment:
        run_id = deployment.submit({
            "config": "quickstart",
            "overrides": f"{TINY} federation.rounds=2 federation.min_clients=2 federation.round_timeout=60",
            "output-dir": str(results),
        })
        deadline = time.monotonic() + 240
        while not (list(results.glob("*/metrics.jsonl")) and len(_metrics(results)) >= 2):
            assert time.monotonic() < deadline, "round 1 did not finish"
            time.sleep(0.5)
        deployment.kill("supernode-3")
        deployment.kill("superexec-clientapp-3")
        row = deployment.wait(run_id, timeout=400)
    assert row["status"] == "finished:completed", row
    rounds = _metrics(results)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[1]["clients_online"] == rounds[1]["replies"] == NODES
    for r in rounds[2:]:  # the dropout, recorded: the dead client is either offline or sampled without a reply
        assert r["replies"] == NODES - 1
        assert r["clients_online"] < NODES or r["sampled"] == NODES


def test_nodes_with_only_their_own_archives_train_the_same_model_as_the_in_memory_split(tmp_path):
    """Each SuperNode gets only client-<k>.tar.gz, the ServerApp only the public/test archives (node-data);
    the received model equals the one of the same config over the full dataset."""
    import dataclasses

    import torch

    from common.atomic import load_torch
    from simulations.cli import main as cli_main

    overrides = f"{TINY} federation.rounds=1"
    nodes = tmp_path / "nodes"
    assert cli_main(["partition", "--config", "quickstart", "--out", str(nodes), *overrides.split()]) == 0
    models = {}
    for mode in ("archives", "memory"):
        topology = local_topology(NODES)
        run_config = {"config": "quickstart", "overrides": overrides, "output-dir": str(tmp_path / mode)}
        if mode == "archives":
            topology = dataclasses.replace(topology, data_path=str(nodes / "client-{k}.tar.gz"))
            run_config["node-data"] = str(nodes)
        with LocalDeployment(topology, tmp_path / f"work-{mode}") as deployment:
            row = deployment.wait(deployment.submit(run_config), timeout=300)
        assert row["status"] == "finished:completed", (mode, row)
        models[mode] = load_torch(next((tmp_path / mode).glob("*/received_model.pt")))
    assert models["archives"].keys() == models["memory"].keys()
    # Equal up to the order in which FedAvg sums the replies (they arrive in any order in a deployment); a
    # different shard would move the weights by orders of magnitude more.
    for name, value in models["memory"].items():
        torch.testing.assert_close(models["archives"][name], value, rtol=1e-5, atol=1e-6, msg=name)
