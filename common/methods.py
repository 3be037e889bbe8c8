"""What each distillation method is made of: the one description that config validation, distillation,
the command line, the sweep and the report read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

MethodName = Literal["random", "dm", "dsv", "dm+dkkt"]


@dataclass(frozen=True)
class Method:
    """`uses_dm`: matches public-image embeddings (DM); `uses_dkkt`: the Deep KKT loss on the received model."""

    name: str
    uses_dm: bool
    uses_dkkt: bool
    summary: str

    def needs_model(self, init: str) -> bool:
        """Whether it needs the received model theta*: for the DKKT loss, or to rank public images (init=lambda)."""
        return self.uses_dkkt or init == "lambda"

    @property
    def optimises(self) -> bool:
        """Whether it optimises images (random only selects real ones)."""
        return self.uses_dm or self.uses_dkkt

    def needs_public(self, init: str) -> bool:
        """Whether it reads public images: to select or match them, or to start from them (init real or lambda)."""
        return not self.optimises or self.uses_dm or init != "noise"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("random", uses_dm=False, uses_dkkt=False, summary="ipc random public images per class"),
        Method("dm", uses_dm=True, uses_dkkt=False, summary="Distribution Matching on the public images"),
        Method("dsv", uses_dm=False, uses_dkkt=True, summary="Deep Support Vectors: the DKKT loss alone"),
        Method("dm+dkkt", uses_dm=True, uses_dkkt=True, summary="DM plus the DKKT loss (the paper's method)"),
    )
}
assert tuple(METHODS) == get_args(MethodName)


def method(name: str) -> Method:
    """The description of `name`; ValueError naming distill.method when unknown."""
    if name not in METHODS:
        raise ValueError(f"distill.method={name!r}: must be one of {', '.join(METHODS)}")
    return METHODS[name]
