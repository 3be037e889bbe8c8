"""The update guard: each kind of malformed or implausible update is rejected with its reason, the round still aggregates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.config import build_config
from common.models import build_model
from server.privacy import dp_epsilon, privacy_report
from server.strategy import EdgeFedAvg
from server.update_guard import GuardLimits, guard_updates, lower_median, model_norm, model_step, update_norm
from tests.server.test_boundary import FakeReply, good_metrics

pytestmark = pytest.mark.reliability

WIDTH = 8
POOL = 180  # tiny data: 20 per class, pipc 2 -> 10 x 18 private images
SLICES = [(41, 4)] * 4  # 4 IID clients of 45 images; client_holdout 0.1 -> 41 train + 4 held-out images each
GLOBAL = {k: v.clone() for k, v in build_model(width=WIDTH).state_dict().items()}


def cfg_with(**overrides):
    raw = {"data": {"name": "tiny"}, "split": {"pipc": 2, "num_clients": 4}, "model": {"width": WIDTH},
           "distill": {"ipc": 1}, "federation": {"min_clients": 3}}
    return build_config(raw, overrides)


def client_state(seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """The global model plus a small seeded update (an honest client)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in GLOBAL.items()}


def clipped_mean(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """FedAvg (equal weights) of `states` with every update clipped to their lower median norm."""
    norms = [update_norm(ArrayRecord(st), ArrayRecord(GLOBAL)) for st in states]
    bound = lower_median(norms)
    return {k: sum(GLOBAL[k] + (st[k] - GLOBAL[k]) * min(1.0, bound / n) for st, n in zip(states, norms, strict=True))
               / len(states)
            for k in GLOBAL}


def shared_update(seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """An honest client of a federation whose clients agree on a direction: a common update plus its own noise."""
    common, own = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(seed)
    return {k: v + scale * (torch.randn(v.shape, generator=common) + 0.5 * torch.randn(v.shape, generator=own))
            for k, v in GLOBAL.items()}


def reversed_update(seed: int, factor: float) -> dict[str, torch.Tensor]:
    """The sign-flip attack: the client's own update reversed and scaled by `factor`."""
    own = shared_update(seed)
    return {k: GLOBAL[k] - factor * (own[k] - GLOBAL[k]) for k in GLOBAL}


def reply(state: dict[str, torch.Tensor], n: int = 40) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord(state), "metrics": good_metrics(n)})


def with_array(name: str, value) -> RecordDict:
    state = client_state(4)
    arrays = ArrayRecord(state)
    arrays[name] = Array(np.asarray(value))
    return RecordDict({"arrays": arrays, "metrics": good_metrics(40)})


def missing_key() -> RecordDict:
    state = client_state(4)
    del state["classifier.bias"]
    return reply(state)


def extra_key() -> RecordDict:
    return with_array("extra.weight", np.zeros(3, dtype=np.float32))


def wrong_shape() -> RecordDict:
    return with_array("classifier.bias", np.zeros(11, dtype=np.float32))


def wrong_dtype() -> RecordDict:
    return with_array("classifier.bias", GLOBAL["classifier.bias"].numpy().astype(np.float64))


def non_finite(value: float) -> RecordDict:
    bias = GLOBAL["classifier.bias"].numpy().copy()
    bias[0] = value
    return with_array("classifier.bias", bias)


def claimed(n) -> RecordDict:
    metrics = MetricRecord({"num-examples": n, "train_loss": 1.5, "train_accuracy": 0.4, "train_seconds": 0.1})
    return RecordDict({"arrays": ArrayRecord(client_state(4)), "metrics": metrics})


def extra_record() -> RecordDict:
    content = reply(client_state(4))
    content["notes"] = ConfigRecord({"labels": "0,1,2"})
    return content


