"""A finished WebSocket session leaves no reference cycles behind.

Objects in cycles are freed only by the cyclic GC, whose gen-2 passes stop the event loop for
every client; under connection churn (the hostile-clients scenario) they paused the gateway
55-92 ms at a time when each ended session left 130-400 such objects (exception tracebacks
through a TaskGroup, websockets' parser generator, the transport and protocol pair). What
the GC frees is read from the gateway's own ``python_gc_objects_collected_total``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import websockets

from tests.gateway.helpers import Client, Stack, stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PRODUCT = "GC1-USD"
SESSIONS_PER_ENDING = 40
# before the fixes: 130-400 per session, then ~50 per 1009 close; now 0
MAX_COLLECTED_PER_SESSION = 5


@pytest.fixture(scope="module")
async def churn_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    root: Path = tmp_path_factory.mktemp("session-garbage")
    async with stack(
        root,
        COINBASE_PRODUCTS=PRODUCT,
        WS_MAX_FRAME_BYTES="4096",
        WS_CMDS_PER_SEC="1",
        WS_CMD_BURST="2",
        WS_FLOOD_STRIKES="3",
    ) as s:
        await s.feed.publish([(PRODUCT, 1)])
        await s.gateway.wait_latest(PRODUCT, 1)
        yield s


def _collected(s: Stack) -> float:
    return sum(
        s.gateway.metric("python_gc_objects_collected_total", generation=str(g)) for g in range(3)
    )


async def _until_no_connections(s: Stack) -> None:
    async with asyncio.timeout(10):
        while await asyncio.to_thread(s.gateway.metric, "ledgerflux_gateway_connections"):
            await asyncio.sleep(0.05)


async def _session(url: str, ending: str) -> None:
    client = await Client.connect(url)
    await client.expect("welcome")
    await client.send({"op": "subscribe", "id": 1, "products": [PRODUCT]})
    await client.expect("subscribed")
    await client.expect("snapshot")
    if ending == "client_close":
        await client.close()
    elif ending == "dropped":
        transport = client.ws.transport
        transport.abort()  # no close frame: the gateway finds the socket gone
        await client.close()
    elif ending == "too_big":  # websockets' parser closes it: over WS_MAX_FRAME_BYTES
        await client.ws.send("x" * 8192)
        assert await client.close_code() == 1009
    else:  # the session closes it: a command flood
        for n in range(10):
            await client.send({"op": "ping", "id": n})
        assert await client.close_code() == 1008


async def test_ended_sessions_leave_no_cyclic_garbage(churn_stack: Stack) -> None:
    """Sessions ended by the client, by a dropped socket, by websockets' parser (1009) and by
    the session itself (1008) are freed by reference counting: the cyclic GC collects next
    to nothing per session."""
    s = churn_stack
    url = s.gateway.url
    for _ in range(3):  # warm up: first-use caches and lazily built objects are not garbage
        await _session(url, "client_close")
    before = await asyncio.to_thread(_collected, s)
    endings = ("client_close", "dropped", "too_big", "flood")
    for _ in range(SESSIONS_PER_ENDING):
        for ending in endings:
            await _session(url, ending)
    await _until_no_connections(s)
    # the collections that find the churn's cycles, if any, run as the gateway allocates:
    # a few more sessions make sure the young generations were collected since
    for _ in range(5):
        await _session(url, "client_close")
    after = await asyncio.to_thread(_collected, s)
    sessions = SESSIONS_PER_ENDING * len(endings) + 5
    per_session = (after - before) / sessions
    assert per_session <= MAX_COLLECTED_PER_SESSION, (
        f"the cyclic GC collected {after - before:.0f} objects over {sessions} sessions "
        f"({per_session:.1f} each)"
    )


async def test_a_client_that_vanishes_right_after_the_upgrade_is_also_freed(
    churn_stack: Stack,
) -> None:
    """The websockets client library's own view: a socket closed right after the upgrade."""
    s = churn_stack
    before = await asyncio.to_thread(_collected, s)
    for _ in range(60):
        ws = await websockets.connect(s.gateway.url)
        ws.transport.abort()
        await ws.close()
    for _ in range(5):
        await _session(s.gateway.url, "client_close")
    after = await asyncio.to_thread(_collected, s)
    assert (after - before) / 65 <= MAX_COLLECTED_PER_SESSION, after - before
