"""The privacy boundary: only model arrays and named scalar metrics get past the server's screen."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.config import build_config
from common.models import build_model
from common.records import model_to_record
from server.boundary import evaluate_reply_problems, model_spec, screen_replies, train_reply_problems
from server.strategy import EdgeFedAvg

WIDTH = 8


def good_metrics(n: int = 10) -> MetricRecord:
    return MetricRecord({"num-examples": n, "train_loss": 1.5, "train_accuracy": 0.4, "train_seconds": 0.1})


def good_reply(model=None, n: int = 10) -> RecordDict:
    return RecordDict({"arrays": model_to_record(model or build_model(width=WIDTH)), "metrics": good_metrics(n)})


@dataclass
class _Meta:
    src_node_id: int


@dataclass
class FakeReply:
    """The parts of a flwr Message the screen and FedAvg read (a real reply Message needs a Flower runtime)."""

    content: RecordDict
    node: int
    metadata: _Meta = field(init=False)

    def __post_init__(self):
        self.metadata = _Meta(self.node)

    def has_error(self) -> bool:
        return False


SPEC = model_spec(build_model(width=WIDTH))
IMAGES = np.random.default_rng(0).integers(0, 255, size=(16, 32, 32, 3), dtype=np.uint8)


def test_an_honest_reply_passes():
    assert train_reply_problems(good_reply(), SPEC) == []


def test_an_extra_record_of_images_is_rejected():
    reply = good_reply()
    reply["shard"] = ArrayRecord({"images": Array(IMAGES)})
    problems = train_reply_problems(reply, SPEC)
    assert problems and "records must be exactly" in problems[0]


def test_images_hidden_in_the_model_arrays_are_rejected():
    reply = good_reply()
    reply["arrays"]["stolen"] = Array(IMAGES)
    assert any("not in the model" in p for p in train_reply_problems(reply, SPEC))


def test_an_array_of_the_wrong_shape_is_rejected():
    state = {k: v.clone() for k, v in build_model(width=WIDTH).state_dict().items()}
    state["classifier.weight"] = torch.zeros(10, 99)
    reply = RecordDict({"arrays": ArrayRecord(state), "metrics": good_metrics()})
    assert any("classifier.weight" in p for p in train_reply_problems(reply, SPEC))


def test_a_config_record_is_rejected():
    reply = good_reply()
    reply["notes"] = ConfigRecord({"labels": "0,1,2"})
    assert train_reply_problems(reply, SPEC)


@pytest.mark.parametrize(
    "metrics, words",
    [
        ({"num-examples": 10, "train_loss": [1.0, 2.0], "train_accuracy": 0.4, "train_seconds": 0.1}, "not a scalar"),
        ({"num-examples": 10, "train_loss": 1.0, "train_accuracy": 0.4, "train_seconds": 0.1, "pixel_0": 3.0}, "unexpected"),
        ({"num-examples": 10, "train_loss": float("nan"), "train_accuracy": 0.4, "train_seconds": 0.1}, "not finite"),
        ({"num-examples": 10, "train_loss": 1.0}, "missing"),
    ],
)
def test_metrics_that_are_not_the_named_scalars_are_rejected(metrics, words):
    reply = RecordDict({"arrays": model_to_record(build_model(width=WIDTH)), "metrics": MetricRecord(metrics)})
    assert any(words in p for p in train_reply_problems(reply, SPEC))


def test_non_finite_weights_are_rejected():
    model = build_model(width=WIDTH)
    with torch.no_grad():
        model.classifier.bias[0] = float("inf")
    assert any("non-finite" in p for p in train_reply_problems(good_reply(model), SPEC))


def test_an_evaluate_reply_may_carry_only_metrics():
    ok = RecordDict({"metrics": MetricRecord({"num-examples": 5, "eval_loss": 1.0, "eval_accuracy": 0.5})})
    assert evaluate_reply_problems(ok) == []
    leaky = RecordDict({**ok, "arrays": ArrayRecord({"images": Array(IMAGES)})})
    assert evaluate_reply_problems(leaky)


def test_screen_keeps_the_good_replies_and_names_the_node_of_the_bad_one():
    tampered = good_reply()
    tampered["shard"] = ArrayRecord({"images": Array(IMAGES)})
    screened = screen_replies([FakeReply(good_reply(), 1), FakeReply(tampered, 2), FakeReply(good_reply(), 3)], SPEC)
    assert [m.metadata.src_node_id for m in screened.kept] == [1, 3]
    assert [node for node, _ in screened.rejected] == [2]


def tiny_cfg(**overrides):
    raw = {"data": {"name": "tiny"}, "split": {"pipc": 2, "num_clients": 3}, "model": {"width": WIDTH}, "distill": {"ipc": 1}}
    return build_config(raw, overrides)


def test_fedavg_aggregates_only_the_replies_inside_the_boundary():
    a, b = build_model(width=WIDTH), build_model(width=WIDTH)
    tampered = good_reply(build_model(width=WIDTH), n=1000)
    tampered["shard"] = ArrayRecord({"images": Array(IMAGES)})
    seen = []
    strategy = EdgeFedAvg(tiny_cfg(**{"federation.min_clients": 2}), a, observer=lambda kind, msg: seen.append(kind))
    arrays, metrics = strategy.aggregate_train(1, [FakeReply(good_reply(a), 1), FakeReply(tampered, 2), FakeReply(good_reply(b), 3)])
    assert seen == ["train"] * 3
    expected = {k: (a.state_dict()[k] + b.state_dict()[k]) / 2 for k in a.state_dict()}
    got = arrays.to_torch_state_dict()
    for name, value in expected.items():
        assert torch.allclose(got[name], value, atol=1e-6)
        assert got[name].dtype == value.dtype
    record = strategy.train_replies[1]
    assert (record.sent, record.kept, [n for n, _ in record.rejected]) == (3, 2, [2])
    assert metrics["train_loss"] == pytest.approx(1.5)


def test_fedavg_fails_loudly_below_min_clients():
    tampered = good_reply()
    tampered["shard"] = ArrayRecord({"images": Array(IMAGES)})
    strategy = EdgeFedAvg(tiny_cfg(**{"federation.min_clients": 2}), build_model(width=WIDTH))
    with pytest.raises(RuntimeError, match="min_clients=2.*node 2"):
        strategy.aggregate_train(1, [FakeReply(good_reply(), 1), FakeReply(tampered, 2)])


def test_aggregation_restores_integer_buffers():
    model = build_model(width=WIDTH, norm="batchnorm")
    strategy = EdgeFedAvg(tiny_cfg(**{"model.norm": "batchnorm", "federation.min_clients": 2}), model)
    arrays, _ = strategy.aggregate_train(1, [FakeReply(good_reply(model), 1), FakeReply(good_reply(model), 2)])
    state = arrays.to_torch_state_dict()
    assert state["features.1.num_batches_tracked"].dtype == torch.int64
    build_model(width=WIDTH, norm="batchnorm").load_state_dict(state)


def test_failure_reasons_are_cut_down_to_the_clients_message():
    from server.strategy import short_reason, summarize_reasons

    ray_reason = (
        "<class 'RayTaskError'>:<'ray::ClientAppActor.run()\n  File x\nValueError: boom\n\nException ClientAppException "
        "occurred. Message: node_config num-partitions=3 != split.num_clients=2'>"
    )
    assert short_reason(ray_reason) == "node_config num-partitions=3 != split.num_clients=2"
    assert summarize_reasons([(1, ray_reason), (2, ray_reason), (3, "x\ny")]) == (
        "node 1, node 2: node_config num-partitions=3 != split.num_clients=2; node 3: y"
    )
