"""``--record`` then feedsim ``--replay``: a recording reproduces the raw stream."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.devstack.servers import NatsServer
from tests.support.procs import ServiceProcess

from .helpers import Ingestor, StoredMsg, feedsim, jetstream, read_stream, wait_idle, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PRODUCTS = ["BTC-USD", "ETH-USD"]


def _tickers(raw: list[StoredMsg]) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for msg in raw:
        if msg.is_resync:
            continue
        body = msg.json()
        if body.get("type") == "ticker":
            out.setdefault(body["product_id"], []).append(msg.data)
    return out


async def test_recording_replays_to_the_same_raw_stream(
    nats_server: NatsServer, spawn: list[ServiceProcess], service_logs: Path, tmp_path: Path
) -> None:
    """An ingestor run with --record FILE, then feedsim --replay FILE --speed max into a
    second ingestor on a fresh NATS: per product, MD_RAW holds the same ticker frames,
    byte for byte, in the same order."""
    record = tmp_path / "capture.jsonl"
    ticks = 600
    async with feedsim(products=PRODUCTS, rate=300, max_ticks=ticks, wait_subscribers=1) as sim:
        first = await Ingestor(
            spawn,
            service_logs,
            nats_url=nats_server.url,
            sim=sim,
            products=PRODUCTS,
            RECORD=str(record),
        ).start()

        async def done() -> bool:
            return sim.ticks_total >= ticks

        await wait_until(done, 15, "the live feed to finish")
        await wait_idle(first)
        assert await first.proc.terminate() == 0  # SIGTERM flushes the recording
        async with jetstream(nats_server.url) as js:
            original = _tickers(await read_stream(js, "MD_RAW"))

    replay_nats = NatsServer.on_free_ports(tmp_path / "nats-replay")
    replay_nats.start()
    try:
        async with feedsim(replay=record, speed="max", products=PRODUCTS) as replay:
            second = await Ingestor(
                spawn, service_logs, nats_url=replay_nats.url, sim=replay, products=PRODUCTS
            ).start()

            async def replayed() -> bool:
                return replay.replay_done.is_set()

            await wait_until(replayed, 15, "the replay to finish")
            await wait_idle(second)
            async with jetstream(replay_nats.url) as js:
                again = _tickers(await read_stream(js, "MD_RAW"))
            assert await second.proc.terminate() == 0
    finally:
        replay_nats.stop()
    print(
        "record/replay: "
        + ", ".join(
            f"{p} live={len(original[p])} replayed={len(again.get(p, []))}" for p in PRODUCTS
        )
    )
    assert sum(len(v) for v in original.values()) == ticks + len(PRODUCTS)
    assert again == original