CASES = [
    ("missing key", missing_key, "arrays lack ['classifier.bias']"),
    ("extra key", extra_key, "arrays have 1 name not in the model"),
    ("wrong shape", wrong_shape, "array 'classifier.bias': float32(11,)"),
    ("wrong dtype", wrong_dtype, "array 'classifier.bias': float64(10,) != model float32(10,)"),
    ("NaN weight", lambda: non_finite(float("nan")), "non-finite values"),
    ("Inf weight", lambda: non_finite(float("inf")), "non-finite values"),
    ("update norm 1000x the others", lambda: reply(client_state(4, scale=10.0)), "x the round's median"),
    ("num-examples = 0", lambda: claimed(0), "'num-examples' is 0"),
    ("num-examples < 0", lambda: claimed(-5), "must be an integer >= 0"),
    ("num-examples not an integer (40.5)", lambda: claimed(40.5), "must be an integer >= 0"),
    ("num-examples > the private pool", lambda: claimed(10**6), "exceeds the largest train slice of any client (41 images)"),
    ("num-examples = the whole private pool", lambda: claimed(POOL), "'num-examples'=180 exceeds the largest train slice"),
    ("an extra record (ConfigRecord)", extra_record, "records must be exactly"),
]


@pytest.mark.parametrize("kind, make, reason", CASES, ids=[c[0] for c in CASES])
def test_a_malformed_update_is_rejected_with_its_reason_and_the_round_aggregates_the_rest(kind, make, reason, reliability,
                                                                                          caplog):
    strategy = EdgeFedAvg(cfg_with(), build_model(width=WIDTH), slice_sizes=SLICES)
    strategy.global_arrays = {1: ArrayRecord(GLOBAL)}
    honest = [client_state(s) for s in (1, 2, 3)]
    replies = [FakeReply(reply(state), node) for node, state in zip((11, 12, 13), honest, strict=True)] + [FakeReply(make(), 99)]
    with caplog.at_level("WARNING", logger="flwr.feddistill"):
        arrays, _ = strategy.aggregate_train(1, replies)

    record = strategy.train_replies[1]
    assert record.kept == 3 and [node for node, _ in record.rejected] == [99]
    assert reason in record.rejected[0][1]
    assert "node 99" in caplog.text and reason in caplog.text
    got, expected = arrays.to_torch_state_dict(), clipped_mean(honest)
    for name in GLOBAL:
        assert torch.allclose(got[name], expected[name], atol=1e-6)
    reliability("Update guard (server)", f"train reply with {kind}",
                f"rejected ({record.rejected[0][1]}); the other 3 aggregated")


def test_the_norm_ratio_needs_three_replies_and_is_configurable():
    honest, big = ArrayRecord(client_state(1)), ArrayRecord(client_state(2, scale=0.5))
    replies = [FakeReply(RecordDict({"arrays": a, "metrics": good_metrics(40)}), n) for n, a in ((1, honest), (2, big))]
    limits = GuardLimits(None, None, 10.0, max_global_ratio=1000.0)
    kept, rejected = guard_updates(replies, ArrayRecord(GLOBAL), limits)
    assert len(kept) == 2 and not rejected  # two replies: no meaningful median
    third = FakeReply(RecordDict({"arrays": ArrayRecord(client_state(3)), "metrics": good_metrics(40)}), 3)
    assert [n for n, _ in guard_updates([*replies, third], ArrayRecord(GLOBAL), limits)[1]] == [2]
    assert not guard_updates([*replies, third], ArrayRecord(GLOBAL), GuardLimits(None, None, 10_000.0, 1000.0))[1]


def test_with_two_replies_an_update_far_larger_than_the_global_model_is_rejected(reliability):
    strategy = EdgeFedAvg(cfg_with(**{"federation.min_clients": 1}), build_model(width=WIDTH), slice_sizes=SLICES)
    strategy.global_arrays = {1: ArrayRecord(GLOBAL)}
    huge = client_state(2, scale=10.0)
    arrays, _ = strategy.aggregate_train(1, [FakeReply(reply(client_state(1)), 1), FakeReply(reply(huge), 2)])
    [(node, reason)] = strategy.train_replies[1].rejected
    ratio = update_norm(ArrayRecord(huge), ArrayRecord(GLOBAL)) / model_norm(ArrayRecord(GLOBAL))
    assert node == 2 and ratio > 3 and "x the global model's norm" in reason and "max_update_global_ratio=3" in reason
    assert all(torch.allclose(arrays.to_torch_state_dict()[k], v) for k, v in client_state(1).items())
    reliability("Update guard (server)", "2 replies, one with an update 1000x the other (no median to compare with)",
                f"rejected ({reason}); the honest one aggregated")


def evaluate_reply(n, accuracy: float = 0.5) -> RecordDict:
    return RecordDict({"metrics": MetricRecord({"num-examples": n, "eval_loss": 1.0, "eval_accuracy": accuracy})})


