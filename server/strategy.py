"""FedAvg sampling with the privacy boundary and the update guard in front of the configured aggregator."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from torch import nn

from common.config import ExperimentConfig, dp_enabled, min_clients_of
from common.protocol import round_config
from common.runtime import FederationError
from server.aggregators import build_aggregator
from server.boundary import ModelSpec, model_spec, screen_replies
from server.traffic import Traffic
from server.update_guard import GuardLimits, clip_to_median, guard_evaluations, guard_updates, model_step

log = logging.getLogger("flwr.feddistill")

# Called with ("train" | "evaluate", reply) for every reply a client returns, before screening (tests, auditing).
ReplyObserver = Callable[[str, Message], None]


@dataclass
class RoundReplies:
    """What came back in one round: counts per outcome, the rejection/failure reasons and aggregated metrics."""

    sent: int = 0
    kept: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    clipped: int = 0  # kept updates scaled down to the round's median norm (federation.clip_to_median)


class EdgeFedAvg(FedAvg):
    """FedAvg's sampling; every reply is screened (server/boundary.py) and guarded (server/update_guard.py),
    the kept train replies go to the configured aggregator (server/aggregators.py), and a round with fewer
    than min_clients kept train replies fails with a FederationError naming every node and reason.

    `slice_sizes` ((train, held-out) images of each client's shard, as the server's split cut them) bound a
    train / evaluate reply's num-examples by the largest train / held-out slice; None leaves them unbounded.

    Train and evaluate messages carry common.protocol.round_config(cfg, round) (the lr decayed for
    that round) and, with DP on, the clipping norm for the clients' fixedclipping_mod. Aggregated arrays
    are cast back to the model's dtypes (averages are float). `first_round` > 0 resumes a run: Flower's
    rounds 1, 2, ... become first_round + 1, first_round + 2, ... everywhere (client seeds, lr, records).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        reference: nn.Module,
        observer: ReplyObserver | None = None,
        slice_sizes: Sequence[tuple[int, int]] | None = None,
        first_round: int = 0,
    ) -> None:
        fed = cfg.federation
        evaluate_fraction = fed.fraction_evaluate if cfg.split.client_holdout > 0 else 0.0
        super().__init__(
            fraction_train=fed.fraction_train,
            fraction_evaluate=evaluate_fraction,
            min_train_nodes=min_clients_of(cfg),
            min_evaluate_nodes=min_clients_of(cfg) if evaluate_fraction > 0 else 0,
            # By default every client (each holds a distinct shard); fewer lets the run outlive dead devices.
            min_available_nodes=min_clients_of(cfg),
        )
        self.cfg = cfg
        self.spec: ModelSpec = model_spec(reference)
        self.observer = observer
        self.first_round = first_round
        self.aggregator = build_aggregator(cfg)
        max_train = max(t for t, _ in slice_sizes) if slice_sizes else None
        max_eval = max(h for _, h in slice_sizes) if slice_sizes else None
        self.limits = GuardLimits(
            max_train, max_eval, fed.max_update_norm_ratio, fed.max_update_global_ratio, fed.round_timeout,
            fed.dp_clipping_norm if dp_enabled(cfg) else None, min_cosine=fed.min_update_cosine,
        )
        # FedAvg only, and not under DP (a bound that depends on the other clients' updates would void its guarantee).
        self.clip = fed.clip_to_median and fed.aggregator == "fedavg" and not dp_enabled(cfg)
        self.round_sent: dict[int, float] = {}  # time.monotonic() when each round's training messages went out
        self.global_arrays: dict[int, ArrayRecord] = {}  # the model each round's clients started from
        self.previous_step: np.ndarray | None = None  # the global model's step in the previous round (None: unknown)
        self.train_replies: dict[int, RoundReplies] = {}
        self.evaluate_replies: dict[int, RoundReplies] = {}
        self.clients_online: dict[int, int] = {}  # connected edge clients when each round started
        self.clients_sampled: dict[int, int] = {}  # training messages sent in each round
        self.traffic = Traffic()  # bytes down and up per round and node

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.first_round
        self.start_round(server_round, arrays)
        online = len(list(grid.get_node_ids()))
        self.clients_online[server_round] = online
        if online < self.cfg.split.num_clients:
            log.warning("round %d: %d of %d edge clients online", server_round, online, self.cfg.split.num_clients)
        config = ConfigRecord({**config, **round_config(self.cfg, server_round)})
        if dp_enabled(self.cfg):
            config[KEY_CLIPPING_NORM] = self.cfg.federation.dp_clipping_norm
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.clients_sampled[server_round] = len(messages)
        self.traffic.sent(server_round, messages)
        self.round_sent[server_round] = time.monotonic()
        return messages

    def start_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """Keeps the model this round's clients start from and the step it took since the previous round's."""
        last = self.global_arrays.get(server_round - 1)
        self.previous_step = model_step(arrays, last) if last is not None else None
        self.global_arrays = {server_round: arrays}

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.first_round
        config = ConfigRecord({**config, **round_config(self.cfg, server_round)})
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.traffic.sent(server_round, messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.first_round
        replies = self._observe(server_round, "train", replies)
        screened = screen_replies(replies, self.spec)
        reference = self.global_arrays.get(server_round)
        kept, guarded = guard_updates(screened.kept, reference, self._round_limits(server_round), self.previous_step)
        rejected = screened.rejected + guarded
        record = self._log(server_round, "train", len(replies), kept, rejected, screened.failed)
        self.train_replies[server_round] = record
        if record.kept < min_clients_of(self.cfg):
            reasons = summarize_reasons(screened.failed + rejected) or "no replies"
            raise FederationError(
                f"round {server_round}: {record.kept} usable training replies of {len(replies)}, fewer than "
                f"federation.min_clients={min_clients_of(self.cfg)} ({reasons})"
            )
        if self.clip and reference is not None:
            record.clipped = clip_to_median(kept, reference)
        if dp_enabled(self.cfg):  # the noise is calibrated for a plain mean of clipped updates: weigh clients equally
            for msg in kept:
                msg.content["metrics"] = MetricRecord({**msg.content["metrics"], "num-examples": 1})
        # Flower's DP noise draws from numpy's global RNG: seeded per round, a resumed run adds the same noise.
        np.random.seed((self.cfg.seed * 1_000_003 + server_round) % 2**32)
        arrays, metrics = self.aggregator.aggregate_train(server_round, kept)
        if metrics is not None:
            record.metrics = dict(metrics)
        return (self._restore_dtypes(arrays) if arrays is not None else None), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.first_round
        replies = self._observe(server_round, "evaluate", replies)
        screened = screen_replies(replies, None)
        kept, guarded = guard_evaluations(screened.kept, self.limits)
        # A client with an empty held-out slice reports 0 examples: it carries no weight, drop it.
        kept = [m for m in kept if m.content["metrics"]["num-examples"] > 0]
        record = self._log(server_round, "evaluate", len(replies), kept, screened.rejected + guarded, screened.failed)
        self.evaluate_replies[server_round] = record
        metrics = super().aggregate_evaluate(server_round, kept) if kept else None
        if metrics is not None:
            record.metrics = dict(metrics)
        return metrics

    def _round_limits(self, server_round: int) -> GuardLimits:
        """The guard's limits, with train_seconds bounded by the time since this round's messages went out (a client
        cannot have trained longer than that; 5 % + 1 s slack for the clocks)."""
        sent = self.round_sent.get(server_round)
        if sent is None:
            return self.limits
        elapsed = time.monotonic() - sent
        bound = 1.05 * elapsed + 1.0
        if bound >= self.limits.max_seconds:
            return self.limits
        return dataclasses.replace(self.limits, max_seconds=bound,
                                   seconds_source=f"the {bound:.4g} s since the round's messages went out")

    def _observe(self, server_round: int, kind: str, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        self.traffic.received(server_round, replies)
        if self.observer is not None:
            for msg in replies:
                self.observer(kind, msg)
        return replies

    @staticmethod
    def _log(
        server_round: int,
        kind: str,
        sent: int,
        kept: list[Message],
        rejected: list[tuple[int, str]],
        failed: list[tuple[int, str]],
    ) -> RoundReplies:
        for node, reason in rejected:
            log.warning("round %d %s: rejected the reply of node %d: %s", server_round, kind, node, reason)
        for node, reason in failed:
            log.warning("round %d %s: node %d failed: %s", server_round, kind, node, reason)
        return RoundReplies(sent=sent, kept=len(kept), rejected=list(rejected), failed=list(failed))

    def _restore_dtypes(self, arrays: ArrayRecord) -> ArrayRecord:
        out = {}
        for name, array in arrays.items():
            dtype = self.spec[name][1]
            value = array.numpy()
            if str(value.dtype) != dtype:
                value = np.round(value) if np.dtype(dtype).kind in "iu" else value
                value = value.astype(dtype)
            out[name] = Array(np.ascontiguousarray(value))
        return ArrayRecord(out)


def summarize_reasons(reasons: list[tuple[int, str]], groups: int = 3) -> str:
    """'node 12, node 34: <reason>; node 56: <other reason>': identical reasons grouped, at most `groups` shown."""
    grouped: dict[str, list[int]] = {}
    for node, reason in reasons:
        grouped.setdefault(reason, []).append(node)
    parts = []
    for text, nodes in list(grouped.items())[:groups]:
        names = ", ".join(f"node {n}" for n in nodes[:5]) + (f" and {len(nodes) - 5} more" if len(nodes) > 5 else "")
        parts.append(f"{names}: {text}")
    return "; ".join(parts) + (f"; {len(grouped) - groups} other reasons" if len(grouped) > groups else "")
