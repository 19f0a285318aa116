"""Two gateway replicas share the per-API-key connection limit through Redis, and a replica
killed with its connections open stops counting once its lease runs out."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from websockets.exceptions import ConnectionClosed

from services.devstack.servers import NatsServer
from services.devstack.stack import DevStack
from tests.gateway.helpers import Client, Gateway
from tests.support.procs import ServiceProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

KEY, OTHER = "shared-key-31d0", "other-key-5be1"


async def _connect(gateway: Gateway, key: str) -> Client | None:
    """A served client, or ``None`` when the gateway closed the socket with 1013."""
    client = await Client.connect(f"{gateway.url}?token={key}")
    try:
        first = await client.recv()
    except ConnectionClosed as exc:
        assert exc.rcvd is not None and exc.rcvd.code == 1013, exc
        return None
    assert first["type"] == "welcome", first
    return client


async def _admitted(gateway: Gateway, key: str) -> Client:
    client = await _connect(gateway, key)
    assert client is not None, "refused with 1013"
    return client


async def _refused(gateway: Gateway, key: str) -> bool:
    client = await _connect(gateway, key)
    if client is None:
        return True
    await client.close()
    return False


async def test_two_replicas_enforce_one_limit_per_key_and_a_dead_replica_expires(
    devstack: DevStack, nats_server: NatsServer, service_logs: Path, spawn: list[ServiceProcess]
) -> None:
    """Limit 3 per key across replicas A and B: 2 on A + 1 on B fill it, a 4th is closed with
    1013 on either, another key is unaffected, a freed slot moves between replicas; after
    ``kill -9`` of A its connection still counts until its lease (3 s) passes, then B admits
    again. Redis only ever sees key hashes."""
    redis_url = devstack.env()["REDIS_URL"]
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    env = {
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": prefix,
        "GATEWAY_API_KEYS": f"{KEY},{OTHER}",
        "WS_MAX_CONNECTIONS_PER_KEY": "3",
        "REDIS_LEASE_S": "3",
    }
    a = Gateway(service_logs, nats_server.url, **env)
    b = Gateway(service_logs, nats_server.url, **env)
    spawn.extend([a.proc, b.proc])
    await asyncio.gather(a.start(), b.start())

    on_a = [await _admitted(a, KEY), await _admitted(a, KEY)]
    on_b = [await _admitted(b, KEY)]
    assert await _refused(a, KEY)
    assert await _refused(b, KEY)
    other = await _admitted(b, OTHER)
    assert await b.wait_metric("ledgerflux_gateway_key_limit_rejected_total", 1, scope="shared")

    # a slot freed on A is usable on B
    await on_a.pop().close()
    deadline = time.monotonic() + 5
    while (moved := await _connect(b, KEY)) is None:
        assert time.monotonic() < deadline, "the slot freed on A never reached B"
        await asyncio.sleep(0.1)
    on_b.append(moved)

    async with aioredis.Redis.from_url(redis_url, decode_responses=True) as redis:
        keys = [str(k) for k in await redis.keys(prefix + "*")]
    assert keys and all(KEY not in k and OTHER not in k for k in keys), keys

    # A dies holding one connection: it counts until A's lease runs out, then B admits
    a.proc.kill()
    killed = time.monotonic()
    assert await _refused(b, KEY)
    while (late := await _connect(b, KEY)) is None:
        assert time.monotonic() - killed < 8, "the dead replica's count never expired"
        await asyncio.sleep(0.2)
    assert time.monotonic() - killed > 0.5
    for client in [*on_b, other, late]:
        await client.close()