@pytest.mark.parametrize("kind, content, reason", [
    ("num-examples = 10^9 (would decide the accuracy)", evaluate_reply(10**9, 1.0),
     "exceeds the largest held-out slice of any client (4 images)"),
    ("eval_accuracy = 7", evaluate_reply(4, 7.0), "metric 'eval_accuracy'=7 is not finite or outside [0, 1]"),
    ("an ArrayRecord of images", RecordDict({**evaluate_reply(4), "x": ArrayRecord({"i": Array(np.zeros(3))})}),
     "records must be exactly"),
])
def test_evaluate_replies_are_bounded_like_train_replies(kind, content, reason, reliability, caplog):
    strategy = EdgeFedAvg(cfg_with(), build_model(width=WIDTH), slice_sizes=SLICES)
    honest = [FakeReply(evaluate_reply(4, 0.25), 1), FakeReply(evaluate_reply(3, 0.5), 2)]
    with caplog.at_level("WARNING", logger="flwr.feddistill"):
        metrics = strategy.aggregate_evaluate(1, [*honest, FakeReply(content, 9)])
    [(node, why)] = strategy.evaluate_replies[1].rejected
    assert node == 9 and reason in why and "node 9" in caplog.text
    assert metrics["eval_accuracy"] == pytest.approx((4 * 0.25 + 3 * 0.5) / 7)
    reliability("Update guard (server)", f"evaluate reply with {kind}", f"rejected ({why}); the other 2 aggregated")


def test_a_train_time_longer_than_the_round_timeout_is_rejected():
    strategy = EdgeFedAvg(cfg_with(**{"federation.round_timeout": 60}), build_model(width=WIDTH), slice_sizes=SLICES)
    slow = reply(client_state(4))
    slow["metrics"]["train_seconds"] = 1e9
    strategy.aggregate_train(1, [FakeReply(reply(client_state(s)), s) for s in (1, 2, 3)] + [FakeReply(slow, 9)])
    assert strategy.train_replies[1].rejected == [(9, "metric 'train_seconds'=1e+09 exceeds federation.round_timeout=60")]


@pytest.mark.parametrize("clients, expected", [(1, 1), (2, 2), (3, 2), (4, 3), (10, 6)])
def test_by_default_a_round_needs_a_majority_of_the_clients(clients, expected):
    from common.config import min_clients_of

    cfg = build_config({"data": {"name": "tiny"}, "split": {"pipc": 2, "num_clients": clients}, "distill": {"ipc": 1}})
    assert min_clients_of(cfg) == expected


def test_by_default_krum_waits_for_what_it_needs():
    from common.config import min_clients_of

    cfg = cfg_with(**{"split.num_clients": 6, "federation.min_clients": None, "federation.aggregator": "krum",
                      "federation.krum_malicious": 1})
    assert min_clients_of(cfg) == 5


def test_with_the_default_min_clients_one_bad_client_of_three_does_not_stop_the_round(reliability):
    cfg = cfg_with(**{"split.num_clients": 3, "federation.min_clients": None})
    strategy = EdgeFedAvg(cfg, build_model(width=WIDTH), slice_sizes=[(54, 6)] * 3)
    strategy.global_arrays = {1: ArrayRecord(GLOBAL)}
    arrays, _ = strategy.aggregate_train(1, [FakeReply(reply(client_state(1)), 1), FakeReply(reply(client_state(2)), 2),
                                             FakeReply(non_finite(float("nan")), 3)])
    record = strategy.train_replies[1]
    assert arrays is not None and record.kept == 2 and [n for n, _ in record.rejected] == [3]
    reliability("Update guard (server)", "1 bad reply of 3 with the default federation.min_clients (a majority: 2)",
                "rejected; the round aggregated the other 2")


def test_too_few_updates_left_fail_the_round_with_every_reason(reliability):
    strategy = EdgeFedAvg(cfg_with(), build_model(width=WIDTH), slice_sizes=SLICES)
    replies = [FakeReply(reply(client_state(1)), 1), FakeReply(claimed(10**6), 2), FakeReply(missing_key(), 3)]
    with pytest.raises(RuntimeError, match="min_clients=3") as err:
        strategy.aggregate_train(1, replies)
    assert "node 2: metric 'num-examples'=1000000 exceeds" in str(err.value) and "node 3: arrays lack" in str(err.value)
    assert "\n" not in str(err.value)
    reliability("Update guard (server)", "2 of 3 replies malformed, federation.min_clients=3",
                f"the round fails: {err.value}")


