"""The one converter between a model's parameters and a Flower ArrayRecord (checks names, shapes, dtypes)."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord
from torch import nn


def model_to_record(model: nn.Module) -> ArrayRecord:
    """The model's state_dict as an ArrayRecord (tensors detached to CPU)."""
    return ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})


def record_to_state_dict(record: ArrayRecord, reference: nn.Module) -> dict[str, torch.Tensor]:
    """A state_dict for `reference` from `record`, or ValueError naming every mismatched entry."""
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"expected an ArrayRecord, got {type(record).__name__}")
    expected = reference.state_dict()
    got = record.to_torch_state_dict()
    problems = []
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing:
        problems.append(f"missing keys {missing}")
    if extra:
        problems.append(f"unexpected keys {extra}")
    for name in sorted(set(expected) & set(got)):
        want, have = expected[name], got[name]
        if tuple(have.shape) != tuple(want.shape):
            problems.append(f"{name}: shape {tuple(have.shape)} != expected {tuple(want.shape)}")
        elif have.dtype != want.dtype:
            problems.append(f"{name}: dtype {have.dtype} != expected {want.dtype}")
    if problems:
        raise ValueError("model arrays do not match the model: " + "; ".join(problems))
    return got


def load_record_into(model: nn.Module, record: ArrayRecord) -> nn.Module:
    """Loads a checked ArrayRecord into `model` in place and returns it."""
    model.load_state_dict(record_to_state_dict(record, model))
    return model
