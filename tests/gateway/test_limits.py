"""Outbound rate limit and conflation accuracy, slow consumers (4008) and the abuse closes:
oversized frame (1009), command flood (1008), too many connections (1013)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from itertools import pairwise

import pytest
import websockets

from services.gateway.frames import PING_BURST
from tests.gateway.conftest import StartGateway
from tests.gateway.helpers import (
    Client,
    Feed,
    Stack,
    produce_twice_the_limit,
    stack,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def test_rate_limit_caps_ticks_and_conflation_accounts_for_every_tick(
    start_gateway: StartGateway, feed: Feed
) -> None:
    """A client limited to R ticks/s with burst B receives at most R·t + B ticks in t seconds;
    each product still ends on its newest tick, and per product received + Σ skipped =
    published, with seq strictly increasing."""
    rate, burst = 100, 40
    gateway = await start_gateway(WS_MAX_MSGS_PER_SEC=str(rate), WS_BURST=str(burst))
    products = ["RL1-USD", "RL2-USD", "RL3-USD"]
    await feed.publish((p, 1) for p in products)  # seen on MD_TICKS: served
    await gateway.wait_latest(products[-1], 1)
    connected = time.monotonic()  # the bucket is created after this, full
    client = await Client.connect(gateway.url)
    await client.send({"op": "subscribe", "products": products, "snapshot": False})
    await client.expect("subscribed")

    producer = asyncio.create_task(produce_twice_the_limit(feed, products))
    while not producer.done():
        await client.drain(quiet_s=0.05, timeout=0.1)
        elapsed = time.monotonic() - connected
        count = len(client.of_type("tick"))
        assert count <= rate * elapsed + burst + 3, f"{count} ticks in {elapsed:.2f}s"
    await producer
    await client.drain(quiet_s=0.5)
    elapsed = time.monotonic() - connected
    ticks = client.of_type("tick")
    assert len(ticks) <= rate * elapsed + burst + 3
    assert len(ticks) >= rate * (elapsed - 1.0), "the limit starved the client"
    for product in products:
        got = client.ticks(product)
        published = feed.published[product][1:]  # the first was published before subscribing
        assert all(a["seq"] < b["seq"] for a, b in pairwise(got)), product
        assert got[-1]["seq"] == published[-1], f"{product} did not end on its newest tick"
        assert len(got) + sum(t.get("skipped", 0) for t in got) == len(published), product
    assert sum(t.get("skipped", 0) for t in ticks) > 0, "the test never conflated"
    await client.close()


ABUSE_ENV = {
    "WS_MAX_CONNECTIONS": "3",
    "WS_MAX_FRAME_BYTES": "1024",
    "WS_CMDS_PER_SEC": "5",
    "WS_CMD_BURST": "5",
    "WS_FLOOD_STRIKES": "10",
    "WS_FLOOD_WINDOW_S": "1",
    "WS_SEND_QUEUE": "16",
    "WS_SLOW_CONSUMER_S": "0.5",
    "WS_MAX_MSGS_PER_SEC": "1000000",
    "WS_BURST": "1000000",
}


@pytest.fixture(scope="module")
async def abuse(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with stack(tmp_path_factory.mktemp("abuse"), **ABUSE_ENV) as shared:
        yield shared


@pytest.fixture
async def gw(abuse: Stack) -> Stack:
    """The abuse gateway once the previous test's sockets are gone (its limit is 3)."""
    deadline = time.monotonic() + 10
    while await asyncio.to_thread(abuse.gateway.metric, "ledgerflux_gateway_connections") > 0:
        assert time.monotonic() < deadline, "connections of an earlier test never closed"
        await asyncio.sleep(0.05)
    return abuse


async def test_an_oversized_frame_closes_with_1009(gw: Stack) -> None:
    """A frame over WS_MAX_FRAME_BYTES closes the connection with 1009."""
    client = await Client.connect(gw.gateway.url)
    await client.recv()
    await client.ws.send('{"op": "ping", "id": "' + "x" * 2000 + '"}')
    assert await client.close_code() == 1009