@pytest.mark.parametrize("aggregator", ["fedmedian", "fedtrimmedavg", "krum"])
def test_robust_aggregators_run_behind_the_same_screen(aggregator, reliability):
    cfg = cfg_with(**{"federation.aggregator": aggregator, "split.num_clients": 5})
    strategy = EdgeFedAvg(cfg, build_model(width=WIDTH), slice_sizes=SLICES)
    strategy.global_arrays = {1: ArrayRecord(GLOBAL)}
    replies = [FakeReply(reply(client_state(s)), s) for s in (1, 2, 3, 4)] + [FakeReply(non_finite(float("nan")), 9)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert [n for n, _ in strategy.train_replies[1].rejected] == [9]
    assert all(torch.isfinite(v).all() for v in arrays.to_torch_state_dict().values())
    reliability("Update guard (server)", f"NaN update with federation.aggregator={aggregator}",
                "rejected by the screen; the 4 others aggregated by Flower's " + aggregator)


def test_with_dp_an_unclipped_update_is_rejected_and_clipped_ones_pass(reliability):
    cfg = cfg_with(**{"federation.dp_noise_multiplier": 0.5, "federation.dp_clipping_norm": 1.0})
    strategy = EdgeFedAvg(cfg, build_model(width=WIDTH), slice_sizes=SLICES)
    strategy.global_arrays = {1: ArrayRecord(GLOBAL)}
    states = [client_state(s) for s in (1, 2, 3)] + [client_state(4, scale=0.05)]
    norms = [update_norm(ArrayRecord(s), ArrayRecord(GLOBAL)) for s in states]
    assert max(norms[:3]) < 1.0 < norms[3] < 10 * min(norms[:3])  # honest ones are within the clipping norm, the last is not
    arrays, _ = strategy.aggregate_train(1, [FakeReply(reply(s), n) for n, s in enumerate(states)])
    assert [n for n, _ in strategy.train_replies[1].rejected] == [3]
    assert "dp_clipping_norm" in strategy.train_replies[1].rejected[0][1] and arrays is not None
    reliability("Update guard (server)", "DP on, a client skips clipping (norm above federation.dp_clipping_norm)",
                f"rejected ({strategy.train_replies[1].rejected[0][1]}); clipped updates pass, noise added")


def test_more_noise_gives_a_smaller_epsilon_and_dp_off_reports_none():
    assert dp_epsilon(2.0, 1.0, 10, 1e-5) < dp_epsilon(1.0, 1.0, 10, 1e-5) < dp_epsilon(0.5, 1.0, 10, 1e-5)
    assert dp_epsilon(1.0, 0.1, 10, 1e-5) < dp_epsilon(1.0, 1.0, 10, 1e-5)  # sampling amplifies privacy
    assert privacy_report(cfg_with()) is None
    report = privacy_report(cfg_with(**{"federation.dp_noise_multiplier": 1.0, "federation.dp_clipping_norm": 1.0}))
    assert 0 < report["epsilon"] < float("inf") and report["delta"] == 1e-5 and report["sampling_rate"] == 1.0


@pytest.mark.parametrize("clients, factor", [(4, 5.0), (3, 9.5)])
def test_a_reversed_and_scaled_update_is_rejected_by_the_direction_check(clients, factor, reliability):
    strategy = EdgeFedAvg(cfg_with(**{"split.num_clients": clients, "federation.min_clients": 2}), build_model(width=WIDTH),
                          slice_sizes=SLICES)
    strategy.global_arrays = {1: ArrayRecord(GLOBAL)}
    honest = [shared_update(s) for s in range(1, clients)]
    replies = [FakeReply(reply(st), n) for n, st in enumerate(honest, start=1)]
    replies += [FakeReply(reply(reversed_update(9, factor)), 9)]
    arrays, _ = strategy.aggregate_train(1, replies)
    [(node, reason)] = strategy.train_replies[1].rejected
    assert node == 9 and "points away from the round's coordinate-wise median update" in reason
    expected = clipped_mean(honest)
    assert all(torch.allclose(arrays.to_torch_state_dict()[k], expected[k], atol=1e-6) for k in GLOBAL)
    reliability("Update guard (server)", f"1 client of {clients} sends its own update reversed and scaled x{factor:g} "
                "(within max_update_norm_ratio)", f"rejected ({reason}); the honest ones aggregated")


def test_the_direction_check_is_configurable_and_needs_three_replies():
    replies = [FakeReply(reply(shared_update(s)), s) for s in (1, 2)] + [FakeReply(reply(reversed_update(9, 2.0)), 9)]
    on = GuardLimits(None, None, 10.0, 3.0, min_cosine=0.0)
    assert [n for n, _ in guard_updates(replies, ArrayRecord(GLOBAL), on)[1]] == [9]
    assert not guard_updates(replies, ArrayRecord(GLOBAL), GuardLimits(None, None, 10.0, 3.0, min_cosine=-1.0))[1]
    assert not guard_updates(replies[1:], ArrayRecord(GLOBAL), on)[1]  # two replies: no median to agree with


def test_an_update_against_the_previous_rounds_step_is_rejected_even_when_the_median_agrees_with_it(reliability):
    """Late in training honest updates decorrelate and, with 3 replies, the coordinate-wise median follows the attacker
    in many coordinates; the step the global model took last round is a reference the attacker cannot pull."""
    gen = torch.Generator().manual_seed(7)
    other = {k: torch.randn(v.shape, generator=gen) for k, v in GLOBAL.items()}  # what this round's clients agree on
    step = {k: torch.randn(v.shape, generator=gen) for k, v in GLOBAL.items()}  # where training went last round
    noise = {k: 0.1 * torch.randn(v.shape, generator=gen) for k, v in GLOBAL.items()}
    honest = [{k: GLOBAL[k] + 0.01 * (other[k] + 0.3 * step[k]) for k in GLOBAL},
              {k: GLOBAL[k] + 0.01 * (other[k] + 0.3 * step[k] + noise[k]) for k in GLOBAL}]
    against = {k: GLOBAL[k] + 0.01 * (other[k] - 0.3 * step[k]) for k in GLOBAL}
    replies = [FakeReply(reply(st), n) for n, st in enumerate(honest, start=1)] + [FakeReply(reply(against), 9)]
    limits = GuardLimits(None, None, 10.0, 3.0, min_cosine=0.0)
    assert not guard_updates(replies, ArrayRecord(GLOBAL), limits)[1]  # the median alone lets it through
    previous = model_step(ArrayRecord({k: GLOBAL[k] + step[k] for k in GLOBAL}), ArrayRecord(GLOBAL))
    kept, rejected = guard_updates(replies, ArrayRecord(GLOBAL), limits, previous)
    [(node, reason)] = rejected
    assert node == 9 and "previous round's aggregate update" in reason and len(kept) == 2
    assert not guard_updates(replies, ArrayRecord(GLOBAL), limits, np.zeros_like(previous))[1]  # no step: no check
    # The strategy keeps the step between rounds: round 2's clients started from round 1's model plus the step.
    strategy = EdgeFedAvg(cfg_with(**{"split.num_clients": 3, "federation.min_clients": 2}), build_model(width=WIDTH),
                          slice_sizes=SLICES)
    strategy.start_round(1, ArrayRecord({k: GLOBAL[k] - step[k] for k in GLOBAL}))
    assert strategy.previous_step is None  # a run's first round has no step yet
    strategy.start_round(2, ArrayRecord(GLOBAL))
    assert np.allclose(strategy.previous_step, previous, atol=1e-5)
    strategy.aggregate_train(2, replies)
    assert [n for n, _ in strategy.train_replies[2].rejected] == [9]
    reliability("Update guard (server)", "1 client of 3 sends an update that agrees with the round's median but "
                "points against the step the global model took last round", f"rejected ({reason})")


def test_fedavg_clips_a_boosted_update_to_the_rounds_median_norm(reliability):
    strategy = EdgeFedAvg(cfg_with(), build_model(width=WIDTH), slice_sizes=SLICES)
    strategy.global_arrays = {1: ArrayRecord(GLOBAL)}
    honest = [shared_update(s) for s in (1, 2, 3)]
    boosted = {k: GLOBAL[k] + 5 * (shared_update(4)[k] - GLOBAL[k]) for k in GLOBAL}  # same direction, 5x the norm
    arrays, _ = strategy.aggregate_train(1, [FakeReply(reply(st), n) for n, st in enumerate([*honest, boosted])])
    record = strategy.train_replies[1]
    assert record.kept == 4 and not record.rejected and record.clipped >= 1
    expected = clipped_mean([*honest, boosted])
    assert all(torch.allclose(arrays.to_torch_state_dict()[k], expected[k], atol=1e-6) for k in GLOBAL)
    norms = sorted(update_norm(ArrayRecord(st), ArrayRecord(GLOBAL)) for st in [*honest, boosted])
    aggregate_norm = update_norm(arrays, ArrayRecord(GLOBAL))
    assert aggregate_norm <= norms[1] + 1e-6  # no more than one typical update, whatever the boosted one claimed
    reliability("Update guard (server)", "1 of 4 updates boosted 5x in the honest direction (passes every check)",
                f"FedAvg clipped it to the round's median update norm (federation.clip_to_median); aggregate norm "
                f"{aggregate_norm:.3g} <= the median {norms[1]:.3g}")


def test_with_two_replies_the_larger_update_is_clipped_to_the_smaller(reliability):
    strategy = EdgeFedAvg(cfg_with(**{"federation.min_clients": 1}), build_model(width=WIDTH), slice_sizes=SLICES)
    strategy.global_arrays = {1: ArrayRecord(GLOBAL)}
    small, big = client_state(1), client_state(2, scale=0.02)  # big: 2x the norm, under the 3x global-norm bound
    arrays, _ = strategy.aggregate_train(1, [FakeReply(reply(small), 1), FakeReply(reply(big), 2)])
    assert strategy.train_replies[1].clipped == 1
    expected = clipped_mean([small, big])
    assert all(torch.allclose(arrays.to_torch_state_dict()[k], expected[k], atol=1e-6) for k in GLOBAL)
    reliability("Update guard (server)", "2 replies, one update 2x the other's norm (under the 3x global-norm bound)",
                "FedAvg clipped the larger to the smaller norm before averaging")


def test_all_zero_weights_are_rejected(reliability):
    strategy = EdgeFedAvg(cfg_with(**{"federation.min_clients": 1}), build_model(width=WIDTH), slice_sizes=SLICES)
    strategy.global_arrays = {1: ArrayRecord(GLOBAL)}
    zeros = {k: torch.zeros_like(v) for k, v in GLOBAL.items()}  # update norm = ||w_global||: under the 3x bound
    strategy.aggregate_train(1, [FakeReply(reply(client_state(1)), 1), FakeReply(reply(zeros), 9)])
    [(node, reason)] = strategy.train_replies[1].rejected
    assert node == 9 and "is all zeros (the global model's is not)" in reason
    reliability("Update guard (server)", "2 replies, one with all weights zero (its update norm is 1x the global model's)",
                f"rejected ({reason})")


def test_a_second_reply_of_one_node_does_not_count_toward_min_clients():
    strategy = EdgeFedAvg(cfg_with(), build_model(width=WIDTH), slice_sizes=SLICES)  # min_clients 3
    strategy.global_arrays = {1: ArrayRecord(GLOBAL)}
    replies = [FakeReply(reply(client_state(1)), 1), FakeReply(reply(client_state(2)), 2), FakeReply(reply(client_state(3)), 2)]
    with pytest.raises(RuntimeError, match="2 usable training replies of 3.*a second reply from this node"):
        strategy.aggregate_train(1, replies)


def test_a_train_time_longer_than_the_round_has_lasted_is_rejected(reliability):
    strategy = EdgeFedAvg(cfg_with(), build_model(width=WIDTH), slice_sizes=SLICES)
    strategy.global_arrays = {1: ArrayRecord(GLOBAL)}
    strategy.round_sent[1] = __import__("time").monotonic()  # the messages went out just now
    slow = reply(client_state(4))
    slow["metrics"]["train_seconds"] = 3000.0  # under round_timeout=3600, but the round is seconds old
    strategy.aggregate_train(1, [FakeReply(reply(client_state(s)), s) for s in (1, 2, 3)] + [FakeReply(slow, 9)])
    [(node, reason)] = strategy.train_replies[1].rejected
    assert node == 9 and "since the round's messages went out" in reason
    reliability("Update guard (server)", "train_seconds = 3000 in a round that started a second ago",
                f"rejected ({reason})")
