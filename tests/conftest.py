"""Shared fixtures: the real archive when present, and the `reliability` recorder behind docs/reliability.md."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from simulations.reports.reliability_report import RELIABILITY_ENV

_ROWS: list[dict[str, str]] = []
_TMP = re.compile(r"/\S*?/pytest-\d+/[^/\s:]+")  # a test's tmp_path, shown as <tmp> in the report
_OUTCOMES: dict[str, str] = {}

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


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Callable[[str, str, str], None]:
    """record(area, fault, outcome): one row of docs/reliability.md (`python -m simulations.reliability_report`)."""

    def record(area: str, fault: str, outcome: str) -> None:
        _ROWS.append({"area": area, "fault": fault, "outcome": _TMP.sub("<tmp>", outcome), "test": request.node.nodeid})

    return record


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    report = (yield).get_result()
    if report.when == "call" or report.failed:
        _OUTCOMES[item.nodeid] = "failed" if report.failed else report.outcome


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get(RELIABILITY_ENV)
    if path:
        rows = [{**row, "result": _OUTCOMES.get(row["test"], "not run")} for row in _ROWS]
        Path(path).write_text(json.dumps(rows, indent=1) + "\n")
