"""The privacy boundary, enforced on the server before anything is aggregated, logged or stored.

A train reply may hold exactly one ArrayRecord "arrays" whose names, shapes and dtypes equal the
global model's state_dict and one MetricRecord "metrics" with exactly the named scalar training
metrics. An evaluate reply holds only the MetricRecord of evaluation scalars. Anything else (a
ConfigRecord, a second ArrayRecord, lists, unknown metric names that could smuggle pixel values one
scalar at a time) rejects the whole reply.

Array bytes are decoded here, never by np.load: they must be exactly the header np.save writes for
the model's dtype and shape followed by the values (no other .npy version, no .npz, no pickle, no
byte more or less), and the values must be finite. Every text a client chooses (names, an error
reply's reason) is bounded and sanitised before it reaches a log line, an exception or a record:
client-chosen names outside the allowed set are only counted, free text is cut to MAX_TEXT_CHARS
printable ASCII characters.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from torch import nn

TRAIN_METRICS = frozenset({"num-examples", "train_loss", "train_accuracy", "train_seconds"})
EVALUATE_METRICS = frozenset({"num-examples", "eval_loss", "eval_accuracy"})
# Metrics with a known range (inclusive); the rest only need to be finite.
MAX_LOSS = 100.0  # a cross-entropy this high means logit gaps of ~100: no trained model reports it; larger skews the curves
METRIC_RANGES = {
    "train_loss": (0.0, MAX_LOSS),
    "eval_loss": (0.0, MAX_LOSS),
    "train_accuracy": (0.0, 1.0),
    "eval_accuracy": (0.0, 1.0),
    "train_seconds": (0.0, math.inf),
}
NUMPY_STYPE = "numpy.ndarray"  # flwr's SType.NUMPY: the only serialisation accepted
MAX_TEXT_CHARS = 100  # the most characters of client-chosen free text (an error reason) that are logged or kept
MAX_REASON_CHARS = 400  # a whole rejection reason (server-written text around bounded client values)
MAX_NAMES_SHOWN = 3  # allowed names quoted in one problem before the rest are counted

ModelSpec = Mapping[str, tuple[tuple[int, ...], str]]  # state_dict name -> (shape, numpy dtype name)


class BoundaryError(ValueError):
    """Bytes or metadata that do not cross the boundary; str() is a server-written reason."""


def model_spec(model: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and numpy dtype names of the model's state_dict (what a client's arrays must match)."""
    return {
        name: (tuple(t.shape), str(t.detach().cpu().numpy().dtype)) for name, t in model.state_dict().items()
    }


# ---------------------------------------------------------------- bounded text


def bounded_text(text: object, limit: int = MAX_TEXT_CHARS) -> str:
    """At most `limit` printable ASCII characters of `text` on one line (other characters become spaces, runs of
    spaces one); a longer text is cut and its length given after the cut."""
    if not isinstance(text, str):
        return f"(a {bounded_text(type(text).__name__, 40)}, not text)"
    head = text[: 4 * limit]  # enough to fill `limit` after whitespace is collapsed; the rest is never scanned
    cleaned = " ".join("".join(c if c.isascii() and c.isprintable() else " " for c in head).split())
    if len(cleaned) <= limit and len(head) == len(text):
        return cleaned
    suffix = f"... ({len(text)} characters)"
    return cleaned[: max(0, limit - len(suffix))] + suffix


def names_shown(names: Iterable[object], allowed: Collection[str], what: str) -> str:
    """`names` for a reason: those in `allowed` quoted (up to MAX_NAMES_SHOWN), any others only counted."""
    names = list(names)
    known = sorted(n for n in names if isinstance(n, str) and n in allowed)
    unknown = len(names) - len(known)
    parts = [repr(n) for n in known[:MAX_NAMES_SHOWN]]
    if len(known) > MAX_NAMES_SHOWN:
        parts.append(f"{len(known) - MAX_NAMES_SHOWN} more")
    if unknown:
        parts.append(f"{unknown} {what} not in the allowed set")
    return "[" + ", ".join(parts) + "]"


