"""A real 2-client, 1-round Flower simulation (run_simulation, Ray): outputs, every reply a client sent, the bytes
recorded per client and the label distribution."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord
from rich.console import Console

from common.atomic import load_torch
from common.config import build_config
from common.holdings import decide_holdings, load_experiment_data
from common.models import build_model
from server.traffic import content_bytes
from simulations.cli import build_parser
from simulations.commands.simulate import simulate

TINY = {
    "name": "tiny-sim",
    "device": "cpu",
    "data": {"name": "tiny"},
    "split": {"pipc": 2, "num_clients": 2},
    "model": {"width": 16},
    "federation": {"rounds": 1, "batch_size": 32, "lr": 0.05},
    "distill": {"ipc": 1},
}


def summarize(kind: str, msg) -> dict:
    """What a reply carried: its records by type, array names/shapes, metric value types, its node and size."""
    content = msg.content
    out = {"kind": kind, "error": msg.has_error(), "records": {k: type(v).__name__ for k, v in content.items()},
           "node": str(msg.metadata.src_node_id), "bytes": content_bytes(content)}
    for record in content.values():
        if isinstance(record, ArrayRecord):
            out.setdefault("arrays", {}).update({name: tuple(a.shape) for name, a in record.items()})
        if isinstance(record, MetricRecord):
            out.setdefault("metrics", {}).update({name: type(v).__name__ for name, v in record.items()})
    return out


@pytest.mark.slow
def test_two_clients_one_round_writes_outputs_and_clients_send_only_weights_and_scalars(tmp_path):
    cfg = build_config(TINY)
    replies: list[dict] = []
    outcome = simulate(cfg, output_dir=tmp_path, console=Console(file=open(tmp_path / "console.txt", "w")),
                       observer=lambda kind, msg: replies.append(summarize(kind, msg)))

    run_dir = outcome.run_dir
    assert run_dir.parent == tmp_path and run_dir.name.startswith("tiny-sim-")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [0, 1]
    assert lines[1]["replies"] == lines[1]["sampled"] == 2 and lines[1]["rejected"] == lines[1]["failed"] == 0
    assert 0.0 <= lines[1]["test_accuracy"] <= 1.0 and np.isfinite(lines[1]["test_loss"])
    assert lines[1]["train_loss"] is not None and lines[1]["client_eval_accuracy"] is not None
    assert (run_dir / "checkpoints" / "round_0001.pt").is_file()
    assert (run_dir / "config.yaml").is_file() and json.loads((run_dir / "summary.json").read_text())["rounds"] == 1

    received = torch.load(run_dir / "received_model.pt", weights_only=True)
    model = build_model(width=16)
    model.load_state_dict(received)
    checkpoint = load_torch(run_dir / "checkpoints" / "round_0001.pt")
    assert all(torch.equal(checkpoint[k], received[k]) for k in received)

    # Every message a client returned: train replies hold exactly the model's arrays + scalars, evaluate replies scalars.
    expected_arrays = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    scalar = {"int", "float"}
    assert sorted(r["kind"] for r in replies) == ["evaluate", "evaluate", "train", "train"]
    for reply in replies:
        assert not reply["error"]
        if reply["kind"] == "train":
            assert reply["records"] == {"arrays": "ArrayRecord", "metrics": "MetricRecord"}
            assert reply["arrays"] == expected_arrays
            assert set(reply["metrics"]) == {"num-examples", "train_loss", "train_accuracy", "train_seconds"}
        else:
            assert reply["records"] == {"metrics": "MetricRecord"}
            assert set(reply["metrics"]) == {"num-examples", "eval_loss", "eval_accuracy"}
        assert set(reply["metrics"].values()) <= scalar

    # Bytes per client and round: up = the serialised size of exactly what that node sent; down = the global model
    # (train and evaluate instructions) and the round's config, so a little more than twice the model's values.
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    up = {}
    for reply in replies:
        up[reply["node"]] = up.get(reply["node"], 0) + reply["bytes"]
    assert {node: x["up"] for node, x in lines[1]["client_bytes"].items()} == up
    assert lines[1]["bytes_up"] == sum(up.values()) and model_bytes < min(up.values())
    downs = [x["down"] for x in lines[1]["client_bytes"].values()]
    # 2 messages, <10 kB framing each
    assert all(2 * model_bytes < d < 2 * (model_bytes + 10_000) for d in downs), (model_bytes, downs)
    assert lines[0]["client_bytes"] == {}
    traffic = json.loads((run_dir / "summary.json").read_text())["traffic"]
    assert traffic["bytes_up"] == lines[1]["bytes_up"] and traffic["bytes_down"] == lines[1]["bytes_down"]
    assert "MB down / up" in (run_dir / "summary.md").read_text()

    # Who holds what: the run folder's label distribution is the split's.
    dataset = load_experiment_data(cfg)
    holdings = decide_holdings(cfg, dataset.train.labels)
    distribution = json.loads((run_dir / "label_distribution.json").read_text())
    for k, client in enumerate(distribution["clients"]):
        train, held = holdings.client(k)
        assert client["train"] == np.bincount(dataset.train.labels[train], minlength=10).tolist()
        assert client["held_out"] == np.bincount(dataset.train.labels[held], minlength=10).tolist()
    assert (run_dir / "label_distribution.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_cli_has_a_simulate_subcommand():
    args = build_parser().parse_args(["simulate", "--config", "quickstart", "federation.rounds=1", "--output-dir", "/x"])
    assert args.command == "simulate" and args.overrides == ["federation.rounds=1"] and args.output_dir == "/x"


def test_clients_share_the_gpu_when_there_is_one():
    from simulations.commands.simulate import client_resources

    cfg = build_config(TINY, {"device": "auto"})
    assert client_resources(cfg, cuda_available=False) == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert client_resources(cfg, cuda_available=True)["num_gpus"] in (0.5, 1.0)  # 2 clients, 1 CPU each
    assert client_resources(build_config(TINY, {"device": "cpu"}), cuda_available=True)["num_gpus"] == 0.0
    explicit = build_config(TINY, {"federation.client_num_gpus": 0.25})
    assert client_resources(explicit, cuda_available=True)["num_gpus"] == 0.25
