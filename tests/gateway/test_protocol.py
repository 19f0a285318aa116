"""DESIGN §8 conformance: every message and error of the client protocol, over a real socket
to a real gateway process fed from a real MD_TICKS stream."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import websockets

from tests.gateway.helpers import Client, Stack, fresh_seqs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

seqs = fresh_seqs


@pytest.fixture
def gw(default_gw: Stack) -> Stack:
    return default_gw


@pytest.fixture
async def client(gw: Stack) -> AsyncIterator[Client]:
    client = await Client.connect(gw.gateway.url)
    assert (await client.recv())["type"] == "welcome"
    yield client
    await client.close()


async def test_welcome_is_the_first_message_and_announces_limits(gw: Stack) -> None:
    """On connect the server sends ``welcome`` with its limits, before anything is asked."""
    client = await Client.connect(gw.gateway.url)
    welcome = await client.recv()
    assert welcome["type"] == "welcome"
    assert welcome["limits"] == {
        "max_msgs_per_sec": 1000.0,
        "burst": 2000,
        "max_frame_bytes": 65536,
        "max_subscriptions": 100,
        "cmds_per_sec": 20.0,
        "backfill_max": 10_000,
    }
    await client.close()


async def test_ping_gets_pong_with_the_request_id(client: Client) -> None:
    """``ping`` → ``pong`` echoing a string or integer id, ``null`` without one."""
    for request_id in ("p-1", 7, None):
        ping: dict[str, Any] = (
            {"op": "ping"} if request_id is None else {"op": "ping", "id": request_id}
        )
        await client.send(ping)
        assert await client.recv() == {"type": "pong", "id": request_id}


async def test_subscribe_sends_subscribed_snapshot_then_live_ticks_as_stored(
    gw: Stack, client: Client
) -> None:
    """``subscribed`` (products, id), one ``snapshot`` per product (the latest tick, or null
    for a product with no tick yet), then live ticks byte for byte as MD_TICKS stores them."""
    first = seqs(3)
    await gw.feed.publish(("SOL-USD", s) for s in first)
    await gw.gateway.wait_latest("SOL-USD", first[-1])
    await client.send({"op": "subscribe", "products": ["SOL-USD", "NIL-USD"], "id": "s1"})
    assert await client.recv() == {
        "type": "subscribed",
        "products": ["SOL-USD", "NIL-USD"],
        "id": "s1",
    }
    snapshots = {m["product"]: m for m in [await client.recv(), await client.recv()]}
    assert snapshots["SOL-USD"]["type"] == "snapshot"
    assert snapshots["SOL-USD"]["tick"] == gw.feed.json("SOL-USD", first[-1])
    assert snapshots["NIL-USD"] == {"type": "snapshot", "product": "NIL-USD", "tick": None}

    live = seqs(20)
    await gw.feed.publish(("SOL-USD", s) for s in live)
    raw = [await asyncio.wait_for(client.ws.recv(), 5) for _ in live]
    assert [json.loads(r)["seq"] for r in raw] == live
    # each frame is the stored JSON itself, byte for byte: encoded once, by the normalizer
    assert raw == [gw.feed.stored["SOL-USD", s].decode() for s in live]


async def test_subscribe_without_snapshot_sends_only_live_ticks(gw: Stack, client: Client) -> None:
    """``snapshot: false``: ``subscribed``, then nothing until a new tick."""
    await client.send({"op": "subscribe", "products": ["BTC-USD"], "snapshot": False, "id": 3})
    assert await client.recv() == {"type": "subscribed", "products": ["BTC-USD"], "id": 3}
    live = seqs(2)
    await gw.feed.publish(("BTC-USD", s) for s in live)
    assert [(await client.recv())["seq"] for _ in live] == live


async def test_product_ids_are_case_insensitive_and_replies_use_the_canonical_id(
    gw: Stack, client: Client
) -> None:
    """``btc-usd`` is ``BTC-USD`` (as in the REST paths): subscribed and unsubscribed echo
    the canonical id, and the ticks come."""
    await client.send({"op": "subscribe", "products": ["btc-usd"], "snapshot": False, "id": "c"})
    assert await client.recv() == {"type": "subscribed", "products": ["BTC-USD"], "id": "c"}
    live = seqs(1)
    await gw.feed.publish(("BTC-USD", s) for s in live)
    assert (await client.expect("tick"))["seq"] == live[0]
    await client.send({"op": "unsubscribe", "products": ["Btc-Usd"], "id": "u"})
    assert await client.recv() == {"type": "unsubscribed", "products": ["BTC-USD"], "id": "u"}


async def test_unsubscribe_stops_the_product(gw: Stack, client: Client) -> None:
    """``unsubscribed`` echoes products and id; no tick of that product follows."""
    await client.send({"op": "subscribe", "products": ["BTC-USD", "SOL-USD"], "snapshot": False})
    await client.expect("subscribed")
    await client.send({"op": "unsubscribe", "products": ["BTC-USD"], "id": "u1"})
    assert await client.expect("unsubscribed") == {
        "type": "unsubscribed",
        "products": ["BTC-USD"],
        "id": "u1",
    }
    await gw.feed.publish([("BTC-USD", seqs(1)[0]), ("SOL-USD", seqs(1)[0])])
    await client.drain()
    after = client.messages[
        client.messages.index({"type": "unsubscribed", "products": ["BTC-USD"], "id": "u1"}) :
    ]
    assert [m["product"] for m in after if m["type"] == "tick"] == ["SOL-USD"]


def sub(rest: str) -> str:
    return '{"op": "subscribe", "products": ["BTC-USD"], ' + rest + "}"


BAD_REQUESTS: list[tuple[str, str | None]] = [
    ("this is not json", None),
    ('{"op": "subscribe", "products": "BTC-USD", "id": "r1"}', "r1"),
    ('{"op": "dance", "id": "r2"}', "r2"),
    ('{"op": "subscribe", "id": "r3"}', "r3"),
    ('{"op": "subscribe", "products": [], "id": "r4"}', "r4"),
    (sub('"bogus": 1, "id": "r5"'), "r5"),
    (sub('"backfill": {"last": 5, "since_seq": 3}, "id": "r6"'), "r6"),
    (sub('"backfill": {"since_time": "yesterday"}, "id": "r7"'), "r7"),
    (sub('"backfill": {"since_time": "2026-01-01T00:00:00"}, "id": "r8"'), "r8"),
    # RFC 3339 needs seconds and a zone; datetime.fromisoformat took these
    (sub('"backfill": {"since_time": "2026-01-01T00:00Z"}, "id": "r8a"'), "r8a"),
    (sub('"backfill": {"since_time": "2026-W01-1T00:00:00Z"}, "id": "r8b"'), "r8b"),
    (sub('"backfill": {"since_time": "20260101T000000Z"}, "id": "r8c"'), "r8c"),
    (sub('"backfill": {"since_time": "2026-02-31T00:00:00Z"}, "id": "r8d"'), "r8d"),
    (sub('"backfill": {"last": 0}, "id": "r9"'), "r9"),
    (sub('"backfill": {}, "id": "r10"'), "r10"),
    ('{"op": "unsubscribe", "products": [], "id": "r11"}', "r11"),
    ('{"op": "ping", "id": {"nested": true}}', None),
    ("[1, 2, 3]", None),
]


async def test_bad_input_gets_bad_request_with_its_id_and_the_connection_stays(
    client: Client,
) -> None:
    """Invalid JSON, wrong types, unknown op or field, missing or empty products, a malformed
    backfill: each gets ``bad_request`` with the request's id, and the socket stays usable."""
    for raw, request_id in BAD_REQUESTS:
        await client.ws.send(raw)
        reply = await client.recv()
        assert reply["type"] == "error", raw
        assert reply["code"] == "bad_request", raw
        assert reply["id"] == request_id, raw
        assert reply["message"], raw
    await client.send({"op": "ping", "id": "still-here"})
    assert await client.recv() == {"type": "pong", "id": "still-here"}


