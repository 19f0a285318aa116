"""``?batch=true`` over real sockets while ticks keep flowing: each client gets exactly the
ticks of its subscriptions, once, in order, across snapshot and backfill hand-overs and
rate limiting, and the metrics count what was sent."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from itertools import pairwise
from typing import Any

import pytest

from tests.gateway.conftest import StartGateway
from tests.gateway.helpers import (
    Client,
    Feed,
    Stack,
    assert_backfill_then_live,
    produce_twice_the_limit,
    stack,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

BATCH = "?batch=true"


@pytest.fixture(scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    # no conflation here: these tests count every tick
    async with stack(
        tmp_path_factory.mktemp("batch"),
        WS_MAX_MSGS_PER_SEC="1000000",
        WS_BURST="1000000",
        WS_SEND_QUEUE="100000",
    ) as shared:
        yield shared


async def running_feed(
    feed: Feed, products: list[str], body: Callable[[], Awaitable[None]]
) -> None:
    """Publish ticks of ``products`` round robin, a few at a time, while ``body`` runs."""
    counter = itertools.count(1)
    stop = asyncio.Event()

    async def produce() -> None:
        while not stop.is_set():
            await feed.publish([(p, next(counter)) for _ in range(5) for p in products])
            await asyncio.sleep(0.003)

    producer = asyncio.create_task(produce())
    try:
        await body()
    finally:
        stop.set()
        await producer


async def subscribed(url: str, products: list[str], **extra: Any) -> Client:
    client = await Client.connect(url)
    await client.send({"op": "subscribe", "products": products, "id": "s", **extra})
    await client.until(lambda c: bool(c.of_type("subscribed")))
    return client


def seqs_after_snapshot(client: Client, product: str) -> tuple[int, list[int]]:
    """The snapshot's seq and the live ticks' seqs of ``product``."""
    [snapshot] = [m for m in client.of_type("snapshot") if m["product"] == product]
    return snapshot["tick"]["seq"], [t["seq"] for t in client.ticks(product)]


async def test_batch_clients_get_exactly_their_products_once_in_order(gw: Stack) -> None:
    """Batch clients with different (and equal) subscription sets, subscribing one after the
    other while the feed runs: each gets, per subscribed product, every tick after its
    snapshot once and in order, nothing of other products, every frame a JSON array; one
    unsubscribing mid-stream stops cleanly. Ticks, batch frames, messages per frame and
    buffer depth metrics add up to what the clients received."""
    products = ["WG1-USD", "WG2-USD", "WG3-USD"]
    await gw.feed.publish((p, 0) for p in products)
    await gw.gateway.wait_latest(products[-1], 0)
    names = (
        "ledgerflux_gateway_messages_out_total",
        "ledgerflux_gateway_batch_frames_total",
        "ledgerflux_gateway_batch_messages_sum",
        "ledgerflux_gateway_buffer_depth_sum",
        "ledgerflux_gateway_inline_writes_total",
    )
    before = [await asyncio.to_thread(gw.gateway.metric, n, **_tick(n)) for n in names]
    subscriptions = [products[:2], products[:2], products[1:], products[2:], products]
    clients: list[Client] = []
    url = gw.gateway.url
    leaving: Client | None = None

    async def subscribe_in_turn() -> None:
        nonlocal leaving
        for i, chosen in enumerate(subscriptions):
            await asyncio.sleep(0.15)
            clients.append(await subscribed(url + BATCH, chosen, snapshot=True))
            if i == 1:
                leaving = await subscribed(url + BATCH, products, snapshot=True)
        plain = await subscribed(url, products, snapshot=True)
        clients.append(plain)
        await asyncio.sleep(0.3)
        assert leaving is not None
        await leaving.send({"op": "unsubscribe", "products": [products[1]], "id": "u"})
        await leaving.until(lambda c: bool(c.of_type("unsubscribed")))
        await asyncio.sleep(0.3)

    await running_feed(gw.feed, products, subscribe_in_turn)
    assert leaving is not None
    everyone = [*clients, leaving]
    for client in everyone:
        await client.drain(quiet_s=0.4)
    published = gw.feed.published
    for client, chosen in zip(clients, [*subscriptions, products], strict=True):
        for product in products:
            if product not in chosen:
                assert not client.ticks(product)
                continue
            snapshot, got = seqs_after_snapshot(client, product)
            assert got == [s for s in published[product] if s > snapshot], (chosen, product)
    for product in (products[0], products[2]):
        snapshot, got = seqs_after_snapshot(leaving, product)
        assert got == [s for s in published[product] if s > snapshot]
    snapshot, got = seqs_after_snapshot(leaving, products[1])
    assert got == [s for s in published[products[1]] if s > snapshot][: len(got)]
    gone = leaving.messages.index({"type": "unsubscribed", "products": [products[1]], "id": "u"})
    assert not [m for m in leaving.messages[gone:] if m.get("product") == products[1]]

    batch_clients = [c for c in everyone if c is not clients[-1]]
    assert all(c.array_frames == c.frames for c in batch_clients)
    after = [await asyncio.to_thread(gw.gateway.metric, n, **_tick(n)) for n in names]
    ticks, frames, in_frames, depth, inline = (a - b for a, b in zip(after, before, strict=True))
    assert ticks == sum(len(c.of_type("tick")) for c in everyone)
    assert frames == sum(c.frames for c in batch_clients)
    assert in_frames == sum(len(c.messages) for c in batch_clients)
    # every message was either in a writer's flush or written at once by the hub (the plain
    # client's after each NATS read, the batch clients' at the flush tick)
    assert depth + inline == sum(len(c.messages) for c in everyone)
    # without the batch clients' inline writes, their messages alone would be in the depth
    assert inline > 0 and depth < sum(len(c.messages) for c in batch_clients)
    for client in everyone:
        await client.close()


def _tick(name: str) -> dict[str, str]:
    return {"type": "tick"} if name == "ledgerflux_gateway_messages_out_total" else {}


async def test_batch_hand_over_from_backfill_to_live_has_no_gap_and_no_duplicate(
    gw: Stack,
) -> None:
    """Batch clients subscribing with ``since_seq`` or ``last`` while the feed runs, next to
    one that takes the same products' windows all along: every stored tick from each
    starting point on, once, strictly increasing, across backfill and live."""
    products = ["WH1-USD", "WH2-USD"]
    await gw.feed.publish((p, 0) for p in products)
    await gw.gateway.wait_latest(products[-1], 0)
    url = gw.gateway.url + BATCH
    steady = await subscribed(url, products, snapshot=False)
    clients: list[tuple[int | None, Client]] = []

    async def subscribe_in_turn() -> None:
        for _ in range(3):
            await asyncio.sleep(0.25)
            start = gw.feed.published[products[0]][-1] - 100
            for backfill, since in (({"since_seq": start}, start), ({"last": 300}, None)):
                client = await Client.connect(url)
                await client.send({"op": "subscribe", "products": products, "backfill": backfill})
                clients.append((since, client))
        await asyncio.sleep(0.5)

    await running_feed(gw.feed, products, subscribe_in_turn)
    for since, client in clients:
        await client.until(
            lambda c: {m["product"] for m in c.of_type("backfill") if m["done"]} >= set(products)
        )
        await client.drain(quiet_s=0.5)
        assert_backfill_then_live(client, products, gw.feed.published, since)
        await client.close()
    await steady.drain(quiet_s=0.3)
    for product in products:
        assert [t["seq"] for t in steady.ticks(product)] == gw.feed.published[product][1:]
    await steady.close()


async def test_a_rate_limited_batch_client_gets_conflation_with_skipped(
    start_gateway: StartGateway, feed: Feed
) -> None:
    """Batch clients limited to R ticks/s with burst B (two with the same products: one
    group, a bucket each) receive at most R·t + B ticks in t seconds each; each product
    ends on its newest tick, received + Σ skipped = published, seq strictly increasing."""
    rate, burst = 100, 40
    gateway = await start_gateway(WS_MAX_MSGS_PER_SEC=str(rate), WS_BURST=str(burst))
    products = ["WR1-USD", "WR2-USD", "WR3-USD"]
    await feed.publish((p, 1) for p in products)  # seen on MD_TICKS: served
    await gateway.wait_latest(products[-1], 1)
    connected = time.monotonic()  # the buckets are created after this, full
    clients = [await subscribed(gateway.url + BATCH, products, snapshot=False) for _ in range(2)]

    producer = asyncio.create_task(produce_twice_the_limit(feed, products))
    while not producer.done():
        for client in clients:
            await client.drain(quiet_s=0.02, timeout=0.05)
            elapsed = time.monotonic() - connected
            count = len(client.of_type("tick"))
            assert count <= rate * elapsed + burst + 3, f"{count} ticks in {elapsed:.2f}s"
    await producer
    for client in clients:
        await client.drain(quiet_s=0.5)
    elapsed = time.monotonic() - connected
    for client in clients:
        ticks = client.of_type("tick")
        assert client.array_frames == client.frames
        assert len(ticks) <= rate * elapsed + burst + 3
        assert len(ticks) >= rate * (elapsed - 1.0), "the limit starved the client"
        for product in products:
            got = client.ticks(product)
            published = feed.published[product][1:]  # the first was published before
            assert all(a["seq"] < b["seq"] for a, b in pairwise(got)), product
            assert got[-1]["seq"] == published[-1], f"{product} did not end on its newest"
            assert len(got) + sum(t.get("skipped", 0) for t in got) == len(published), product
        assert sum(t.get("skipped", 0) for t in ticks) > 0, "the test never conflated"
        await client.close()
