"""Fixtures of the gateway tests: gateways as real processes, a tick feed into MD_TICKS."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from services.devstack.servers import NatsServer
from tests.gateway.helpers import Feed, Gateway, Stack, stack
from tests.support.procs import ServiceProcess

StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def feed(nats_server: NatsServer) -> AsyncIterator[Feed]:
    """Publishes ticks to this test's nats-server (creates the streams first)."""
    feed = await Feed.connect(nats_server.url)
    yield feed
    await feed.close()


@pytest.fixture
def start_gateway(
    nats_server: NatsServer, service_logs: Path, spawn: list[ServiceProcess]
) -> StartGateway:
    """Start a gateway on this test's nats-server with extra env; killed after the test."""

    async def start(**env: str) -> Gateway:
        gateway = Gateway(service_logs, nats_server.url, **env)
        spawn.append(gateway.proc)
        return await gateway.start()

    return start


@pytest.fixture(scope="session")
async def default_gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """One gateway with default settings (and its own nats-server) for the whole session:
    protocol conformance and the web page share it (each gateway start costs seconds)."""
    # NIL-USD is configured and never published: its snapshot stays null
    async with stack(
        tmp_path_factory.mktemp("default-gateway"), COINBASE_PRODUCTS="BTC-USD,ETH-USD,NIL-USD"
    ) as shared:
        yield shared