async def test_unknown_product_is_refused_with_its_id(client: Client) -> None:
    """A product neither configured nor seen on MD_TICKS (or not a product id at all) gets
    ``unknown_product``, and nothing is subscribed; unsubscribing one too (it was
    acknowledged, echoing whatever was sent)."""
    for op in ("subscribe", "unsubscribe"):
        for products in (["NOPE-USD"], ["BTC-USD", "NOPE-USD"], ["BAD.PRODUCT"], [""]):
            await client.send({"op": op, "products": products, "id": "x"})
            reply = await client.recv()
            assert (reply["type"], reply["code"], reply["id"]) == ("error", "unknown_product", "x")
    # a served product that was never subscribed: already unsubscribed, so acknowledged
    await client.send({"op": "unsubscribe", "products": ["BTC-USD"], "id": "y"})
    assert await client.recv() == {"type": "unsubscribed", "products": ["BTC-USD"], "id": "y"}


async def test_ten_thousand_products_get_too_many_subscriptions_and_the_socket_stays(
    gw: Stack, client: Client
) -> None:
    """A 10,000-product subscribe (just under the frame limit) gets ``too_many_subscriptions``;
    the connection then still subscribes normally."""
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    products = ["".join(p) for p in itertools.islice(itertools.product(alphabet, repeat=3), 10_000)]
    frame = json.dumps(
        {"op": "subscribe", "products": products, "id": "big"}, separators=(",", ":")
    )
    assert len(frame) < 65_536
    await client.ws.send(frame)
    reply = await client.recv()
    assert (reply["type"], reply["code"], reply["id"]) == ("error", "too_many_subscriptions", "big")
    await client.send({"op": "subscribe", "products": ["BTC-USD"], "id": "small"})
    assert (await client.recv())["type"] == "subscribed"


