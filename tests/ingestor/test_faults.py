"""Each feed fault of feedsim, handled end to end by a real ingestor process into a real
JetStream: what feedsim injected (its counters, its emit log) against what MD_RAW/MD_DLQ
hold and what the ingestor counted."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
from nats.js import JetStreamContext
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.server import ServerConnection, serve

from services.common.subjects import raw_subject
from services.devstack.ports import free_port
from services.devstack.servers import NatsServer
from services.feedsim import FeedSim
from services.ingestor.feed import OVERSIZED_KEPT_BYTES
from tests.support.procs import ServiceProcess
from tests.support.streams import wait_consumer_idle

from .helpers import (
    Ingestor,
    StoredMsg,
    emit_log,
    feedsim,
    jetstream,
    read_stream,
    wait_idle,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PRODUCTS = ["BTC-USD", "ETH-USD"]
# Many quiet products for the gap test: a resync beats the product's next ticker (which
# would supersede it) more often when each product ticks rarely, as most Coinbase products do.
MANY = ["BTC-USD", "ETH-USD", "SOL-USD", "ADA-USD", "DOGE-USD", "LTC-USD", "XRP-USD", "DOT-USD"]


async def _feed_done(sim: FeedSim, ticks: int) -> None:
    async def done() -> bool:
        return sim.ticks_total >= ticks

    await wait_until(done, 20, f"feedsim to emit {ticks} tickers")


async def _last_sequence(js: JetStreamContext, product: str) -> int:
    try:
        msg = await js.get_last_msg("MD_RAW", raw_subject(product))
    except Exception:  # noqa: BLE001 - nothing stored yet (nats-py raises NotFoundError)
        return -1
    assert msg.data is not None
    sequence = json.loads(msg.data).get("sequence", -1)
    assert isinstance(sequence, int)
    return sequence


async def _frames_flow_after(sim: FeedSim, js: JetStreamContext, what: str) -> None:
    """MD_RAW gets, for every product, a frame the feed produced after this moment."""
    marks = {p: s["sequence"] for p, s in sim.stats(last_tickers=False)["products"].items()}

    async def newer() -> bool:
        return all([await _last_sequence(js, p) > seq for p, seq in marks.items()])

    await wait_until(newer, 15, f"frames in MD_RAW after {what}")


def _feed_tickers(raw: list[StoredMsg]) -> list[dict[str, object]]:
    out = []
    for msg in raw:
        if msg.is_resync:
            continue
        try:
            body = msg.json()
        except ValueError:
            continue
        if isinstance(body, dict) and body.get("type") == "ticker":
            out.append(body)
    return out


async def test_disconnects_reconnect_and_resubscribe(
    nats_server: NatsServer, spawn: list[ServiceProcess], service_logs: Path
) -> None:
    """disconnect: every dropped connection (1006, no close frame) is followed by a
    reconnect that resubscribes, so frames keep reaching MD_RAW after the disconnects."""
    async with feedsim(products=PRODUCTS, rate=300, faults="disconnect=1.5s") as sim:
        ingestor = await Ingestor(
            spawn, service_logs, nats_url=nats_server.url, sim=sim, products=PRODUCTS
        ).start()

        async def two_disconnects() -> bool:
            return sim.counters.clients_disconnected >= 2

        await wait_until(two_disconnects, 15, "two disconnects of the ingestor")
        async with jetstream(nats_server.url) as js:
            await _frames_flow_after(sim, js, "the second disconnect")
        disconnected = sim.counters.clients_disconnected

        async def reconnected() -> bool:
            total = await ingestor.metric("ledgerflux_ingestor_reconnects_total")
            return total >= disconnected

        await wait_until(reconnected, 5, "a reconnect per disconnect")
        reconnects = await ingestor.metric("ledgerflux_ingestor_reconnects_total")
        subscribed = len(ingestor.events("subscribed"))
    print(f"disconnect: feedsim dropped={disconnected} ingestor reconnects={reconnects}")
    assert subscribed >= disconnected + 1  # the first subscription, then one per reconnect


async def test_stall_trips_the_watchdog(
    nats_server: NatsServer, spawn: list[ServiceProcess], service_logs: Path
) -> None:
    """stall: a connection that stays open but goes silent is replaced once the watchdog
    (WATCHDOG_TIMEOUT_S=1) fires, well before the 3 s stall ends; a stall of every
    product is not reported as individual products going stale."""
    async with feedsim(products=PRODUCTS, rate=300, faults="stall=3s@3.5s") as sim:
        ingestor = await Ingestor(
            spawn,
            service_logs,
            nats_url=nats_server.url,
            sim=sim,
            products=PRODUCTS,
            WATCHDOG_TIMEOUT_S="1",
        ).start()

        async def stalled() -> bool:
            return sim.counters.clients_stalled >= 1

        await wait_until(stalled, 10, "feedsim to stall the ingestor")

        async def watchdog() -> bool:
            return await ingestor.metric("ledgerflux_ingestor_reconnects_total", reason="stall") > 0

        await wait_until(watchdog, 2.5, "the watchdog to reconnect before the stall ends")
        async with jetstream(nats_server.url) as js:
            await _frames_flow_after(sim, js, "the stall")
        stalls = sim.counters.clients_stalled
        reconnects = await ingestor.metric("ledgerflux_ingestor_reconnects_total", reason="stall")
    print(f"stall: feedsim stalled={stalls} ingestor stall reconnects={reconnects}")
    assert [e["silent_s"] for e in ingestor.events("feed_stalled")][:1] == [1.0]
    assert not ingestor.events("product_stale")


async def test_gap_is_closed_by_a_rest_resync(
    nats_server: NatsServer, spawn: list[ServiceProcess], service_logs: Path, tmp_path: Path
) -> None:
    """gap: a heartbeat announcing a trade whose ticker never came is a gap; each gap ends
    in exactly one outcome (a published resync tick, or skipped because the feed's next
    ticker superseded it), resync ticks carry the sequence of a ticker feedsim dropped,
    and per product MD_RAW stays in strictly increasing sequence."""
    log_path = tmp_path / "emit.jsonl"
    ticks = 1200
    async with feedsim(
        products=MANY,
        rate=300,
        rate_skew=0,
        max_ticks=ticks,
        wait_subscribers=1,
        faults="gap=0.05",
        heartbeat_interval_s=0.05,
        emit_log=log_path,
        seed=5,
    ) as sim:
        ingestor = await Ingestor(
            spawn, service_logs, nats_url=nats_server.url, sim=sim, products=MANY
        ).start()
        await _feed_done(sim, ticks)
        await wait_idle(ingestor)
        await sim.flush_emit_log()
        gaps = await ingestor.metric("ledgerflux_ingestor_gaps_total")
        published = await ingestor.metric("ledgerflux_ingestor_resyncs_total", reason="gap")
        skipped = await ingestor.metric("ledgerflux_ingestor_resyncs_skipped_total", reason="gap")
        superseded = await ingestor.metric(
            "ledgerflux_ingestor_resyncs_skipped_total", reason="gap", cause="superseded"
        )
        injected = sim.counters.by_kind["gap"]
        async with jetstream(nats_server.url) as js:
            raw = await read_stream(js, "MD_RAW")
    resyncs = [m for m in raw if m.is_resync]
    print(
        f"gap: injected={injected} detected={gaps} resyncs published={published} "
        f"superseded={superseded} skipped(all causes)={skipped} in MD_RAW={len(resyncs)}"
    )
    assert 0 < gaps <= injected
    assert published >= 1
    assert gaps == published + skipped
    assert len(resyncs) == published
    assert all(m.resync_reason == "gap" for m in resyncs)
    dropped = {
        (line["msg"]["product_id"], line["msg"]["sequence"]): line["msg"]
        for line in emit_log(log_path)
        if line["fault"] == "gap"
    }
    for msg in resyncs:
        body = msg.json()
        missed = dropped[(body["product_id"], body["sequence"])]
        assert body["trade_id"] >= missed["trade_id"]
        assert "side" not in body  # the REST ticker has no taker side
    by_product: dict[str, list[int]] = {}
    for msg in raw:
        body = msg.json()
        if body.get("type") == "ticker":
            by_product.setdefault(body["product_id"], []).append(body["sequence"])
    for product, seqs in by_product.items():
        assert all(a < b for a, b in itertools.pairwise(seqs)), product


async def test_duplicates_are_stored_once(
    nats_server: NatsServer, spawn: list[ServiceProcess], service_logs: Path
) -> None:
    """dup: a ticker sent twice is counted as a duplicate regression and stored once
    (Nats-Msg-Id dedup): MD_RAW holds every emitted ticker plus the subscribe snapshot."""
    ticks = 1000
    async with feedsim(
        products=PRODUCTS, rate=400, max_ticks=ticks, wait_subscribers=1, faults="dup=0.05"
    ) as sim:
        ingestor = await Ingestor(
            spawn, service_logs, nats_url=nats_server.url, sim=sim, products=PRODUCTS
        ).start()
        await _feed_done(sim, ticks)
        await wait_idle(ingestor)
        injected = sim.counters.by_kind["dup"]
        regressions = await ingestor.metric(
            "ledgerflux_ingestor_regressions_total", kind="duplicate"
        )
        deduped = await ingestor.metric("ledgerflux_publish_duplicates_total", stream="MD_RAW")
        async with jetstream(nats_server.url) as js:
            raw = await read_stream(js, "MD_RAW")
    tickers = _feed_tickers(raw)
    keys = [(t["product_id"], t["sequence"]) for t in tickers]
    print(
        f"dup: injected={injected} regressions={regressions} dedup'd by JetStream={deduped} "
        f"MD_RAW tickers={len(tickers)} emitted={ticks}"
    )
    assert injected > 0
    assert regressions == injected
    assert deduped >= injected
    assert len(keys) == len(set(keys))
    assert len(tickers) == ticks + len(PRODUCTS)  # + one subscribe snapshot per product


async def test_malformed_frames_are_dead_lettered(
    nats_server: NatsServer, spawn: list[ServiceProcess], service_logs: Path
) -> None:
    """malformed: frames that are not JSON or name no product go to md.dlq.unparseable
    from the ingestor (exactly the injected count of those variants); bad_price frames
    reach MD_RAW and the normalizer dead-letters each one as bad_decimal; resyncs of the
    tickers lost that way come out of the normalizer as ticks marked resync."""
    ticks = 1000
    async with feedsim(
        products=MANY,
        rate=300,
        rate_skew=0,
        max_ticks=ticks,
        wait_subscribers=1,
        faults="malformed=0.03",
        heartbeat_interval_s=0.05,
    ) as sim:
        normalizer = ServiceProcess(
            "normalizer", {"NATS_URLS": nats_server.url, "METRICS_PORT": "0"}, service_logs
        )
        spawn.append(normalizer)
        ingestor = await Ingestor(
            spawn, service_logs, nats_url=nats_server.url, sim=sim, products=MANY
        ).start()
        normalizer.start()
        durable = (await normalizer.wait_for_event("normalizer_started"))["durable"]
        await _feed_done(sim, ticks)
        await wait_idle(ingestor)
        variants = dict(sim.counters.malformed_variants)
        dead_letters = await ingestor.metric(
            "ledgerflux_ingestor_dead_letters_total", reason="unparseable"
        )
        async with jetstream(nats_server.url) as js:
            await wait_consumer_idle(js, "MD_RAW", durable, timeout=20)
            unparseable = await read_stream(js, "MD_DLQ", "md.dlq.unparseable")
            bad_decimal = await read_stream(js, "MD_DLQ", "md.dlq.bad_decimal")
            raw = await read_stream(js, "MD_RAW")
            ticks_out = await read_stream(js, "MD_TICKS")
    bad_price_raw = [m for m in raw if b'"price":"not-a-number"' in m.data]
    resync_ticks = [m for m in ticks_out if m.json().get("resync") is True]
    print(
        f"malformed: injected={variants} ingestor unparseable={dead_letters} "
        f"md.dlq.unparseable={len(unparseable)} bad_price in MD_RAW={len(bad_price_raw)} "
        f"md.dlq.bad_decimal={len(bad_decimal)} resync ticks={len(resync_ticks)}"
    )
    assert all(variants.values()), variants
    expected_unparseable = variants["non_json"] + variants["no_product_id"]
    assert dead_letters == expected_unparseable
    assert len(unparseable) == expected_unparseable
    assert len(bad_price_raw) == variants["bad_price"]
    assert len(bad_decimal) == variants["bad_price"]
    assert {m.data for m in bad_decimal} == {m.data for m in bad_price_raw}
    # a ticker replaced by a broken frame is a gap too; its resync (labelled above anything
    # stored before it) becomes a tick marked "resync": true
    resyncs_raw = [m for m in raw if m.is_resync]
    assert len(resync_ticks) == len(resyncs_raw)


async def test_a_feed_closing_right_after_the_handshake_is_reconnected(
    nats_server: NatsServer, service_logs: Path, spawn: list[ServiceProcess]
) -> None:
    """A server that completes the upgrade and closes at once (an exchange shedding load,
    a proxy): the subscribe the ingestor sends meets a closed connection. That is one more
    feed close to count and reconnect after; it was an exception out of the feed loop that
    ended the ingestor (exit 1)."""
    accepted = 0

    async def upgrade_then_close(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal accepted
        request = await reader.readuntil(b"\r\n\r\n")
        match = re.search(rb"(?i)sec-websocket-key:\s*(\S+)", request)
        assert match is not None
        accept = base64.b64encode(hashlib.sha1(match.group(1) + _WS_GUID).digest())
        accepted += 1
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            b"\x88\x02\x03\xe8"  # and in the same segment a close frame, code 1000
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(upgrade_then_close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ingestor = _ingestor_of(
        port, nats_server, service_logs, RECONNECT_INITIAL_S="0.1", RECONNECT_MAX_S="0.3"
    )
    spawn.append(ingestor.start())
    async with server:
        deadline = time.monotonic() + 30
        while accepted < 4:
            assert ingestor.proc is not None and ingestor.proc.poll() is None, ingestor.tail()
            assert time.monotonic() < deadline, f"{accepted} connections; {ingestor.tail()}"
            await asyncio.sleep(0.05)
    events = [e["event"] for e in ingestor.events()]
    assert "feed_closed" in events and "service_failed" not in events, ingestor.tail()
    assert await ingestor.terminate() == 0


_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455


def _ingestor_of(
    port: int, nats_server: NatsServer, service_logs: Path, **env: str
) -> ServiceProcess:
    """An ingestor (not started) whose Coinbase WebSocket and REST URL are a local ``port``."""
    base = {
        "NATS_URLS": nats_server.url,
        "COINBASE_WS_URL": f"ws://127.0.0.1:{port}",
        "COINBASE_REST_URL": f"http://127.0.0.1:{port}",
        "COINBASE_PRODUCTS": "BTC-USD",
        "METRICS_PORT": "0",
    }
    return ServiceProcess("ingestor", {**base, **env}, service_logs)


async def test_frames_of_products_never_subscribed_are_dead_lettered_not_published(
    nats_server: NatsServer, service_logs: Path, spawn: list[ServiceProcess]
) -> None:
    """A feed sending products it was not asked for (one with a space, one with subject
    wildcards, a well-formed stranger) and a type nobody documents: the three strangers go
    to md.dlq.unexpected_product byte for byte; none becomes a metric series, MD_RAW
    subject or per-product state; the odd type is published for the normalizer to judge but
    counted as type "other"; a frame over NATS's max_payload goes to md.dlq.oversized (its
    head and its size); the subscribed product's ticker flows, and the ingestor lives.
    A product id with a space was a subject the NATS protocol cannot carry, and the big frame
    a publish retried for ever: either one held up every frame after it."""
    ticker = {
        "type": "ticker", "sequence": 10, "price": "1.00", "time": "2026-11-29T10:00:00.000001Z",
        "trade_id": 1, "last_size": "1", "side": "buy",
    }  # fmt: skip
    strangers = [
        json.dumps({**ticker, "product_id": p}).encode() for p in ("BTC USD", "EVIL.>", "XYZ-USD")
    ]
    odd_type = json.dumps({**ticker, "type": "z" * 200, "product_id": "BTC-USD"}).encode()
    # feed strings that end up in the Nats-Msg-Id header: a CR LF there would be a header
    # of its own, or a broken HPUB
    crlf_type = json.dumps(
        {**ticker, "type": "x\r\nNats-Expected-Stream: NOPE", "product_id": "BTC-USD"}
    ).encode()
    crlf_time = json.dumps({
        "type": "heartbeat", "product_id": "BTC-USD", "sequence": 10, "last_trade_id": 1,
        "time": "2026-11-29T10:00:00Z\r\nNats-Expected-Stream: NOPE",
    }).encode()  # fmt: skip
    # over NATS's max_payload (1 MiB): it was retried for ever, holding up every frame after
    oversized = json.dumps({**ticker, "product_id": "BTC-USD", "pad": "x" * 1_500_000}).encode()
    good = json.dumps({**ticker, "product_id": "BTC-USD", "sequence": 11}).encode()

    async def feed(ws: ServerConnection) -> None:
        await ws.recv()  # the subscribe
        for frame in [*strangers, odd_type, crlf_type, crlf_time, oversized, good]:
            await ws.send(frame.decode())
        await ws.wait_closed()

    async with serve(feed, "127.0.0.1", 0) as server:
        metrics_port = free_port()
        ingestor = _ingestor_of(
            server.sockets[0].getsockname()[1], nats_server, service_logs,
            COINBASE_CHANNELS="ticker",
            METRICS_HOST="127.0.0.1", METRICS_PORT=str(metrics_port),
        )  # fmt: skip
        spawn.append(ingestor.start())
        async with jetstream(nats_server.url) as js:

            async def stored() -> bool:
                return len(await read_stream(js, "MD_RAW")) >= 4

            await wait_until(stored, 20, "the subscribed product's frames in MD_RAW")
            dead = await read_stream(js, "MD_DLQ", "md.dlq.unexpected_product")
            too_big = await read_stream(js, "MD_DLQ", "md.dlq.oversized")
            raw = await read_stream(js, "MD_RAW")
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read()
        )
    assert [m.data for m in dead] == strangers
    assert [m.data for m in too_big] == [oversized[:OVERSIZED_KEPT_BYTES]]
    assert str(len(oversized)) in too_big[0].headers["Ledgerflux-Dlq-Error"]
    assert [m.data for m in raw] == [odd_type, crlf_type, crlf_time, good]
    assert {m.subject for m in raw} == {raw_subject("BTC-USD")}
    products = {
        s.labels["product"]
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
        if "product" in s.labels
    }
    assert products == {"BTC-USD", "-"}, products  # "-": the published dead letters' row
    received = {
        s.labels["type"]: s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
        if s.name == "ledgerflux_ingestor_frames_received_total"
    }
    assert received["other"] == 2 and received["ticker"] == 1, received
    assert ingestor.proc is not None and ingestor.proc.poll() is None, ingestor.tail()
    assert await ingestor.terminate() == 0
