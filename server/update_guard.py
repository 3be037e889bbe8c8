"""The update guard: checks a round's screened replies against each other, the global model and the split.

server/boundary.py decides what may cross the edge->server boundary (layout, names, shapes, dtypes, exact
bytes, finite values, scalar metrics in range). This module runs after it and rejects replies that are
well-formed but implausible:
  - a claimed num-examples above the largest train slice (train replies) or held-out slice (evaluate
    replies) the server's split gave any client, so one client weighs at most what the biggest shard weighs;
  - a train_seconds above federation.round_timeout (the reply could not have arrived);
  - an update norm ||w_client - w_global|| above `max_norm_ratio` x the round's median (with >= 3 replies,
    so that the median means something);
  - an update norm above `max_global_ratio` x ||w_global|| (any number of replies: with 2, the median
    cannot tell the honest update from the other);
  - an update whose cosine with the round's coordinate-wise median update, or with the previous round's aggregate
    update (the step the global model took last round), is below `min_cosine` (with >= 3 replies): a reversed
    update (the sign-flip poisoning attack) points away from what most clients agree on, and from where training was
    going; the second reference is one an attacker in this round cannot pull;
  - a weight array the global model has non-zero that comes back all zeros (a wiped model);
  - with DP on, an update norm above the clipping norm (the client skipped fixedclipping_mod).

`clip_to_median` then bounds every kept update's norm by the round's (lower) median update norm before FedAvg
(federation.clip_to_median), so that no reply that passed weighs more than a typical one; with 2 replies that is the
smaller of the two norms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from server.boundary import decode_array

MIN_REPLIES_FOR_RATIO = 3
CLIP_SLACK = 1e-3  # relative float32 slack on the clipping norm (clip, add back, subtract again)


@dataclass(frozen=True)
class GuardLimits:
    """What the guard enforces in one federation."""

    max_train_examples: int | None  # the largest client train slice of the split; None: no upper bound
    max_eval_examples: int | None  # the largest client held-out slice; None: no upper bound
    max_norm_ratio: float  # federation.max_update_norm_ratio (against the round's median)
    max_global_ratio: float  # federation.max_update_global_ratio (against the global model's norm)
    max_seconds: float = math.inf  # federation.round_timeout, or the seconds since the round's messages went out
    clipping_norm: float | None = None  # federation.dp_clipping_norm when DP is on
    min_cosine: float | None = None  # federation.min_update_cosine; None: no direction check
    seconds_source: str | None = None  # what max_seconds is, for the reason; None: federation.round_timeout


def model_norm(arrays: ArrayRecord) -> float:
    """||w||_2 over the floating-point arrays of a server-made record."""
    values = [array.numpy() for array in arrays.values()]
    return math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in values if v.dtype.kind == "f"))


def flat_update(arrays: ArrayRecord, reference: ArrayRecord) -> np.ndarray:
    """w - w_ref over the floating-point arrays, flattened into one float64 vector (`arrays` passed the boundary)."""
    parts = []
    for name, ref in reference.items():
        ref_value = ref.numpy()
        if ref_value.dtype.kind == "f":
            value = decode_array(arrays[name], ref_value.shape, str(ref_value.dtype))
            parts.append((value.astype(np.float64) - ref_value.astype(np.float64)).ravel())
    return np.concatenate(parts) if parts else np.zeros(0)


def update_norm(arrays: ArrayRecord, reference: ArrayRecord) -> float:
    """||w - w_ref||_2 over the floating-point arrays (integer buffers such as BatchNorm counters are left out).

    `arrays` must have passed server/boundary.py (it is decoded strictly, against `reference`'s shapes and dtypes).
    """
    return float(np.linalg.norm(flat_update(arrays, reference)))


def lower_median(values: Sequence[float]) -> float:
    """The lower median: the middle value of an odd count, the smaller middle one of an even count."""
    return float(sorted(values)[(len(values) - 1) // 2])


def model_step(new: ArrayRecord, old: ArrayRecord) -> np.ndarray:
    """new - old over the floating-point arrays of two server-made records, flattened (float64): the step the global
    model took in a round."""
    parts = [(new[name].numpy().astype(np.float64) - ref.numpy().astype(np.float64)).ravel()
             for name, ref in old.items() if ref.numpy().dtype.kind == "f"]
    return np.concatenate(parts) if parts else np.zeros(0)


def guard_updates(
    replies: Sequence[Message], reference: ArrayRecord | None, limits: GuardLimits, previous_step: np.ndarray | None = None
) -> tuple[list[Message], list[tuple[int, str]]]:
    """(kept, [(node id, reason), ...]) for train replies that already passed server/boundary.py.

    `reference` is the global model the clients started from; without it only the metrics are checked.
    `previous_step` is the previous round's aggregate update (`model_step`), None in a run's first round.
    """
    kept, rejected = [], []
    updates = [flat_update(msg.content["arrays"], reference) for msg in replies] if reference is not None else []
    norms = [float(np.linalg.norm(u)) for u in updates] or [0.0] * len(replies)
    enough = reference is not None and len(replies) >= MIN_REPLIES_FOR_RATIO
    median = float(np.median(norms)) if enough else None
    global_norm = model_norm(reference) if reference is not None else None
    direction = enough and limits.min_cosine is not None
    cosines = _median_cosines(updates) if direction else [None] * len(replies)
    onward = ([_cosine(u, previous_step) for u in updates] if direction and previous_step is not None and np.any(previous_step)
              else [None] * len(replies))
    for msg, norm, cosine, step_cosine in zip(replies, norms, cosines, onward, strict=True):
        metrics = msg.content["metrics"]
        reason = _examples_problem(int(metrics["num-examples"]), limits.max_train_examples, "train")
        if reason is None and metrics["train_seconds"] > limits.max_seconds:
            source = limits.seconds_source or f"federation.round_timeout={limits.max_seconds:g}"
            reason = f"metric 'train_seconds'={metrics['train_seconds']:.4g} exceeds {source}"
        reason = reason or _norm_problem(norm, median, global_norm, limits)
        if reason is None and cosine is not None and cosine < limits.min_cosine:
            reason = (
                f"update points away from the round's coordinate-wise median update (cosine {cosine:.3f} < "
                f"federation.min_update_cosine={limits.min_cosine:g})"
            )
        if reason is None and step_cosine is not None and step_cosine < limits.min_cosine:
            reason = (
                f"update points away from the previous round's aggregate update (cosine {step_cosine:.3f} < "
                f"federation.min_update_cosine={limits.min_cosine:g})"
            )
        if reason is None and reference is not None:
            reason = _wiped_array(msg.content["arrays"], reference)
        if reason:
            rejected.append((msg.metadata.src_node_id, reason))
        else:
            kept.append(msg)
    return kept, rejected


def _cosine(u: np.ndarray, v: np.ndarray) -> float:
    """Cosine similarity (0 when either is a zero vector)."""
    denominator = float(np.linalg.norm(u)) * float(np.linalg.norm(v))
    return float(u @ v) / denominator if denominator > 0 else 0.0


def _median_cosines(updates: Sequence[np.ndarray]) -> list[float]:
    """Each update's cosine similarity with the coordinate-wise median of all of them."""
    median = np.median(np.stack(updates), axis=0)
    return [_cosine(u, median) for u in updates]


def _wiped_array(arrays: ArrayRecord, reference: ArrayRecord) -> str | None:
    for name, ref in reference.items():
        ref_value = ref.numpy()
        if ref_value.dtype.kind == "f" and np.any(ref_value):
            value = decode_array(arrays[name], ref_value.shape, str(ref_value.dtype))
            if not np.any(value):
                return f"array {name!r} is all zeros (the global model's is not)"
    return None


def clip_to_median(replies: Sequence[Message], reference: ArrayRecord) -> int:
    """Scales every update ||w - w_ref|| above the replies' lower median norm down to it, in place (the
    floating-point arrays; integer buffers stay); returns how many were scaled."""
    norms = [update_norm(msg.content["arrays"], reference) for msg in replies]
    if not norms:
        return 0
    bound = lower_median(norms)
    clipped = 0
    for msg, norm in zip(replies, norms, strict=True):
        if norm <= bound:
            continue
        scale = bound / norm
        arrays = msg.content["arrays"]
        out = {}
        for name, ref in reference.items():
            ref_value = ref.numpy()
            value = arrays[name].numpy()
            if ref_value.dtype.kind == "f":
                value = (ref_value.astype(np.float64) + scale * (value.astype(np.float64) - ref_value)).astype(ref_value.dtype)
            out[name] = Array(np.ascontiguousarray(value))
        msg.content["arrays"] = ArrayRecord(out)
        clipped += 1
    return clipped


def guard_evaluations(replies: Sequence[Message], limits: GuardLimits) -> tuple[list[Message], list[tuple[int, str]]]:
    """(kept, [(node id, reason), ...]) for evaluate replies that already passed server/boundary.py."""
    kept, rejected = [], []
    for msg in replies:
        reason = _examples_problem(int(msg.content["metrics"]["num-examples"]), limits.max_eval_examples, "held-out")
        if reason:
            rejected.append((msg.metadata.src_node_id, reason))
        else:
            kept.append(msg)
    return kept, rejected


def _examples_problem(num_examples: int, limit: int | None, kind: str) -> str | None:
    if limit is not None and num_examples > limit:
        return f"metric 'num-examples'={num_examples} exceeds the largest {kind} slice of any client ({limit} images)"
    return None


def _norm_problem(norm: float, median: float | None, global_norm: float | None, limits: GuardLimits) -> str | None:
    if limits.clipping_norm is not None and norm > limits.clipping_norm * (1 + CLIP_SLACK):
        return f"update norm {norm:.4g} exceeds federation.dp_clipping_norm={limits.clipping_norm:g} (not clipped)"
    if median is not None and median > 0 and norm > limits.max_norm_ratio * median:
        return (
            f"update norm {norm:.4g} is {norm / median:.1f}x the round's median {median:.4g} "
            f"(federation.max_update_norm_ratio={limits.max_norm_ratio:g})"
        )
    if global_norm is not None and global_norm > 0 and norm > limits.max_global_ratio * global_norm:
        return (
            f"update norm {norm:.4g} is {norm / global_norm:.3g}x the global model's norm {global_norm:.4g} "
            f"(federation.max_update_global_ratio={limits.max_global_ratio:g})"
        )
    return None
