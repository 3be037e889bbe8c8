"""The privacy boundary: only model arrays and named scalar metrics get past the server's screen."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.config import build_config
from common.models import build_model
from common.records import model_to_record
from server.boundary import (
    MAX_REASON_CHARS,
    MAX_TEXT_CHARS,
    client_reason,
    decode_array,
    evaluate_reply_problems,
    model_spec,
    npy_header,
    screen_replies,
    train_reply_problems,
)
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


@dataclass
class _Error:
    code: int
    reason: str


class FailedReply(FakeReply):
    """An error reply: what a client that raised (or forged an Error) returns."""

    def __init__(self, reason: str, node: int) -> None:
        super().__init__(RecordDict(), node)
        self.error = _Error(0, reason)

    def has_error(self) -> bool:
        return True


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
    replies = [FakeReply(good_reply(a), 1), FakeReply(tampered, 2), FakeReply(good_reply(b), 3)]
    arrays, metrics = strategy.aggregate_train(1, replies)
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
    from server.strategy import summarize_reasons

    ray_reason = (
        "<class 'RayTaskError'>:<'ray::ClientAppActor.run()\n  File x\nValueError: boom\n\nException ClientAppException "
        "occurred. Message: node_config num-partitions=3 != split.num_clients=2'>"
    )
    reason = client_reason(ray_reason)
    assert reason == "node_config num-partitions=3 != split.num_clients=2"
    assert summarize_reasons([(1, reason), (2, reason), (3, client_reason("x\ny"))]) == (
        "node 1, node 2: node_config num-partitions=3 != split.num_clients=2; node 3: y"
    )


# ---------------------------------------------------------------- array bytes: exactly np.save's encoding, nothing else


def with_bytes(name: str, data: bytes) -> RecordDict:
    """An honest reply whose array `name` carries `data` (its dtype/shape/stype metadata unchanged)."""
    reply = good_reply()
    honest = reply["arrays"][name]
    reply["arrays"][name] = Array(dtype=honest.dtype, shape=honest.shape, stype=honest.stype, data=data)
    return reply


def npz_bytes(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, value)
    return buffer.getvalue()


def test_the_canonical_header_is_what_np_save_writes_for_every_model_array():
    for model in (build_model(width=WIDTH), build_model(width=WIDTH, norm="batchnorm")):
        for name, array in model_to_record(model).items():
            shape, dtype = model_spec(model)[name]
            assert array.data.startswith(npy_header(dtype, shape)), name
            np.testing.assert_array_equal(decode_array(array, shape, dtype), array.numpy())


@pytest.mark.parametrize(
    "kind, make, words",
    [
        (".npz archive instead of .npy", lambda v: npz_bytes(v), "bytes, not the"),
        ("3000 bytes after the values", lambda v: Array(v).data + bytes(3000), "bytes, not the"),
        ("3000 bytes hidden in the header padding", lambda v: _padded_header(v, 3000), "bytes, not the"),
        ("header of another dtype, same length", lambda v: Array(v.view(np.int32)).data, "header other than"),
        ("Fortran-ordered header", lambda v: Array(np.asfortranarray(v.reshape(2, 5))).data, "header other than"),
        ("empty bytes", lambda v: b"", "bytes, not the"),
    ],
)
def test_array_bytes_other_than_np_saves_encoding_are_rejected_by_name(kind, make, words):
    bias = build_model(width=WIDTH).state_dict()["classifier.bias"].numpy()
    problems = train_reply_problems(with_bytes("classifier.bias", make(bias)), SPEC)
    assert len(problems) == 1 and problems[0].startswith("array 'classifier.bias': ") and words in problems[0], problems


def _padded_header(value: np.ndarray, extra: int) -> bytes:
    """np.save's bytes with `extra` more spaces of header padding (np.load still reads it: a hidden payload)."""
    data = Array(value).data
    header_len = int.from_bytes(data[8:10], "little")
    header = data[10 : 10 + header_len].rstrip(b"\n") + b" " * extra + b"\n"
    return data[:8] + len(header).to_bytes(2, "little") + header + data[10 + header_len :]


def test_a_padded_header_would_load_in_numpy_so_only_the_exact_check_stops_it():
    bias = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(np.load(io.BytesIO(_padded_header(bias, 3000))), bias)


def test_metadata_that_disagrees_with_the_model_is_rejected_without_decoding():
    honest = model_to_record(build_model(width=WIDTH))["classifier.bias"]
    for dtype, shape, stype in [("float32", (10,), "torch.Tensor"), ("x" * 10_000, (10,), honest.stype),
                                ("float32", (10**12, 10**12), honest.stype), ("float32", "(10,)", honest.stype)]:
        reply = good_reply()
        reply["arrays"]["classifier.bias"] = Array(dtype=honest.dtype, shape=honest.shape, stype=honest.stype, data=honest.data)
        array = reply["arrays"]["classifier.bias"]
        object.__setattr__(array, "dtype", dtype)  # what an inflated message can carry
        object.__setattr__(array, "shape", shape)
        object.__setattr__(array, "stype", stype)
        problems = train_reply_problems(reply, SPEC)
        assert len(problems) == 1 and len(problems[0]) < 200 and "x" * 20 not in problems[0], problems


