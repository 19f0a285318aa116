"""Graceful shutdown: SIGTERM closes every client with 1001 after flushing, then exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket

import pytest

from services.devstack.servers import NatsServer
from tests.gateway.conftest import StartGateway
from tests.gateway.helpers import Client, Feed
from tests.support.procs import run_to_exit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_sigterm_closes_clients_with_1001_after_flushing_and_exits_0(
    start_gateway: StartGateway, feed: Feed
) -> None:
    """Plain and batch clients, subscribed and receiving, all get close 1001 ("going away")
    with every tick published before the signal sent first; the process exits 0."""
    gateway = await start_gateway(WS_BATCH_FLUSH_MS="50")
    await feed.publish([("BTC-USD", 1)])
    clients = [await Client.connect(gateway.url), await Client.connect(gateway.url + "?batch=1")]
    for client in clients:
        await client.send({"op": "subscribe", "products": ["BTC-USD"], "snapshot": False})
        await client.until(lambda c: bool(c.of_type("subscribed")))
    # published just before the signal: the 50 ms batch window still holds them, and some
    # may still be on their way from JetStream (the next test)
    await feed.publish(("BTC-USD", s) for s in range(2, 40))
    codes = asyncio.gather(*(client.close_code() for client in clients))
    exit_code = await gateway.proc.terminate()
    assert await codes == [1001, 1001]
    assert exit_code == 0, gateway.proc.tail()
    for client in clients:
        assert [t["seq"] for t in client.ticks("BTC-USD")] == list(range(2, 40))
    events = [e["event"] for e in gateway.proc.events()]
    assert "service_stopped" in events


async def test_ticks_stored_before_the_signal_but_not_yet_read_are_delivered_before_1001(
    start_gateway: StartGateway, feed: Feed
) -> None:
    """A tick that JetStream acked before the SIGTERM but that the gateway had not read yet
    still reaches every subscriber before its 1001: the gateway is frozen (SIGSTOP) while
    3,000 ticks are stored, signalled, then thawed, so the ticks and the signal arrive
    together. Without the live tail's catch-up the clients were closed a few hundred ticks
    in."""
    gateway = await start_gateway(
        WS_BATCH_FLUSH_MS="20",
        WS_MAX_MSGS_PER_SEC="1000000",  # every tick counted: no conflation
        WS_BURST="1000000",
        WS_SEND_QUEUE="100000",
    )
    await feed.publish([("BTC-USD", 1)])
    clients = [await Client.connect(gateway.url), await Client.connect(gateway.url + "?batch=1")]
    for client in clients:
        await client.send({"op": "subscribe", "products": ["BTC-USD"], "snapshot": False})
        await client.until(lambda c: bool(c.of_type("subscribed")))
    codes = asyncio.gather(*(client.close_code() for client in clients))
    os.kill(gateway.proc.pid, signal.SIGSTOP)
    try:
        await feed.publish(("BTC-USD", s) for s in range(2, 3001))
        os.kill(gateway.proc.pid, signal.SIGTERM)
    finally:
        os.kill(gateway.proc.pid, signal.SIGCONT)
    assert await codes == [1001, 1001]
    assert await gateway.proc.wait_exit() == 0, gateway.proc.tail()
    for client in clients:
        assert [t["seq"] for t in client.ticks("BTC-USD")] == list(range(2, 3001))
    caught_up = [e for e in gateway.proc.events() if e["event"] == "live_tail_caught_up"]
    assert caught_up and caught_up[0]["stream_seq"] >= 3000


def test_a_taken_port_is_one_line_and_exit_2(nats_server: NatsServer) -> None:
    """GATEWAY_PORT in use is an operator error like a taken METRICS_PORT: exit 2 with
    ``port_unavailable`` naming it, no traceback and no ``gateway_started`` (it was
    uvicorn's own exit 3, after a 'started' line)."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_to_exit(
            "gateway",
            {"NATS_URLS": nats_server.url, "GATEWAY_PORT": str(port), "METRICS_PORT": "0"},
        )
    assert done.returncode == 2, done.stderr[-2000:]
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    failed = [e for e in events if e["event"] == "port_unavailable"]
    assert failed and f"0.0.0.0:{port}" in failed[0]["error"]
    assert not [e for e in events if e["event"] in ("gateway_started", "service_failed")]
    assert "Traceback" not in done.stdout + done.stderr
