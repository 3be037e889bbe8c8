"""Shared fixtures: a private decode cache per test session, and the real archive when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def real_archive() -> Path | None:
    """The CIFAR-10 archive: $FEDDISTILL_DATA if it is a file, else ../shared/data beside the checkout."""
    env = os.environ.get("FEDDISTILL_DATA")
    for candidate in (Path(env) if env else None, SHARED_ARCHIVE):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


@pytest.fixture
def archive() -> Path:
    path = real_archive()
    if path is None:
        pytest.skip("the CIFAR-10 archive is not here (set FEDDISTILL_DATA)")
    return path