def _structured_payloads(rng: np.random.Generator, bias: np.ndarray) -> list[bytes]:
    """Byte strings an attacker would try: .npy of other versions/dtypes/orders, .npz, pickles, cut or grown bytes."""
    honest = Array(bias).data
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, bias, version=(2, 0))
    v2 = buffer.getvalue()
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    out = [honest, v2, buffer.getvalue(), npz_bytes(bias), Array(bias.astype(">f4")).data,
           Array(bias.astype(np.float64)).data, Array(bias[:9]).data, Array(bias.reshape(2, 5)).data,
           honest.replace(b"'fortran_order': False", b"'fortran_order': True "), honest + b"\x00", honest[:-1],
           b"\x93NUMPY\x01\x00" + b"\xff" * 118 + bias.tobytes(), _padded_header(bias, 64)]
    for _ in range(2000):  # honest bytes with one to eight random bytes replaced, inserted or removed
        data = bytearray(honest)
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(0, len(data)))
            op = rng.integers(0, 3)
            if op == 0:
                data[i] = int(rng.integers(0, 256))
            elif op == 1:
                data.insert(i, int(rng.integers(0, 256)))
            else:
                del data[i]
        out.append(bytes(data))
    return out


def test_fuzz_no_byte_string_makes_the_screen_raise_and_only_np_saves_encoding_is_accepted():
    rng = np.random.default_rng(15)
    bias = build_model(width=WIDTH).state_dict()["classifier.bias"].numpy()
    honest = Array(bias).data
    payloads = _structured_payloads(rng, bias)
    payloads += [rng.bytes(int(n)) for n in rng.integers(0, 400, size=2000)]  # random bytes of any length
    payloads += [honest[:128] + rng.bytes(int(n)) for n in rng.integers(0, 80, size=500)]  # a valid header, junk after
    accepted = 0
    for data in payloads:
        problems = train_reply_problems(with_bytes("classifier.bias", data), SPEC)  # must never raise
        assert all(isinstance(p, str) and len(p) <= MAX_REASON_CHARS for p in problems)
        values_ok = data[:128] == honest[:128] and len(data) == len(honest)
        finite = values_ok and np.isfinite(np.frombuffer(data[128:], dtype=np.float32)).all()
        assert (problems == []) == bool(finite), (data[:140], problems)
        accepted += problems == []
    assert accepted >= 1  # the honest encoding itself passes


# ---------------------------------------------------------------- text a client chooses is bounded and sanitised


SECRET = base64.b64encode(IMAGES.tobytes()).decode()  # a private image, base64-encoded


def test_client_chosen_names_are_counted_not_quoted():
    reply = good_reply()
    reply["arrays"][SECRET[:5000]] = Array(np.zeros(3, dtype=np.float32))
    reply["metrics"] = MetricRecord({**good_metrics(), SECRET[:5000]: 1.0, "pixel\n0": 2.0})
    reply[SECRET[:300]] = ConfigRecord({"k": 1})
    problems = train_reply_problems(reply, SPEC)
    text = "; ".join(problems)
    assert "arrays have 1 name not in the model" in text and "2 unexpected metric names" in text
    assert "1 other record (ConfigRecord)" in text
    assert SECRET[:20] not in text and "pixel" not in text


@pytest.mark.parametrize("reason", [SECRET, "ValueError: " + SECRET + "\n", "line\x00one\x1b[31m red\r\n" + "é" * 5000,
                                    "ClientAppException occurred. Message: " + "A" * 10**7 + "'>"])
def test_an_error_replys_reason_is_kept_as_at_most_100_printable_characters(reason):
    screened = screen_replies([FailedReply(reason, 7)], SPEC)
    [(node, kept)] = screened.failed
    assert node == 7 and len(kept) <= MAX_TEXT_CHARS and kept.isprintable() and kept.isascii()
    assert SECRET[:MAX_TEXT_CHARS] not in kept


def test_a_reply_the_checks_do_not_foresee_is_rejected_not_raised():
    class Exploding(FakeReply):
        @property
        def content(self):
            raise MemoryError("x" * 10_000)

        @content.setter
        def content(self, value):
            pass

    screened = screen_replies([Exploding(good_reply(), 4), FakeReply(good_reply(), 5)], SPEC)
    assert [m.metadata.src_node_id for m in screened.kept] == [5]
    assert screened.rejected == [(4, "the reply could not be screened (MemoryError)")]


@pytest.mark.parametrize("value", [10**400, -(10**30), float("inf"), float("nan"), [1.0] * 1000])
def test_absurd_metric_numbers_are_rejected_with_a_short_reason(value):
    reply = RecordDict({"arrays": model_to_record(build_model(width=WIDTH)), "metrics": good_metrics()})
    reply["metrics"]["train_loss"] = value
    problems = train_reply_problems(reply, SPEC)
    assert problems and all(len(p) < 120 for p in problems), problems


@pytest.mark.parametrize("key, value", [("train_accuracy", 1.5), ("train_accuracy", -0.1), ("train_loss", -1.0),
                                        ("train_seconds", -3.0), ("train_loss", 1e308), ("train_loss", 101.0)])
def test_metrics_outside_their_range_are_rejected(key, value):
    reply = good_reply()
    reply["metrics"][key] = value
    assert any(f"metric {key!r}" in p and "outside" in p for p in train_reply_problems(reply, SPEC))


def test_a_second_reply_from_one_node_is_rejected_and_only_the_first_counts(reliability):
    first, second = FakeReply(good_reply(), 7), FakeReply(good_reply(), 7)
    screened = screen_replies([first, FakeReply(good_reply(), 8), second], SPEC)
    assert screened.kept == [first, screened.kept[1]] and len(screened.kept) == 2
    assert screened.rejected == [(7, "a second reply from this node in the round (only its first counts)")]
    reliability("Privacy boundary (server)", "two train replies from one node in a round",
                "the first is screened and counts once; the second is rejected")


def test_an_eval_loss_beyond_the_cross_entropy_bound_is_rejected():
    metrics = MetricRecord({"num-examples": 4, "eval_loss": 1e308, "eval_accuracy": 0.5})
    assert any("'eval_loss'" in p and "outside [0, 100]" in p for p in evaluate_reply_problems(RecordDict({"metrics": metrics})))