async def test_subscribing_again_sends_no_second_snapshot(gw: Stack, client: Client) -> None:
    """A product subscribed twice: ``subscribed`` again, but no snapshot for it, since the
    snapshot would repeat a seq the client already has; seqs keep strictly increasing."""
    first = seqs(2)
    await gw.feed.publish(("ETH-USD", s) for s in first)
    await gw.gateway.wait_latest("ETH-USD", first[-1])
    await client.send({"op": "subscribe", "products": ["ETH-USD"]})
    await client.expect("subscribed")
    assert (await client.expect("snapshot"))["tick"]["seq"] == first[-1]
    live = seqs(1)
    await gw.feed.publish(("ETH-USD", s) for s in live)
    assert (await client.recv())["seq"] == live[0]
    await client.send({"op": "subscribe", "products": ["ETH-USD", "BTC-USD"], "id": "again"})
    assert await client.recv() == {
        "type": "subscribed",
        "products": ["ETH-USD", "BTC-USD"],
        "id": "again",
    }
    assert (await client.recv())["product"] == "BTC-USD"  # the new product's snapshot only
    more = seqs(2)
    await gw.feed.publish(("ETH-USD", s) for s in more)
    assert [(await client.recv())["seq"] for _ in more] == more


async def test_backfill_for_an_already_subscribed_product_is_a_bad_request(
    client: Client,
) -> None:
    """Older ticks after live ones would break per-product order: the request is refused."""
    await client.send({"op": "subscribe", "products": ["BTC-USD"], "snapshot": False})
    await client.expect("subscribed")
    await client.send(
        {"op": "subscribe", "products": ["BTC-USD"], "backfill": {"last": 5}, "id": "again"}
    )
    reply = await client.expect("error")
    assert (reply["code"], reply["id"]) == ("bad_request", "again")


