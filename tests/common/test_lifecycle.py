"""Lifecycle: SIGTERM stops a service cleanly, its consumer acked up to what it processed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
import pytest

from services.common import broker
from services.common.settings import CommonSettings
from services.common.subjects import RAW_STREAM, TICKS_STREAM
from services.devstack.ports import free_port
from services.devstack.servers import NatsServer
from tests.support.frames import ticker
from tests.support.procs import ServiceProcess

pytestmark = pytest.mark.integration


async def test_sigterm_mid_stream_exits_0_with_acks_matching_output(
    nats_server: NatsServer, service_logs: Path, spawn: list[ServiceProcess]
) -> None:
    """The normalizer stops within seconds of SIGTERM, exit 0, and every raw frame it
    acked has its tick in MD_TICKS while nothing it took is left un-acked."""
    nc = await nats.connect(nats_server.url)
    settings = CommonSettings(nats_urls=[nats_server.url])
    publisher = broker.Publisher(nc, settings)
    await broker.ensure_streams(publisher.js, settings)
    normalizer = ServiceProcess(
        "normalizer", {"NATS_URLS": nats_server.url, "METRICS_PORT": "0"}, service_logs
    )
    spawn.append(normalizer.start())
    await normalizer.wait_for_event("normalizer_started")

    async def feed() -> int:
        seq = 0
        while True:
            seq += 1
            pending = await publisher.publish(
                RAW_STREAM, "md.raw.coinbase.BTC-USD", ticker("BTC-USD", seq), msg_id=f"s{seq}"
            )
            await publisher.wait([pending])
            if seq % 50 == 0:
                await asyncio.sleep(0.01)

    feeder = asyncio.create_task(feed())
    await asyncio.sleep(1.5)
    started = time.monotonic()
    code = await normalizer.terminate(timeout=10)
    elapsed = time.monotonic() - started
    feeder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await feeder

    assert code == 0, normalizer.tail()
    assert elapsed < 5, f"took {elapsed:.1f}s to stop"
    info = await publisher.js.consumer_info(RAW_STREAM, "normalizer")
    ticks = (await publisher.js.stream_info(TICKS_STREAM)).state.messages
    assert info.num_ack_pending == 0
    assert info.ack_floor.stream_seq == ticks > 0
    assert any(e["event"] == "service_stopped" for e in normalizer.events())
    await nc.close()


@pytest.mark.parametrize("service", ["ingestor", "normalizer", "snapshotter", "gateway"])
async def test_sigterm_while_nats_was_never_reachable_exits_0(
    service: str, service_logs: Path, spawn: list[ServiceProcess]
) -> None:
    """A service started while NATS is down waits for it (nats-py retries for ever), and
    SIGTERM still stops it at once with exit 0, saying why. (All four ignored SIGTERM: the
    stop request was only looked at between connect attempts, and there were none.)"""
    nowhere = f"http://127.0.0.1:{free_port()}"
    proc = ServiceProcess(
        service,
        {
            "NATS_URLS": f"nats://127.0.0.1:{free_port()}",
            "METRICS_PORT": "0",
            "GATEWAY_PORT": str(free_port()),
            "COINBASE_WS_URL": f"ws://127.0.0.1:{free_port()}/",
            "DDB_ENDPOINT_URL": nowhere,
            "S3_ENDPOINT_URL": nowhere,
        },
        service_logs,
    )
    spawn.append(proc.start())
    await proc.wait_for_event("nats_error", timeout=30)  # trying, and failing
    started = time.monotonic()
    code = await proc.terminate(timeout=20)
    assert code == 0, proc.tail()
    assert time.monotonic() - started < 5
    stopped = [e for e in proc.events() if e["event"] == "stopped_before_ready"]
    assert stopped and "NATS" in stopped[0]["reason"], proc.tail()
