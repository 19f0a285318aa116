"""NATS going away under a flowing feed: nothing received meanwhile is lost while the
buffer holds, and when it cannot hold, the loss is loud, bounded and repaired by a resync."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest

from services.devstack.servers import NatsServer
from services.feedsim import FeedSim
from tests.support.procs import ServiceProcess

from .helpers import Ingestor, emit_log, feedsim, jetstream, read_stream, wait_idle, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PRODUCTS = ["BTC-USD", "ETH-USD"]
OUTAGE_S = 2.0


async def _first_frames_stored(nats_url: str) -> None:
    async with jetstream(nats_url) as js:

        async def stored() -> bool:
            try:
                return (await js.stream_info("MD_RAW")).state.messages > 0
            except Exception:  # noqa: BLE001 - the ingestor has not created the stream yet
                return False

        await wait_until(stored, 10, "the first frames in MD_RAW")


async def _feed_done(sim: FeedSim, ticks: int) -> None:
    async def done() -> bool:
        return sim.ticks_total >= ticks

    await wait_until(done, 20, f"feedsim to emit {ticks} tickers")


async def test_nats_restart_loses_no_received_frame(
    nats_server: NatsServer, spawn: list[ServiceProcess], service_logs: Path, tmp_path: Path
) -> None:
    """NATS killed (SIGKILL) mid-stream and restarted on the same ports and store ~2 s
    later: every ticker feedsim emitted, including those received while NATS was down,
    is in MD_RAW exactly once."""
    log_path = tmp_path / "emit.jsonl"
    ticks = 1500
    async with feedsim(
        products=PRODUCTS, rate=300, max_ticks=ticks, wait_subscribers=1, emit_log=log_path
    ) as sim:
        ingestor = await Ingestor(
            spawn, service_logs, nats_url=nats_server.url, sim=sim, products=PRODUCTS
        ).start()
        await _first_frames_stored(nats_server.url)
        nats_server.kill()
        down_ns = time.time_ns()
        await asyncio.sleep(OUTAGE_S)  # the outage itself, not a synchronisation
        up_ns = time.time_ns()
        nats_server.start()
        await _feed_done(sim, ticks)
        await wait_idle(ingestor, timeout=20)
        await sim.flush_emit_log()
        reconnects = await ingestor.metric("ledgerflux_nats_reconnects_total")
        async with jetstream(nats_server.url) as js:
            raw = await read_stream(js, "MD_RAW")
    emitted = [line["msg"] for line in emit_log(log_path)]
    during_outage = [m for m in emit_log(log_path) if down_ns <= m["recv_ns"] <= up_ns]
    stored = Counter(
        (body["product_id"], body["sequence"])
        for body in (m.json() for m in raw if not m.is_resync)
        if body.get("type") == "ticker"
    )
    missing = [
        (t["product_id"], t["sequence"])
        for t in emitted
        if (t["product_id"], t["sequence"]) not in stored
    ]
    print(
        f"nats restart: emitted={len(emitted)} during outage={len(during_outage)} "
        f"stored tickers={sum(stored.values())} missing={len(missing)} "
        f"nats reconnects={reconnects}"
    )
    assert len(during_outage) > 100
    assert reconnects >= 1
    assert not missing
    assert set(stored.values()) == {1}
    assert sum(stored.values()) == len(emitted) + len(PRODUCTS)  # + the subscribe snapshots


async def test_buffer_overflow_drops_oldest_then_resyncs(
    nats_server: NatsServer, spawn: list[ServiceProcess], service_logs: Path
) -> None:
    """A tiny INGEST_BUFFER_MAX with NATS down: the oldest frames are dropped, counted and
    logged (buffer_full_dropping_oldest), the process neither dies nor grows, and once
    NATS is back every product that lost ticks gets a buffer_drop resync tick carrying
    the latest REST ticker."""
    ticks = 900
    buffer_max = 100
    async with feedsim(products=PRODUCTS, rate=300, max_ticks=ticks, wait_subscribers=1) as sim:
        ingestor = await Ingestor(
            spawn,
            service_logs,
            nats_url=nats_server.url,
            sim=sim,
            products=PRODUCTS,
            INGEST_BUFFER_MAX=str(buffer_max),
        ).start()
        await _first_frames_stored(nats_server.url)
        nats_server.kill()

        async def dropping() -> bool:
            return await ingestor.metric("ledgerflux_ingestor_frames_dropped_total") > 0

        await wait_until(dropping, 10, "the buffer to overflow")
        rss_first_drop = ingestor.rss_kib()
        await _feed_done(sim, ticks)
        depth = await ingestor.metric("ledgerflux_ingestor_buffer_depth")
        dropped = await ingestor.metric("ledgerflux_ingestor_frames_dropped_total")
        rss_feed_done = ingestor.rss_kib()
        assert ingestor.alive
        nats_server.start()

        async def resynced() -> bool:
            return ingestor.events("buffer_drops_recovered") != [] and (
                await ingestor.metric("ledgerflux_ingestor_resyncs_total", reason="buffer_drop")
                + await ingestor.metric(
                    "ledgerflux_ingestor_resyncs_skipped_total", reason="buffer_drop"
                )
                >= len(ingestor.events("buffer_drops_recovered")[0]["products"])
            )

        await wait_until(resynced, 20, "buffer_drop resyncs")
        await wait_idle(ingestor)
        final = {p: s["trade_id"] for p, s in sim.stats(last_tickers=False)["products"].items()}
        dropped_total = await ingestor.metric("ledgerflux_ingestor_frames_dropped_total")
        async with jetstream(nats_server.url) as js:
            raw = await read_stream(js, "MD_RAW")
    logged = ingestor.events("buffer_full_dropping_oldest")
    affected = {p for e in ingestor.events("buffer_drops_recovered") for p in e["products"]}
    resyncs = [m for m in raw if m.resync_reason == "buffer_drop"]
    print(
        f"overflow: dropped={dropped} drop log lines={len(logged)} depth={depth} "
        f"rss first drop={rss_first_drop} KiB, feed done={rss_feed_done} KiB "
        f"affected={sorted(affected)} buffer_drop resyncs={len(resyncs)}"
    )
    assert dropped > 0 and logged
    # one line a second, each with the drops since the previous line
    assert 0 < sum(e["dropped"] for e in logged) <= dropped_total
    assert depth <= buffer_max
    assert rss_feed_done - rss_first_drop < 16 * 1024
    assert affected == set(PRODUCTS)
    assert sorted(m.json()["product_id"] for m in resyncs) == sorted(affected)
    for msg in resyncs:
        body = msg.json()
        assert body["trade_id"] == final[body["product_id"]]
    assert ingestor.alive
