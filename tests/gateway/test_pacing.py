"""Handshake pacing: WebSocket upgrades past WS_HANDSHAKES_PER_SEC wait for a token, oldest
first, and are shed with 503 once the wait would pass the handshake timeout; plain HTTP is
never paced."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import websockets
from uvicorn.config import Config
from uvicorn.server import ServerState
from websockets.exceptions import InvalidStatus

from services.gateway.app import create_app
from services.gateway.pacing import HandshakePacer, paced_protocol
from services.gateway.settings import GatewaySettings
from tests.gateway.helpers import stack

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class Transport:
    """What uvicorn's h11 protocol and the pacer use of an asyncio transport."""

    def __init__(self) -> None:
        self.reading = True
        self.closed = False
        self.written = b""

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def write(self, data: bytes) -> None:
        self.written += data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5555) if name in ("peername", "sockname") else default

    def set_protocol(self, protocol: object) -> None:
        pass


class Upgrades:
    """uvicorn's paced h11 protocol on one server state, fed upgrade requests by hand."""

    def __init__(self, pacer: HandshakePacer) -> None:
        self.pacer = pacer
        self.config = Config(create_app(GatewaySettings()), ws="websockets-sansio")
        self.config.load()
        self.state = ServerState()
        self.protocol_class = paced_protocol(pacer)

    def connect(self) -> tuple[Any, Transport]:
        """A new connection that sends its upgrade request at once."""
        transport = Transport()
        protocol = self.protocol_class(config=self.config, server_state=self.state, app_state={})
        protocol.connection_made(transport)  # type: ignore[arg-type]
        protocol.data_received(UPGRADE)
        return protocol, transport

    def close(self) -> None:
        for task in list(self.state.tasks):
            task.cancel()
        self.pacer.close()


async def test_a_connection_without_a_token_is_held_unparsed_until_its_turn() -> None:
    """The burst admits the first upgrade; the next two wait with their connection's reading
    paused and no WebSocket handshake or ASGI task started. They are released oldest first,
    one per token, and their handshake then runs. Past the queue's bound (rate x timeout) a
    new upgrade gets 503 with Retry-After at once."""
    # a token every 250 ms (a stalled test loop must not see two come at once), 2 may wait
    pacer = HandshakePacer(rate_per_s=4.0, burst=1, max_wait_s=0.5)
    assert pacer.max_waiting == 2
    upgrades = Upgrades(pacer)
    tasks = upgrades.state.tasks

    first, first_t = upgrades.connect()
    assert not first.waiting_for_token and first_t.reading
    assert len(tasks) == 1  # the upgrade was parsed and its ASGI task started
    second, second_t = upgrades.connect()
    third, third_t = upgrades.connect()
    assert second.waiting_for_token and third.waiting_for_token
    assert not second_t.reading and not third_t.reading
    assert len(tasks) == 1 and not second_t.written  # no handshake yet
    _fourth, fourth_t = upgrades.connect()
    assert fourth_t.closed and len(pacer.waiting) == 2 and len(tasks) == 1
    head, _, body = fourth_t.written.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in head.lower(), head
    assert b'"overloaded"' in body

    while second.waiting_for_token:
        await asyncio.sleep(0.01)
    assert third.waiting_for_token  # one token, one connection: the oldest first
    assert second_t.reading and len(tasks) == 2
    while third.waiting_for_token:
        await asyncio.sleep(0.01)
    assert third_t.reading and len(tasks) == 3 and not pacer.waiting
    upgrades.close()


async def test_a_connection_gone_while_waiting_takes_no_token() -> None:
    pacer = HandshakePacer(rate_per_s=50.0, burst=1, max_wait_s=1.0)
    upgrades = Upgrades(pacer)
    upgrades.connect()  # the burst's token
    (gone, gone_t), (kept, _) = upgrades.connect(), upgrades.connect()
    gone_t.close()
    while kept.waiting_for_token:
        await asyncio.sleep(0.005)
    assert gone.waiting_for_token  # never released: its place went to the next one
    assert not pacer.waiting and len(upgrades.state.tasks) == 2
    upgrades.close()


async def test_clients_gone_while_waiting_hold_no_place_in_the_queue() -> None:
    """Two may wait; both give up; a third new upgrade waits in their place instead of
    being shed."""
    pacer = HandshakePacer(rate_per_s=1.0, burst=1, max_wait_s=2.0)
    assert pacer.max_waiting == 2
    upgrades = Upgrades(pacer)
    upgrades.connect()  # the burst's token
    waiting = [upgrades.connect(), upgrades.connect()]
    for _, transport in waiting:
        transport.close()
    third, third_t = upgrades.connect()
    assert third.waiting_for_token and not third_t.closed
    assert [conn for conn, _ in pacer.waiting] == [third]
    upgrades.close()


@pytest.mark.integration
@pytest.mark.timeout(90)
async def test_the_gateway_paces_new_connections_and_sheds_past_the_bound(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """One upgrade a second, a burst of one, a 4 s handshake timeout: of 8 connections
    opened at once, one is welcomed at once, four wait their turn and are welcomed, and
    three get 503 with Retry-After at once; the metrics count each, every welcomed client
    is served, and plain HTTP answers while upgrades wait."""
    async with stack(
        tmp_path_factory.mktemp("pacing"),
        WS_HANDSHAKES_PER_SEC="1",
        WS_HANDSHAKE_BURST="1",
        WS_HANDSHAKE_TIMEOUT_S="4",
    ) as gw:

        async def one() -> str:
            try:
                async with websockets.connect(gw.gateway.url, open_timeout=30) as ws:
                    welcome = await ws.recv()
                    assert '"welcome"' in str(welcome)
                    await ws.send('{"op":"ping","id":"p"}')
                    assert '"pong"' in str(await ws.recv())
                    return "served"
            except InvalidStatus as exc:
                response = exc.response
                assert response.headers["Retry-After"] == "4", response.headers
                assert json.loads(response.body or b"{}")["code"] == "overloaded"
                return f"http:{response.status_code}"

        clients = asyncio.gather(*(one() for _ in range(8)))
        await asyncio.sleep(1.5)  # upgrades are waiting now
        status, _ = await asyncio.to_thread(gw.gateway.get, "/healthz")
        assert status == 200
        assert gw.gateway.metric("ledgerflux_gateway_handshake_queue") > 0
        outcomes = await clients
        assert sorted(outcomes) == ["http:503"] * 3 + ["served"] * 5, outcomes
        metric = gw.gateway.metric
        assert metric("ledgerflux_gateway_handshakes_paced_total") == 4
        assert metric("ledgerflux_gateway_handshakes_shed_total") == 3
        assert metric("ledgerflux_gateway_handshake_wait_seconds_count") == 4
        assert metric("ledgerflux_gateway_handshake_queue") == 0