def _number(value: object) -> str:
    """A client's number as at most ~12 characters."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"a {bounded_text(type(value).__name__, 40)}"
    if isinstance(value, int) and abs(value) < 10**12:
        return str(value)
    try:
        return f"{float(value):.4g}"
    except OverflowError:
        return "an integer beyond float range"


def _dtype_shown(dtype: object) -> str:
    """A client's dtype string, when it names a plain numpy dtype; else a placeholder."""
    try:
        if isinstance(dtype, str) and len(dtype) <= 12 and np.dtype(dtype).name == dtype:
            return dtype
    except (TypeError, ValueError):
        pass
    return "(unknown dtype)"


def _shape_shown(shape: object) -> str:
    if isinstance(shape, tuple) and len(shape) <= 8 and all(isinstance(d, int) and 0 <= d < 10**9 for d in shape):
        return str(shape)
    return "(malformed shape)"


# ---------------------------------------------------------------- arrays


@functools.lru_cache(maxsize=1024)
def npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The header np.save writes for a C-ordered array of this dtype and shape (.npy format 1.0)."""
    buffer = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def decode_array(array: Array, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The values of `array` as a read-only (shape) `dtype` array; BoundaryError unless its metadata are exactly
    (numpy, dtype, shape) and its bytes exactly np.save's header for them followed by the values."""
    if not isinstance(array, Array):
        raise BoundaryError(f"is a {bounded_text(type(array).__name__, 40)}, not an Array")
    if array.stype != NUMPY_STYPE:
        raise BoundaryError("is not serialised as a numpy array")
    if array.dtype != dtype or not isinstance(array.shape, tuple) or tuple(array.shape) != shape:
        raise BoundaryError(f"{_dtype_shown(array.dtype)}{_shape_shown(array.shape)} != model {dtype}{shape}")
    data = array.data
    if not isinstance(data, bytes):
        raise BoundaryError(f"holds a {bounded_text(type(data).__name__, 40)}, not bytes")
    header = npy_header(dtype, shape)
    expected = len(header) + np.dtype(dtype).itemsize * math.prod(shape)
    if len(data) != expected:
        raise BoundaryError(f"holds {len(data)} bytes, not the {expected} of np.save's {dtype}{shape} encoding")
    if not data.startswith(header):
        raise BoundaryError(f"has a header other than np.save's for {dtype}{shape}")
    return np.frombuffer(data, dtype=dtype, offset=len(header)).reshape(shape)


def _array_problems(arrays: ArrayRecord, spec: ModelSpec) -> list[str]:
    problems = []
    names = list(arrays.keys())
    missing = [name for name in spec if name not in arrays]
    extra = [name for name in names if name not in spec]
    if missing:
        problems.append(f"arrays lack {names_shown(missing, spec, 'names')}")
    if extra:
        problems.append(f"arrays have {len(extra)} name{'s' if len(extra) > 1 else ''} not in the model")
    for name in [name for name in spec if name in arrays]:
        shape, dtype = spec[name]
        try:
            value = decode_array(arrays[name], shape, dtype)
        except BoundaryError as err:
            problems.append(f"array {name!r}: {err}")
            continue
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            problems.append(f"array {name!r} has non-finite values")
    return problems


# ---------------------------------------------------------------- metrics and layout


def _metric_problems(metrics: MetricRecord, allowed: frozenset[str]) -> list[str]:
    problems = []
    keys = list(metrics.keys())
    extra = [key for key in keys if key not in allowed]
    missing = sorted(allowed - set(keys))
    if extra or missing:
        problems.append(
            "metrics must be exactly " + ", ".join(sorted(allowed))
            + (f"; {len(extra)} unexpected metric name{'s' if len(extra) > 1 else ''}" if extra else "")
            + (f"; missing {missing}" if missing else "")
        )
    for key in sorted(set(keys) & allowed):
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"metric {key!r} is {_number(value)}, not a scalar")
            continue
        low, high = METRIC_RANGES.get(key, (-math.inf, math.inf))
        try:
            inside = math.isfinite(value) and low <= value <= high
        except OverflowError:  # an int beyond float range
            inside = False
        if not inside:
            problems.append(f"metric {key!r}={_number(value)} is not finite or outside [{low:g}, {high:g}]")
    n = metrics.get("num-examples")
    if isinstance(n, float) or (isinstance(n, int) and n < 0):
        problems.append(f"metric 'num-examples'={_number(n)} must be an integer >= 0")
    return problems