async def test_a_command_flood_gets_rate_limited_then_closed_with_1008(gw: Stack) -> None:
    """Commands past the inbound bucket get ``rate_limited`` errors; persistent flooding
    (WS_FLOOD_STRIKES of them) closes with 1008."""
    client = await Client.connect(gw.gateway.url)
    for i in range(40):
        await client.send({"op": "ping", "id": i})
    assert await client.close_code() == 1008
    pongs = client.of_type("pong")
    limited = [m for m in client.of_type("error") if m["code"] == "rate_limited"]
    assert 5 <= len(pongs) < 40
    assert len(limited) == 9  # the tenth strike closes instead of answering
    # each refusal names the refused request, none of those answered
    refused = {m["id"] for m in limited}
    assert len(refused) == 9 and refused <= set(range(40))
    assert not refused & {m["id"] for m in pongs}


async def test_a_websocket_ping_flood_is_closed_with_1008_and_keepalives_are_not(
    gw: Stack,
) -> None:
    """Protocol-level pings are outside the command limit but not free: past PING_BURST
    plus PING_RATE_PER_S the client is closed with 1008 ("ping flood"), counted. A client
    pinging within the limit keeps its pongs and its connection. (Every ping was answered
    for as long as the client liked.)"""
    closed_1008 = await asyncio.to_thread(
        gw.gateway.metric, "ledgerflux_gateway_disconnects_total", code="1008"
    )
    steady = await Client.connect(gw.gateway.url)
    assert (await steady.recv())["type"] == "welcome"
    for _ in range(PING_BURST // 2):
        await asyncio.wait_for(await steady.ws.ping(), 5)  # its pong came

    flooder = await Client.connect(gw.gateway.url)
    assert (await flooder.recv())["type"] == "welcome"
    for _ in range(PING_BURST * 4):
        await flooder.ws.ping()
    assert await flooder.close_code() == 1008
    assert flooder.ws.close_reason == "ping flood"
    assert await gw.gateway.wait_metric("ledgerflux_gateway_ping_floods_total", 1) == 1
    assert await gw.gateway.wait_metric(
        "ledgerflux_gateway_disconnects_total", closed_1008 + 1, code="1008"
    )

    await asyncio.wait_for(await steady.ws.ping(), 5)
    await steady.send({"op": "ping", "id": "still-open"})
    assert (await steady.expect("pong"))["id"] == "still-open"
    await steady.close()


def _all_answered(prefix: str, count: int) -> Callable[[Client], bool]:
    """Whether ``count`` replies (pongs or errors) to the ids starting with ``prefix`` came."""
    return lambda c: sum(str(m.get("id", "")).startswith(prefix) for m in c.messages) == count


async def test_going_over_the_burst_now_and_then_is_not_flooding(gw: Stack) -> None:
    """Strikes count as flooding only within WS_FLOOD_WINDOW_S (1 s here): a client that
    exceeds its burst once in a while gets ``rate_limited`` each time and stays connected,
    however many times that adds up to. (Strikes never expired: one command over the
    burst a minute closed a connection with 1008 after 50 minutes.)"""
    client = await Client.connect(gw.gateway.url)
    assert (await client.recv())["type"] == "welcome"
    for burst in range(4):  # 4 x 4 strikes: 16 > WS_FLOOD_STRIKES, never 10 in one window
        for i in range(9):  # 5 answered from the bucket, 4 refused
            await client.send({"op": "ping", "id": f"{burst}-{i}"})
        await client.until(_all_answered(f"{burst}-", 9))
        await asyncio.sleep(1.2)  # the window passes, the bucket refills
    limited = [m for m in client.of_type("error") if m["code"] == "rate_limited"]
    assert len(limited) >= 12
    await client.send({"op": "ping", "id": "still-open"})
    await client.until(lambda c: any(m["id"] == "still-open" for m in c.of_type("pong")))
    await client.close()


async def test_connections_over_ws_max_connections_are_closed_with_1013(gw: Stack) -> None:
    """The connection past WS_MAX_CONNECTIONS is accepted and closed with 1013 (try again
    later); once one closes, a new one is served."""
    clients = [await Client.connect(gw.gateway.url) for _ in range(3)]
    for client in clients:
        assert (await client.recv())["type"] == "welcome"
    extra = await Client.connect(gw.gateway.url)
    assert await extra.close_code() == 1013
    assert extra.ws.close_reason == "server busy"
    assert await gw.gateway.wait_metric(
        "ledgerflux_gateway_connections_refused_total", 1, cause="max_connections"
    )
    await clients.pop().close()
    await gw.gateway.wait_metric("ledgerflux_gateway_disconnects_total", 1, code="1000")
    deadline = time.monotonic() + 5
    while await asyncio.to_thread(gw.gateway.metric, "ledgerflux_gateway_connections") > 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    again = await Client.connect(gw.gateway.url)
    assert (await again.recv())["type"] == "welcome"
    for client in [*clients, again]:
        await client.close()


async def _unread_client(url: str) -> websockets.ClientConnection:
    """A client with a tiny receive buffer that will not read: a slow consumer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: no autotune
    sock.setblocking(False)
    host, port = url.removeprefix("ws://").split("/")[0].split(":")
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    return await websockets.connect(url, sock=sock, max_queue=1, max_size=2**24)


@pytest.mark.parametrize("query", ["", "?batch=true"], ids=["plain", "batch"])
async def test_a_client_that_cannot_drain_is_closed_with_4008_while_others_keep_up(
    gw: Stack, query: str
) -> None:
    """A subscriber that stops reading fills its socket and bounded buffer and is closed with
    4008 after WS_SLOW_CONSUMER_S; a fast subscriber of the same product gets every tick
    (or its conflation accounted) and stays open. Plain and batch clients alike."""
    product = "SC1-USD" if not query else "SC2-USD"
    await gw.feed.publish([(product, 1)])
    await gw.gateway.wait_latest(product, 1)
    slow = await _unread_client(gw.gateway.url + query)
    await slow.send(json.dumps({"op": "subscribe", "products": [product], "snapshot": False}))
    fast = await Client.connect(gw.gateway.url + query)
    await fast.send({"op": "subscribe", "products": [product], "snapshot": False})
    await fast.expect("subscribed")

    async def read_fast() -> None:
        while True:
            await fast.drain(quiet_s=0.05, timeout=0.2)

    slow_consumers = "ledgerflux_gateway_slow_consumers_total"
    closed_before = await asyncio.to_thread(gw.gateway.metric, slow_consumers)
    reader = asyncio.create_task(read_fast())
    published = 0
    big = "1" * 4000 + ".5"  # 4 KB ticks: the kernel buffers absorb megabytes
    try:
        # spread out (small windows), so the fast path is used rather than conflation,
        # until the slow client's socket is full and its writer blocks
        while await asyncio.to_thread(gw.gateway.metric, slow_consumers) == closed_before:
            assert published < 20_000, "the slow client was never closed"
            seqs = range(2 + published, 2 + published + 100)
            await gw.feed.publish(((product, s) for s in seqs), window=5, volume_24h=big)
            published += 100
    finally:
        reader.cancel()
    # the close frame waits behind the backlog: reading it now shows the close code
    try:
        while True:
            await asyncio.wait_for(slow.recv(), 10)
    except websockets.ConnectionClosed as exc:
        assert exc.rcvd is not None and exc.rcvd.code == 4008
    await fast.drain(quiet_s=0.5)
    got = fast.ticks(product)
    assert got[-1]["seq"] == gw.feed.published[product][-1]
    assert len(got) + sum(t.get("skipped", 0) for t in got) == published
    await fast.send({"op": "ping", "id": "alive"})
    assert (await fast.expect("pong"))["id"] == "alive"
    await fast.close()


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    """Server frames (never masked) as (opcode, payload)."""
    out, i = [], 0
    while i + 2 <= len(data):
        opcode, length = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if length == 126:
            length, i = int.from_bytes(data[i : i + 2]), i + 2
        elif length == 127:
            length, i = int.from_bytes(data[i : i + 8]), i + 8
        out.append((opcode, data[i : i + length]))
        i += length
    return out


async def test_a_client_that_never_answers_pings_is_dropped(start_gateway: StartGateway) -> None:
    """Keepalive: the server pings every WS_PING_INTERVAL_S; a peer that sends no pong within
    WS_PING_TIMEOUT_S gets close 1011 and is disconnected."""
    gateway = await start_gateway(WS_PING_INTERVAL_S="0.2", WS_PING_TIMEOUT_S="0.3")
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{gateway.port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    writer.write(request.encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), 10)  # until the server hangs up
    assert time.monotonic() - started < 5
    frames = _frames(data)
    assert frames[0][0] == 0x1 and b'"welcome"' in frames[0][1]
    assert any(opcode == 0x9 for opcode, _ in frames), "no ping was sent"
    assert frames[-1][0] == 0x8 and int.from_bytes(frames[-1][1][:2]) == 1011
    writer.close()
