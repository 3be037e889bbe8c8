"""The privacy boundary, enforced on the server before anything is aggregated or stored.

A train reply may hold exactly one ArrayRecord "arrays" whose names, shapes and dtypes equal the
global model's state_dict (finite values, no bytes beyond the arrays themselves) and one
MetricRecord "metrics" with exactly the named scalar training metrics. An evaluate reply holds only
the MetricRecord of evaluation scalars. Anything else (a ConfigRecord, a second ArrayRecord, lists,
unknown metric names that could smuggle pixel values one scalar at a time) rejects the whole reply.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from torch import nn

TRAIN_METRICS = frozenset({"num-examples", "train_loss", "train_accuracy", "train_seconds"})
EVALUATE_METRICS = frozenset({"num-examples", "eval_loss", "eval_accuracy"})
# np.save's header (magic, version, dict literal) is at most a few hundred bytes; more means a hidden payload.
MAX_ARRAY_HEADER_BYTES = 4096

ModelSpec = Mapping[str, tuple[tuple[int, ...], str]]  # state_dict name -> (shape, numpy dtype name)


def model_spec(model: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and numpy dtype names of the model's state_dict (what a client's arrays must match)."""
    return {
        name: (tuple(t.shape), str(t.detach().cpu().numpy().dtype)) for name, t in model.state_dict().items()
    }


def _metric_problems(metrics: MetricRecord, allowed: frozenset[str]) -> list[str]:
    problems = []
    keys = set(metrics.keys())
    if keys != allowed:
        extra, missing = sorted(keys - allowed), sorted(allowed - keys)
        problems.append(
            "metrics must be exactly " + ", ".join(sorted(allowed))
            + (f"; unexpected {extra}" if extra else "")
            + (f"; missing {missing}" if missing else "")
        )
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"metric {key!r} is a {type(value).__name__}, not a scalar")
        elif not math.isfinite(value):
            problems.append(f"metric {key!r} is not finite ({value})")
    n = metrics.get("num-examples")
    if isinstance(n, float) or (isinstance(n, int) and n < 0):
        problems.append(f"metric 'num-examples'={n!r} must be an integer >= 0")
    return problems


def _array_problems(arrays: ArrayRecord, spec: ModelSpec) -> list[str]:
    problems = []
    missing, extra = sorted(set(spec) - set(arrays)), sorted(set(arrays) - set(spec))
    if missing:
        problems.append(f"arrays lack {missing}")
    if extra:
        problems.append(f"arrays have names not in the model {extra}")
    for name in sorted(set(spec) & set(arrays)):
        want_shape, want_dtype = spec[name]
        array = arrays[name]
        if tuple(array.shape) != want_shape or array.dtype != want_dtype:
            problems.append(f"array {name!r}: {array.dtype}{tuple(array.shape)} != model {want_dtype}{want_shape}")
            continue
        try:
            value = array.numpy()
        except Exception as err:  # noqa: BLE001 - any undecodable payload is a rejection, not a crash
            problems.append(f"array {name!r} cannot be decoded ({type(err).__name__})")
            continue
        if value.shape != want_shape or str(value.dtype) != want_dtype:
            problems.append(f"array {name!r} decodes to {value.dtype}{value.shape}, not {want_dtype}{want_shape}")
        elif len(array.data) > value.nbytes + MAX_ARRAY_HEADER_BYTES:
            problems.append(f"array {name!r} carries {len(array.data) - value.nbytes} bytes beyond its values")
        elif value.dtype.kind == "f" and not np.isfinite(value).all():
            problems.append(f"array {name!r} has non-finite values")
    return problems


def train_reply_problems(content: RecordDict, spec: ModelSpec) -> list[str]:
    """Why a train reply crosses the boundary (empty list: it does not)."""
    problems = _record_layout_problems(content, {"arrays": ArrayRecord, "metrics": MetricRecord})
    if isinstance(content.get("arrays"), ArrayRecord):
        problems += _array_problems(content["arrays"], spec)
    if isinstance(content.get("metrics"), MetricRecord):
        problems += _metric_problems(content["metrics"], TRAIN_METRICS)
        if content["metrics"].get("num-examples") == 0:
            problems.append("metric 'num-examples' is 0 (nothing was trained)")
    return problems


def evaluate_reply_problems(content: RecordDict) -> list[str]:
    """Why an evaluate reply crosses the boundary (empty list: it does not)."""
    problems = _record_layout_problems(content, {"metrics": MetricRecord})
    if isinstance(content.get("metrics"), MetricRecord):
        problems += _metric_problems(content["metrics"], EVALUATE_METRICS)
    return problems


def _record_layout_problems(content: RecordDict, expected: Mapping[str, type]) -> list[str]:
    problems = []
    layout = {key: type(record).__name__ for key, record in content.items()}
    want = {key: kind.__name__ for key, kind in expected.items()}
    if layout != want:
        problems.append(f"records must be exactly {want}, got {layout}")
    return problems


@dataclass(frozen=True)
class Screened:
    """The outcome of screening one round's replies."""

    kept: list[Message]  # replies that may be aggregated
    rejected: list[tuple[int, str]]  # (node id, reason) of replies that crossed the boundary
    failed: list[tuple[int, str]]  # (node id, error reason) of replies that carry an error instead of content


def screen_replies(replies: Iterable[Message], spec: ModelSpec | None) -> Screened:
    """Splits replies into kept / rejected / failed; `spec` None screens evaluate replies (metrics only)."""
    kept, rejected, failed = [], [], []
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            failed.append((node, msg.error.reason))
            continue
        problems = train_reply_problems(msg.content, spec) if spec is not None else evaluate_reply_problems(msg.content)
        if problems:
            rejected.append((node, "; ".join(problems)))
        else:
            kept.append(msg)
    return Screened(kept, rejected, failed)