def _record_layout_problems(content: RecordDict, expected: Mapping[str, type]) -> list[str]:
    """The reply's records must be exactly `expected` (name -> record type)."""
    layout = {key: type(record) for key, record in content.items()}
    if layout == dict(expected):
        return []
    want = ", ".join(f"{key!r}: {kind.__name__}" for key, kind in expected.items())
    wrong = [key for key, kind in expected.items() if key in layout and layout[key] is not kind]
    missing = [key for key in expected if key not in layout]
    extra = [key for key in layout if key not in expected]
    details = []
    if missing:
        details.append(f"missing {missing}")
    if wrong:
        details.append("wrong type for " + ", ".join(f"{key!r}" for key in wrong))
    if extra:
        kinds = sorted({bounded_text(layout[key].__name__, 40) for key in extra})
        details.append(f"{len(extra)} other record{'s' if len(extra) > 1 else ''} ({', '.join(kinds[:MAX_NAMES_SHOWN])})")
    return [f"records must be exactly {{{want}}}; " + "; ".join(details)]


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


def join_problems(problems: list[str]) -> str:
    """One bounded line: the problems joined with '; ' and cut to MAX_REASON_CHARS."""
    return bounded_text("; ".join(problems), MAX_REASON_CHARS)


# ---------------------------------------------------------------- screening


@dataclass(frozen=True)
class Screened:
    """The outcome of screening one round's replies; every reason is bounded, one-line, server-written text."""

    kept: list[Message]  # replies that may be aggregated
    rejected: list[tuple[int, str]]  # (node id, reason) of replies that crossed the boundary
    failed: list[tuple[int, str]]  # (node id, the client's error reason, bounded) of error replies


def screen_replies(replies: Iterable[Message], spec: ModelSpec | None) -> Screened:
    """Splits replies into kept / rejected / failed; `spec` None screens evaluate replies (metrics only). Only a
    node's first reply of the round is screened; any further one is rejected.

    No reply can raise out of here: a content the checks above do not foresee is rejected by its error type.
    """
    kept, rejected, failed = [], [], []
    seen: set[int] = set()
    for msg in replies:
        node = msg.metadata.src_node_id
        if node in seen:  # one node, one reply per round: a second one neither aggregates nor counts
            rejected.append((node, "a second reply from this node in the round (only its first counts)"))
            continue
        seen.add(node)
        try:
            if msg.has_error():
                failed.append((node, client_reason(msg.error.reason)))
                continue
            content = msg.content
            problems = train_reply_problems(content, spec) if spec is not None else evaluate_reply_problems(content)
        except Exception as err:  # noqa: BLE001 - one client's reply must never stop the federation
            problems = [f"the reply could not be screened ({bounded_text(type(err).__name__, 40)})"]
        if problems:
            rejected.append((node, join_problems(problems)))
        else:
            kept.append(msg)
    return Screened(kept, rejected, failed)


def client_reason(reason: object) -> str:
    """The client's own message out of an error reply's reason (Ray wraps it in a traceback), else the reason's last
    line; bounded to MAX_TEXT_CHARS printable characters (the rest is cut, its length given)."""
    if not isinstance(reason, str):
        return bounded_text(reason)
    marker = "ClientAppException occurred. Message:"
    start = reason.rfind(marker)
    text = reason[start + len(marker) :].split("'>", 1)[0] if start >= 0 else reason
    lines = [line for line in text.splitlines() if line.strip()]
    return bounded_text(lines[-1] if lines else text)
