"""Backfill from MD_TICKS: the three forms, chunking, the cap, and the hand-over to live ticks
with no gap and no duplicate while the feed keeps publishing."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from services.common.subjects import tick_subject
from tests.gateway.conftest import StartGateway
from tests.gateway.helpers import (
    Client,
    Feed,
    Stack,
    assert_backfill_then_live,
    stack,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CAP = 2000


@pytest.fixture(scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    # no conflation here: these tests count every tick
    async with stack(
        tmp_path_factory.mktemp("backfill"),
        WS_MAX_MSGS_PER_SEC="1000000",
        WS_BURST="1000000",
        WS_SEND_QUEUE="100000",
        BACKFILL_MAX=str(CAP),
    ) as shared:
        yield shared


async def subscribe(
    gw: Stack, products: list[str], backfill: dict[str, Any], **extra: Any
) -> Client:
    # a product outside COINBASE_PRODUCTS is served once the gateway has seen a tick of it;
    # a JetStream ack does not mean the gateway's live tail has it yet
    for product in products:
        if sent := gw.feed.published.get(product):
            await gw.gateway.wait_latest(product, sent[-1])
    client = await Client.connect(gw.gateway.url)
    await client.send(
        {"op": "subscribe", "products": products, "backfill": backfill, "id": "bf", **extra}
    )
    return client


async def until_done(client: Client, products: list[str]) -> None:
    await client.until(
        lambda c: {m["product"] for m in c.of_type("backfill") if m["done"]} >= set(products)
    )


def interleaved(products: list[str], n: int, start: int = 1) -> list[tuple[str, int]]:
    """``n`` ticks per product, products interleaved at random, seqs with gaps."""
    rng = random.Random(n)
    seqs = {p: start for p in products}
    order = [p for p in products for _ in range(n)]
    rng.shuffle(order)
    out = []
    for product in order:
        seqs[product] += rng.randint(1, 3)
        out.append((product, seqs[product]))
    return out


async def test_last_n_comes_in_chunks_after_the_snapshot_of_the_tick_before(gw: Stack) -> None:
    """``last: 1200`` → ``subscribed``, ``snapshot`` = the tick just before the range, chunks of
    at most 500 ticks (``done`` only on the last), exactly the newest 1200, then live ticks:
    one strictly increasing sequence per product."""
    await gw.feed.publish(interleaved(["LN1-USD", "LN2-USD"], 1500))
    published = gw.feed.published["LN1-USD"]
    client = await subscribe(gw, ["LN1-USD"], {"last": 1200})
    await until_done(client, ["LN1-USD"])
    kinds = [m["type"] for m in client.messages]
    assert kinds == ["welcome", "subscribed", "snapshot", "backfill", "backfill", "backfill"]
    assert client.messages[2]["tick"]["seq"] == published[-1201]
    chunks = client.of_type("backfill")
    assert [len(c["ticks"]) for c in chunks] == [500, 500, 200]
    assert [c["done"] for c in chunks] == [False, False, True]
    assert [t["seq"] for t in client.backfilled("LN1-USD")] == published[-1200:]
    # the ticks are the stored bytes, spliced in unchanged
    assert chunks[0]["ticks"][0] == gw.feed.json("LN1-USD", published[-1200])

    live = [published[-1] + 1, published[-1] + 5]
    await gw.feed.publish(("LN1-USD", s) for s in live)
    await client.until(lambda c: len(c.ticks("LN1-USD")) == 2)
    assert [t["seq"] for t in client.ticks("LN1-USD")] == live
    await client.close()


async def test_last_n_is_exact_however_unevenly_the_product_ticked(gw: Stack) -> None:
    """The read start is estimated from the product's share of the stream: a product that
    ticked mostly long ago, or mostly just now, still gets exactly its newest N."""
    await gw.feed.publish(("SK1-USD", s) for s in range(1, 3000))
    await gw.feed.publish(("SK2-USD", s) for s in range(1, 3000))
    await gw.feed.publish(("SK1-USD", s) for s in range(3000, 3050))
    await gw.feed.publish(("SK2-USD", s) for s in range(3000, 6000))
    for product, expected in (("SK1-USD", range(2950, 3050)), ("SK2-USD", range(5900, 6000))):
        client = await subscribe(gw, [product], {"last": 100})
        await until_done(client, [product])
        assert [t["seq"] for t in client.backfilled(product)] == list(expected), product
        assert client.of_type("snapshot")[0]["tick"]["seq"] == expected[0] - 1
        await client.close()


async def test_a_backfill_larger_than_backfill_max_is_capped_to_the_newest(gw: Stack) -> None:
    """``last`` and ``since_seq`` beyond ``BACKFILL_MAX`` return the newest BACKFILL_MAX ticks
    (``welcome.limits.backfill_max`` says so up front), snapshot = the tick before them."""
    await gw.feed.publish(interleaved(["CAP-USD", "CAQ-USD"], CAP + 700))
    published = gw.feed.published["CAP-USD"]
    for backfill in ({"last": 50_000}, {"since_seq": 0}):
        client = await subscribe(gw, ["CAP-USD"], backfill)
        await until_done(client, ["CAP-USD"])
        assert client.messages[0]["limits"]["backfill_max"] == CAP
        assert [t["seq"] for t in client.backfilled("CAP-USD")] == published[-CAP:]
        assert client.of_type("snapshot")[0]["tick"]["seq"] == published[-CAP - 1]
        await client.close()


async def test_since_seq_starts_at_the_first_tick_at_or_after_it(gw: Stack) -> None:
    """``since_seq: S`` → every stored tick with seq ≥ S (S may fall in a gap), snapshot = the
    tick before; S beyond the newest → empty backfill, snapshot = the newest tick."""
    await gw.feed.publish(("SS1-USD", s) for s in range(10, 400, 3))
    await gw.feed.publish(interleaved(["SS2-USD"], 300))  # other subjects in between
    await gw.feed.publish(("SS1-USD", s) for s in range(400, 800, 3))
    published = gw.feed.published["SS1-USD"]
    for since in (10, 11, 250, 400, 797, 798, 5000):
        client = await subscribe(gw, ["SS1-USD"], {"since_seq": since})
        await until_done(client, ["SS1-USD"])
        expected = [s for s in published if s >= since]
        before = [s for s in published if s < since]
        assert [t["seq"] for t in client.backfilled("SS1-USD")] == expected, since
        snapshot = client.of_type("snapshot")[0]["tick"]
        assert (snapshot["seq"] if snapshot else None) == (before[-1] if before else None), since
        await client.close()


async def test_since_time_returns_ticks_stored_at_or_after_it(gw: Stack) -> None:
    """``since_time`` (RFC 3339) → the ticks MD_TICKS stored at or after that instant."""
    await gw.feed.publish(("ST1-USD", s) for s in range(1, 300))
    await asyncio.sleep(0.3)
    since = datetime.now(UTC)
    await asyncio.sleep(0.05)
    await gw.feed.publish(("ST1-USD", s) for s in range(300, 450))
    for text in (since.isoformat(), since.strftime("%Y-%m-%dT%H:%M:%S.%fZ")):
        client = await subscribe(gw, ["ST1-USD"], {"since_time": text})
        await until_done(client, ["ST1-USD"])
        assert [t["seq"] for t in client.backfilled("ST1-USD")] == list(range(300, 450))
        assert client.of_type("snapshot")[0]["tick"]["seq"] == 299
        await client.close()


async def test_backfill_of_a_product_without_ticks_is_empty_and_done(gw: Stack) -> None:
    """A configured product never ticked: snapshot null and one empty ``done`` chunk, for
    each product of the request in turn."""
    await gw.feed.publish([("EM1-USD", 5)])
    client = await subscribe(gw, ["ETH-USD", "EM1-USD"], {"last": 10})
    await until_done(client, ["ETH-USD", "EM1-USD"])
    assert client.messages[1:] == [
        {"type": "subscribed", "products": ["ETH-USD", "EM1-USD"], "id": "bf"},
        {"type": "snapshot", "product": "ETH-USD", "tick": None},
        {"type": "backfill", "product": "ETH-USD", "ticks": [], "done": True},
        {"type": "snapshot", "product": "EM1-USD", "tick": None},
        {
            "type": "backfill",
            "product": "EM1-USD",
            "ticks": [gw.feed.json("EM1-USD", 5)],
            "done": True,
        },
    ]
    await client.close()


async def test_hand_over_to_live_has_no_gap_and_no_duplicate_under_a_concurrent_feed(
    gw: Stack,
) -> None:
    """While ticks keep flowing, clients subscribing with ``since_seq`` and ``last`` get every
    stored tick from their starting point on, once, strictly increasing, across backfill
    and live."""
    products = ["HO1-USD", "HO2-USD"]
    counter = itertools.count(1)
    stop = asyncio.Event()

    async def produce() -> None:
        while not stop.is_set():
            batch = [(p, next(counter)) for _ in range(10) for p in products]
            await gw.feed.publish(batch)
            await asyncio.sleep(0.002)

    producer = asyncio.create_task(produce())
    clients: list[tuple[int | None, Client]] = []
    try:
        for _ in range(3):
            await asyncio.sleep(0.25)
            start = gw.feed.published["HO1-USD"][-1] - 100
            clients.append((start, await subscribe(gw, products, {"since_seq": start})))
            clients.append((None, await subscribe(gw, products, {"last": 300})))
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await producer
    for since, client in clients:
        await until_done(client, products)
        await client.drain(quiet_s=0.5)
        assert_backfill_then_live(client, products, gw.feed.published, since)
        await client.close()


async def test_backfill_unavailable_still_subscribes_live(
    start_gateway: StartGateway, feed: Feed
) -> None:
    """JetStream cannot serve the backfill in time: ``subscribed``, the current snapshot,
    ``backfill_unavailable`` with the request id — and live ticks still flow."""
    await feed.publish(("BTC-USD", s) for s in range(1, 50))
    gateway = await start_gateway(BACKFILL_TIMEOUT_S="0.0001")
    client = await Client.connect(gateway.url)
    await client.send(
        {"op": "subscribe", "products": ["BTC-USD"], "backfill": {"last": 10}, "id": "nope"}
    )
    assert (await client.expect("subscribed"))["id"] == "nope"
    assert (await client.expect("snapshot"))["tick"]["seq"] == 49
    error = await client.expect("error")
    assert (error["code"], error["id"]) == ("backfill_unavailable", "nope")
    await feed.publish([("BTC-USD", 50)])
    assert (await client.expect("tick"))["seq"] == 50
    assert await gateway.wait_metric(
        "ledgerflux_gateway_backfill_requests_total", 1, form="last", outcome="unavailable"
    )
    await client.close()


async def test_a_message_on_md_ticks_that_is_not_a_tick_is_skipped_and_counted(gw: Stack) -> None:
    """Live and in a backfill: skipped, counted by path, and the ticks around it still
    flow in order (it was logged per message, never counted)."""
    before = {
        path: await asyncio.to_thread(
            gw.gateway.metric, "ledgerflux_gateway_bad_ticks_total", path=path
        )
        for path in ("live", "backfill")
    }
    await gw.feed.publish([("BT1-USD", 1)])
    await gw.feed.js.publish(tick_subject("BT1-USD", 4), b"not a tick")
    await gw.feed.publish([("BT1-USD", 2)])
    client = await subscribe(gw, ["BT1-USD"], {"last": 10})
    await until_done(client, ["BT1-USD"])
    assert [t["seq"] for t in client.backfilled("BT1-USD")] == [1, 2]
    assert await gw.gateway.wait_metric(
        "ledgerflux_gateway_bad_ticks_total", before["live"] + 1, path="live"
    )
    assert await gw.gateway.wait_metric(
        "ledgerflux_gateway_bad_ticks_total", before["backfill"] + 1, path="backfill"
    )
    await gw.feed.publish([("BT1-USD", 3)])
    assert (await client.expect("tick"))["seq"] == 3
    await client.close()


async def test_a_ping_during_a_backfill_is_answered_before_it_ends_and_commands_keep_order(
    gw: Stack,
) -> None:
    """A 2,000-tick backfill (four chunks) with a ping right behind it: the pong comes before
    the last chunk (it waited for the whole backfill). An unsubscribe sent right after still
    waits for the backfill: ``unsubscribed`` comes after its ``done``."""
    await gw.feed.publish(interleaved(["PB1-USD"], CAP))
    client = await subscribe(gw, ["PB1-USD"], {"last": CAP})
    await client.send({"op": "ping", "id": "mid"})
    await client.send({"op": "unsubscribe", "products": ["PB1-USD"], "id": "after"})
    await client.until(lambda c: bool(c.of_type("unsubscribed")))
    kinds = [(m["type"], m.get("id"), m.get("done")) for m in client.messages]
    done = kinds.index(("backfill", None, True))
    assert kinds.index(("pong", "mid", None)) < done, kinds
    assert kinds.index(("unsubscribed", "after", None)) > done, kinds
    assert len(client.backfilled("PB1-USD")) == CAP
    await client.close()
