"""pytest fixtures backed by real servers; register with
``pytest_plugins = ["services.devstack.pytest_fixtures"]`` in the top-level conftest.

- ``devstack`` (session): one ``DevStack`` on free ports for the whole run, under
  pytest's temp dir, stopped at the end. DynamoDB Local is installed once into
  ``<rootdir>/.devstack/tools/dynamodb`` and reused across runs.
- ``devstack_env`` (session): ``devstack.env()``, the services' env vars.
- ``nats_server`` (function): a fresh ``NatsServer`` with JetStream on free ports
  and an empty store, for tests that kill, restart or fill it (~30 ms).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.devstack.servers import NatsServer
from services.devstack.stack import DevStack, StackPorts

__all__ = ["devstack", "devstack_env", "nats_server"]


def tools_dir(config: pytest.Config) -> Path:
    """Where DynamoDB Local is installed: kept between runs, unlike pytest's temp dirs."""
    return config.rootpath / ".devstack" / "tools" / "dynamodb"


@pytest.fixture(scope="session")
def devstack(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[DevStack]:
    """All four servers on free ports, started once per test session."""
    stack = DevStack(
        tmp_path_factory.mktemp("devstack"),
        StackPorts.free(),
        tools_dir=tools_dir(pytestconfig),
    )
    with stack:
        yield stack


@pytest.fixture(scope="session")
def devstack_env(devstack: DevStack) -> dict[str, str]:
    """``NATS_URLS``, ``DDB_ENDPOINT_URL``, ``S3_ENDPOINT_URL``, ``AWS_*``, ``REDIS_URL``."""
    return devstack.env()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A JetStream nats-server of this test's own; stopped (or reaped if killed) after it."""
    server = NatsServer.on_free_ports(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()
