"""The per-product watchdog: one product silent while the others flow."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from services.devstack.servers import NatsServer
from tests.support import frames
from tests.support.procs import ServiceProcess

from .helpers import Ingestor, feedsim, jetstream, read_stream, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

BUSY, QUIET = "BTC-USD", "ETH-USD"
QUIET_SEQ, QUIET_TRADE = 5_000, 700
QUIET_BACK_S = 3.0  # when the quiet product's heartbeat finally comes


def _script(path: Path) -> None:
    """BUSY ticks every 50 ms with a heartbeat every 0.5 s for 4 s; QUIET sends its
    snapshot ticker, then nothing until one heartbeat at QUIET_BACK_S."""
    lines = [(0, frames.ticker(QUIET, QUIET_SEQ, trade_id=QUIET_TRADE))]
    for i in range(80):
        seq, trade = 1_000 + 7 * i, 100 + i
        lines.append((i * 50_000_000, frames.ticker(BUSY, seq, trade_id=trade)))
        if i % 10 == 9:
            lines.append((i * 50_000_000 + 1, frames.heartbeat(BUSY, seq, trade)))
    lines.append((int(QUIET_BACK_S * 1e9), frames.heartbeat(QUIET, QUIET_SEQ, QUIET_TRADE)))
    lines.sort(key=lambda line: line[0])
    base = 1_700_000_000_000_000_000
    path.write_bytes(
        b"".join(
            orjson.dumps({"recv_ns": base + at, "msg": orjson.loads(frame)}) + b"\n"
            for at, frame in lines
        )
    )


async def test_silent_product_is_reported_stale_and_resynced(
    nats_server: NatsServer, spawn: list[ServiceProcess], service_logs: Path, tmp_path: Path
) -> None:
    """A product with neither ticker nor heartbeat for WATCHDOG_TIMEOUT_S while another
    product flows: product_stale is logged once, the stale gauge goes to 1, a REST resync
    tick (reason stale) is published for it, the connection is kept, and its next frame
    ends the episode (product_recovered, gauge back to 0)."""
    script = tmp_path / "script.jsonl"
    _script(script)
    async with feedsim(replay=script, speed=1) as sim:
        ingestor = await Ingestor(
            spawn,
            service_logs,
            nats_url=nats_server.url,
            sim=sim,
            products=[BUSY, QUIET],
            WATCHDOG_TIMEOUT_S="1",
        ).start()

        async def stale() -> bool:
            return await ingestor.metric("ledgerflux_ingestor_products_stale") == 1

        await wait_until(stale, 5, "the quiet product to be reported stale")

        async def recovered() -> bool:
            return bool(ingestor.events("product_recovered"))

        await wait_until(recovered, 5, "the quiet product's heartbeat")
        assert await ingestor.metric("ledgerflux_ingestor_products_stale") == 0
        reconnects = await ingestor.metric("ledgerflux_ingestor_reconnects_total")
        async with jetstream(nats_server.url) as js:
            raw = await read_stream(js, "MD_RAW")
    reports = ingestor.events("product_stale")
    resyncs = [m for m in raw if m.is_resync]
    print(f"stale: reports={[e['product'] for e in reports]} resyncs={[m.json() for m in resyncs]}")
    assert [e["product"] for e in reports] == [QUIET]
    assert [e["product"] for e in ingestor.events("product_recovered")] == [QUIET]
    assert reconnects == 0
    assert len(resyncs) == 1
    body = resyncs[0].json()
    assert resyncs[0].resync_reason == "stale"
    assert resyncs[0].subject == f"md.raw.coinbase.{QUIET}"
    assert (body["product_id"], body["sequence"], body["trade_id"]) == (
        QUIET,
        QUIET_SEQ,
        QUIET_TRADE,
    )
