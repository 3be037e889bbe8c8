"""The update guard: checks a round's screened train replies against each other and the global model.

server/boundary.py decides what may cross the edge->server boundary (layout, names, shapes, dtypes, finite
values, scalar metrics). This module runs after it and rejects updates that are well-formed but implausible:
  - a claimed num-examples above the largest possible shard (the private pool), which would let one
    client outweigh all others in FedAvg;
  - an update norm ||w_client - w_global|| above `max_norm_ratio` x the round's median (only with >= 3
    replies, so that the median means something);
  - with DP on, an update norm above the clipping norm (the client skipped fixedclipping_mod).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message

from server.boundary import decode_array

MIN_REPLIES_FOR_RATIO = 3
CLIP_SLACK = 1e-3  # relative float32 slack on the clipping norm (clip, add back, subtract again)


@dataclass(frozen=True)
class GuardLimits:
    """What the guard enforces in one federation."""

    max_examples: int | None  # the private pool size; None: no upper bound
    max_norm_ratio: float  # federation.max_update_norm_ratio
    clipping_norm: float | None = None  # federation.dp_clipping_norm when DP is on


def update_norm(arrays: ArrayRecord, reference: ArrayRecord) -> float:
    """||w - w_ref||_2 over the floating-point arrays (integer buffers such as BatchNorm counters are left out).

    `arrays` must have passed server/boundary.py (it is decoded strictly, against `reference`'s shapes and dtypes).
    """
    total = 0.0
    for name, ref in reference.items():
        ref_value = ref.numpy()
        if ref_value.dtype.kind == "f":
            value = decode_array(arrays[name], ref_value.shape, str(ref_value.dtype))
            total += float(np.sum((value.astype(np.float64) - ref_value.astype(np.float64)) ** 2))
    return math.sqrt(total)


def guard_updates(
    replies: Sequence[Message], reference: ArrayRecord | None, limits: GuardLimits
) -> tuple[list[Message], list[tuple[int, str]]]:
    """(kept, [(node id, reason), ...]) for replies that already passed server/boundary.py.

    `reference` is the global model the clients started from; without it only num-examples is checked.
    """
    kept, rejected = [], []
    norms = [update_norm(msg.content["arrays"], reference) if reference is not None else 0.0 for msg in replies]
    median = float(np.median(norms)) if reference is not None and len(norms) >= MIN_REPLIES_FOR_RATIO else None
    for msg, norm in zip(replies, norms, strict=True):
        reason = _problem(int(msg.content["metrics"]["num-examples"]), norm, median, limits)
        if reason:
            rejected.append((msg.metadata.src_node_id, reason))
        else:
            kept.append(msg)
    return kept, rejected


def _problem(num_examples: int, norm: float, median: float | None, limits: GuardLimits) -> str | None:
    if limits.max_examples is not None and num_examples > limits.max_examples:
        return f"metric 'num-examples'={num_examples} exceeds the private pool ({limits.max_examples} images)"
    if limits.clipping_norm is not None and norm > limits.clipping_norm * (1 + CLIP_SLACK):
        return f"update norm {norm:.4g} exceeds federation.dp_clipping_norm={limits.clipping_norm:g} (not clipped)"
    if median is not None and median > 0 and norm > limits.max_norm_ratio * median:
        return (
            f"update norm {norm:.4g} is {norm / median:.1f}x the round's median {median:.4g} "
            f"(federation.max_update_norm_ratio={limits.max_norm_ratio:g})"
        )
    return None
