"""Minimal reproduction of what scenario 2 found: after NATS comes back, the gateway's live
stream silently skips every tick published before *its* connection is re-established.

The gateway reads MD_TICKS through a core NATS subscription (``md.ticks.>``). When NATS
restarts, each client reconnects on its own schedule (nats-py waits ``reconnect_time_wait``,
1 s here); ticks published by a faster publisher (the normalizer) in between reach nobody,
and the hub forwards the next tick it does see: the WebSocket client gets a jump in seq with
no ``skipped`` and no backfill — DESIGN §8 forbids exactly that."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import nats
import pytest
import websockets

from services.common.broker import ensure_streams
from services.common.models import Tick, encode_tick
from services.common.settings import CommonSettings
from services.common.subjects import tick_subject
from services.devstack.ports import free_port
from services.devstack.servers import NatsServer
from tests.chaos.harness import PYCACHE_ENV, start_server
from tests.support.procs import ServiceProcess

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.chaos_fast,
    pytest.mark.integration,
    pytest.mark.timeout(120),
]

PRODUCT = "BTC-USD"


def _tick(seq: int) -> bytes:
    return encode_tick(
        Tick(
            product=PRODUCT, seq=seq, trade_id=seq, time="2026-11-28T15:00:00.000000Z",
            recv_ns=time.time_ns(), price="100.5", size="1", side="buy", bid="100.4",
            bid_size="1", ask="100.5", ask_size="1", open_24h=None, high_24h=None,
            low_24h=None, volume_24h=None,
        )
    )  # fmt: skip


async def _publish(js: nats.js.JetStreamContext, seqs: range) -> None:
    for seq in seqs:
        while True:  # a publisher that retries until stored, as the normalizer does
            try:
                await js.publish(
                    tick_subject(PRODUCT, 4), _tick(seq),
                    headers={"Nats-Msg-Id": f"tick:coinbase:{PRODUCT}:{seq}"},
                )  # fmt: skip
                break
            except Exception:  # noqa: BLE001 - NATS still coming back
                await asyncio.sleep(0.05)


async def test_live_ticks_published_while_the_gateway_reconnects_reach_the_client(
    nats_server: NatsServer, service_logs: Path, spawn: list[ServiceProcess]
) -> None:
    """Ticks 1..100 flow; nats-server is killed and restarted; a publisher that reconnects
    faster than the gateway stores ticks 101..600 at once. The subscribed client must get
    101..600 too (or be told with ``skipped``) before tick 601, published once the gateway is
    reconnected; it must not jump from 100 to 601 in silence."""
    port = free_port()
    gateway = ServiceProcess(
        "gateway",
        {**PYCACHE_ENV, "NATS_URLS": nats_server.url, "GATEWAY_HOST": "127.0.0.1",
         "GATEWAY_PORT": str(port), "COINBASE_PRODUCTS": PRODUCT, "METRICS_PORT": "0"},
        service_logs,
    )  # fmt: skip
    spawn.append(gateway.start())
    await gateway.wait_for_event("gateway_started", timeout=60)
    nc = await nats.connect(
        nats_server.url, reconnect_time_wait=0.05, max_reconnect_attempts=-1, error_cb=_quiet
    )
    js = nc.jetstream()
    await ensure_streams(js, CommonSettings(nats_urls=[nats_server.url]))
    got: list[tuple[int, int]] = []
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as ws:
        await ws.recv()  # welcome
        await ws.send(json.dumps({"op": "subscribe", "products": [PRODUCT], "snapshot": True}))

        async def read() -> None:
            async for raw in ws:
                msg = json.loads(raw)
                if msg.get("type") == "tick":
                    got.append((msg["seq"], msg.get("skipped", 0)))

        reader = asyncio.create_task(read())
        await asyncio.sleep(0.5)
        await _publish(js, range(1, 101))
        await _until(lambda: bool(got) and got[-1][0] == 100, "ticks 1..100")
        nats_server.kill()
        await asyncio.sleep(0.5)
        await start_server(nats_server)
        await _publish(js, range(101, 601))  # the fast publisher is back first
        # once the gateway is back too, one more tick: everything up to it must be accounted
        await gateway.wait_for_event("nats_reconnected", timeout=20)
        await asyncio.sleep(0.5)
        await _publish(js, range(601, 602))
        await _until(lambda: bool(got) and got[-1][0] == 601, "tick 601", timeout=20)
        reader.cancel()
    await nc.close()
    seqs = [s for s, _ in got]
    announced = sum(k for _, k in got)
    missing = sorted(set(range(1, 602)) - set(seqs))
    gap = f"{missing[0]}..{missing[-1]}" if missing else "none"
    print(f"client got {len(seqs)} of 601 ticks, missing {len(missing)} ({gap}), {announced} "
          "announced as skipped")  # fmt: skip
    assert seqs == sorted(seqs), "out of order"
    assert len(missing) == announced, (
        f"{len(missing)} ticks ({gap}) never reached the client and {announced} were announced "
        "with skipped: the gateway dropped what was published while it reconnected to NATS"
    )
    assert await gateway.terminate() == 0


async def _quiet(_exc: Exception) -> None:
    return None


async def _until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
