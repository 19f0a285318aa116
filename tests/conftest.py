"""Test-wide fixtures: the real servers of the embedded dev stack (services.devstack)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import ServiceProcess

pytest_plugins = ["services.devstack.pytest_fixtures"]


@pytest.fixture
def service_logs(tmp_path: Path) -> Path:
    path = tmp_path / "service-logs"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture
def spawn(service_logs: Path) -> Iterator[list[ServiceProcess]]:
    """Processes started in a test; any still running at its end are killed."""
    started: list[ServiceProcess] = []
    yield started
    for proc in started:
        proc.kill()