async def test_batch_clients_get_json_arrays_of_the_same_messages(gw: Stack) -> None:
    """``?batch=true``: every frame is a JSON array (the welcome too); ticks arrive coalesced,
    in order, with nothing lost."""
    client = await Client.connect(gw.gateway.url + "?batch=true")
    await client.send({"op": "subscribe", "products": ["SOL-USD"], "snapshot": False, "id": "b"})
    await client.until(lambda c: any(m["type"] == "subscribed" for m in c.messages))
    assert client.messages[0]["type"] == "welcome"
    live = seqs(300)
    await gw.feed.publish(("SOL-USD", s) for s in live)
    await client.until(lambda c: len(c.ticks("SOL-USD")) >= len(live))
    assert [t["seq"] for t in client.ticks("SOL-USD")] == live
    assert client.array_frames == client.frames
    assert client.frames < len(live) / 3, "ticks were not coalesced"
    await client.close()


async def test_rest_products_and_latest_tick(gw: Stack) -> None:
    """``/v1/products`` lists served products with seq and staleness; ``/v1/ticks/{p}/latest``
    returns the stored tick, 404 for an unknown product; ``/`` serves the page."""
    live = seqs(1)
    await gw.feed.publish([("SOL-USD", live[0])])
    await gw.gateway.wait_latest("SOL-USD", live[0])

    get = gw.gateway.get
    status, body = await asyncio.to_thread(get, "/v1/products")
    products = {p["product"]: p for p in json.loads(body)["products"]}
    assert status == 200 and {"BTC-USD", "NIL-USD", "SOL-USD"} <= set(products)
    assert products["SOL-USD"]["seq"] == live[0]
    status, body = await asyncio.to_thread(get, "/v1/ticks/sol-usd/latest")
    assert status == 200 and json.loads(body)["seq"] == live[0]
    status, body = await asyncio.to_thread(get, "/v1/ticks/NOPE-USD/latest")
    assert status == 404 and json.loads(body)["error"] == "unknown_product"
    # configured, never ticked: still 404, but the body says it is served (WebSocket: null
    # snapshot)
    status, body = await asyncio.to_thread(get, "/v1/ticks/nil-usd/latest")
    assert status == 404 and json.loads(body)["error"] == "no_tick", body
    status, body = await asyncio.to_thread(get, "/")
    assert status == 200 and b"<table" in body


async def test_binary_frames_are_read_as_commands_too(gw: Stack) -> None:
    """A command sent as a binary frame is answered like a text one (replies are text)."""
    async with websockets.connect(gw.gateway.url) as ws:
        await ws.recv()
        await ws.send(b'{"op": "ping", "id": "bin"}')
        reply = await asyncio.wait_for(ws.recv(), 5)
        assert isinstance(reply, str) and json.loads(reply) == {"type": "pong", "id": "bin"}


async def test_disconnects_are_counted_by_how_the_client_left(gw: Stack) -> None:
    """A close frame counts under its code; a socket dropped without one as abnormal: 1005
    when the reader sees it first (uvicorn's 'no status'), 1006 when a write fails first
    (that path recorded 1000)."""
    name = "ledgerflux_gateway_disconnects_total"

    def counts() -> dict[str, float]:
        return {c: gw.gateway.metric(name, code=c) for c in ("1000", "1005", "1006")}

    before = await asyncio.to_thread(counts)
    polite = await Client.connect(gw.gateway.url)
    await polite.recv()
    await polite.ws.close(1000)
    dropped = await Client.connect(gw.gateway.url)
    await dropped.recv()
    dropped.ws.transport.abort()  # RST, no close frame
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        now = await asyncio.to_thread(counts)
        abnormal = now["1005"] + now["1006"] - before["1005"] - before["1006"]
        if now["1000"] > before["1000"] and abnormal >= 1:
            break
        assert asyncio.get_running_loop().time() < deadline, (before, now)
        await asyncio.sleep(0.05)
    assert (now["1000"] - before["1000"], abnormal) == (1, 1)
