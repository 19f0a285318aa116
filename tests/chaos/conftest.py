"""Fixtures and markers of the chaos suite (issue #10).

``chaos`` marks every test here (``make chaos``); ``chaos_fast`` the subset that runs in a
few minutes (``make test``). Both are registered here too, so ``--strict-markers`` passes
before pyproject.toml lists them.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from services.devstack.stack import DevStack
from tests.chaos.harness import StoreEnv
from tests.chaos.runner import REPORTS


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "chaos: fault-injection scenarios on the whole pipeline (make chaos)"
    )
    config.addinivalue_line("markers", "chaos_fast: the chaos scenarios short enough for make test")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORTS:
        terminalreporter.section("chaos ledgers")
        for text in REPORTS:
            terminalreporter.write_line(text)
            terminalreporter.write_line("")


@pytest.fixture
def chaos_store(devstack: DevStack) -> StoreEnv:
    """The session's DynamoDB Local and S3, with a table and bucket of this test's own."""
    tag = uuid.uuid4().hex[:8]
    return StoreEnv(devstack.env(), f"chaos-{tag}", f"chaos-{tag}")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "chaos"
    path.mkdir()
    return path
