"""The ws feed over a real socket: message shapes, subscriptions, errors, determinism."""

from __future__ import annotations

import asyncio
import json
import socket
from collections import defaultdict
from decimal import Decimal
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from services.feedsim.market import derive_spec

from .helpers import (
    channels_of,
    check_heartbeat,
    check_ticker,
    client,
    drain_until_heartbeats,
    recv,
    recv_type,
    running,
    send,
    subscribe,
    wait_for,
)

PRODUCTS = ["BTC-USD", "ETH-USD", "DOGE-USD"]


async def test_ticker_and_heartbeat_match_coinbase_fields() -> None:
    """Tickers and heartbeats carry exactly the documented fields and JSON types, sane
    decimals on the product's tick grid, and heartbeats report the last ticker's ids."""
    async with (
        running(products=PRODUCTS, rate=600, heartbeat_interval_s=0.1) as sim,
        client(sim) as ws,
    ):
        subs = await subscribe(ws, PRODUCTS, ["ticker", "heartbeat"])
        assert channels_of(subs) == {"ticker": PRODUCTS, "heartbeat": PRODUCTS}
        last: dict[str, dict[str, Any]] = {}
        heartbeats_checked = 0
        async with asyncio.timeout(5):
            while heartbeats_checked < 6 or len(last) < len(PRODUCTS):
                msg = await recv(ws)
                pid = msg["product_id"]
                if msg["type"] == "ticker":
                    check_ticker(msg)
                    step = Decimal(derive_spec(pid).quote_increment)
                    assert Decimal(msg["price"]) % step == 0
                    prev = last.get(pid)
                    if prev is not None:
                        assert msg["sequence"] > prev["sequence"]
                        assert msg["trade_id"] >= prev["trade_id"] + 1
                        assert Decimal(msg["volume_24h"]) > Decimal(prev["volume_24h"])
                    last[pid] = msg
                else:
                    check_heartbeat(msg)
                    assert msg["last_trade_id"] == last[pid]["trade_id"]
                    assert msg["sequence"] == last[pid]["sequence"]
                    heartbeats_checked += 1


async def test_first_ticker_is_last_trade_snapshot() -> None:
    """On subscribe: subscriptions, then the last trade as a ticker; last_match shares its
    sequence and shows the maker side."""
    async with running(products=["ETH-USD"], rate=0) as sim, client(sim) as ws:
        await subscribe(ws, ["ETH-USD"], ["ticker", "matches"])
        ticker = await recv_type(ws, "ticker")
        last_match = await recv_type(ws, "last_match")
        check_ticker(ticker)
        assert ticker == sim.stats()["products"]["ETH-USD"]["last_ticker"]
        assert last_match["sequence"] == ticker["sequence"]
        assert last_match["trade_id"] == ticker["trade_id"]
        assert last_match["side"] == {"buy": "sell", "sell": "buy"}[ticker["side"]]


async def test_matches_one_per_trade() -> None:
    """Each ticker is backed by matches whose last one has the ticker's trade_id and sequence;
    trade ids are contiguous across matches."""
    async with running(products=["BTC-USD"], rate=400) as sim, client(sim) as ws:
        await subscribe(ws, ["BTC-USD"], ["matches", "ticker"])
        matches: dict[int, dict[str, Any]] = {}
        tickers: list[dict[str, Any]] = []
        async with asyncio.timeout(5):
            while len(tickers) < 40:
                msg = await recv(ws)
                if msg["type"] == "match":
                    matches[msg["trade_id"]] = msg
                elif msg["type"] == "ticker" and matches:
                    tickers.append(msg)
        ids = sorted(matches)
        assert ids == list(range(ids[0], ids[-1] + 1))
        for t in tickers:
            m = matches[t["trade_id"]]
            assert (m["sequence"], m["price"], m["size"]) == (
                t["sequence"],
                t["price"],
                t["last_size"],
            )
            assert m["side"] != t["side"]


async def test_subscriptions_are_cumulative() -> None:
    """Every subscribe/unsubscribe is answered with the full current set of subscriptions."""
    async with running(products=["BTC-USD", "ETH-USD"], rate=0) as sim, client(sim) as ws:
        subs = await subscribe(ws, ["BTC-USD"], ["ticker"])
        assert channels_of(subs) == {"ticker": ["BTC-USD"]}
        subs = await subscribe(ws, [], [{"name": "heartbeat", "product_ids": ["ETH-USD"]}])
        assert channels_of(subs) == {"ticker": ["BTC-USD"], "heartbeat": ["ETH-USD"]}
        subs = await subscribe(ws, ["ETH-USD"], ["ticker"])
        assert channels_of(subs)["ticker"] == ["BTC-USD", "ETH-USD"]
        await send(ws, {"type": "unsubscribe", "product_ids": ["BTC-USD"], "channels": ["ticker"]})
        subs = await recv_type(ws, "subscriptions")
        assert channels_of(subs) == {"ticker": ["ETH-USD"], "heartbeat": ["ETH-USD"]}
        await send(ws, {"type": "unsubscribe", "channels": ["heartbeat"]})
        subs = await recv_type(ws, "subscriptions")
        assert channels_of(subs) == {"ticker": ["ETH-USD"]}


async def test_errors_keep_valid_rest_flowing() -> None:
    """Unknown product/channel and auth-only channels error; the valid part still ticks."""
    async with running(products=["BTC-USD"], rate=300) as sim, client(sim) as ws:
        await send(
            ws,
            {
                "type": "subscribe",
                "product_ids": ["BTC-USD", "XYZ-USD"],
                "channels": ["ticker", "level2", "nonsense", {"name": "heartbeat"}],
            },
        )
        reasons = []
        while (msg := await recv(ws))["type"] == "error":
            assert msg["message"] == "Failed to subscribe"
            reasons.append(msg["reason"])
        assert reasons == [
            "XYZ-USD is not a valid product",
            "level2, level3, and full channels now require authentication",
            "nonsense is not a valid channel",
        ]
        assert msg["type"] == "subscriptions"
        assert channels_of(msg) == {"ticker": ["BTC-USD"], "heartbeat": ["BTC-USD"]}
        await send(ws, {"type": "subscribe", "channels": ["heartbeat"]})
        await send(ws, {"type": "subscribe", "product_ids": ["BTC-USD"], "channels": ["full"]})
        await ws.send("this is not json")
        wanted = {
            "You need to specify at least one product ID for channel heartbeat",
            "level2, level3, and full channels now require authentication",
            "Malformed JSON",
        }
        seen: set[str] = set()
        tickers = 0
        async with asyncio.timeout(5):
            while seen != wanted or tickers < 20:
                msg = await recv(ws)
                if msg["type"] == "error":
                    seen.add(msg.get("reason") or msg["message"])
                elif msg["type"] == "ticker":
                    tickers += 1


async def test_no_subscribe_means_disconnect() -> None:
    """A client that doesn't subscribe within the timeout is closed; one that does stays."""
    async with (
        running(products=["BTC-USD"], rate=0, subscribe_timeout_s=0.3) as sim,
        client(sim) as idle,
        client(sim) as active,
    ):
        await subscribe(active, ["BTC-USD"], ["ticker"])
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(idle.recv(), 2)
        assert idle.close_code == 1008
        await asyncio.sleep(0.3)
        await send(
            active, {"type": "subscribe", "product_ids": ["BTC-USD"], "channels": ["status"]}
        )
        assert (await recv_type(active, "subscriptions"))["type"] == "subscriptions"


async def _record(seed: int, rate: float, products: list[str]) -> dict[str, list[dict[str, Any]]]:
    """All tickers of a 600-tick run, per product, as one client saw them."""
    async with (
        running(
            products=products,
            rate=rate,
            seed=seed,
            max_ticks=600,
            wait_subscribers=1,
            heartbeat_interval_s=0.05,
        ) as sim,
        client(sim) as ws,
    ):
        await subscribe(ws, products, ["ticker", "heartbeat"])
        await wait_for(lambda: sim.ticks_total >= 600)
        final = {p: s["trade_id"] for p, s in sim.stats()["products"].items()}
        frames = await drain_until_heartbeats(ws, final)
    per_product: dict[str, list[dict[str, Any]]] = defaultdict(list)
    hb_ok = 0
    for msg in frames:
        if msg["type"] == "ticker":
            per_product[msg["product_id"]].append({k: v for k, v in msg.items() if k != "time"})
        elif msg["type"] == "heartbeat" and per_product[msg["product_id"]]:
            assert msg["last_trade_id"] == per_product[msg["product_id"]][-1]["trade_id"]
            hb_ok += 1
    assert hb_ok > 0
    for stream in per_product.values():
        seqs = [m["sequence"] for m in stream]
        assert seqs == sorted(set(seqs)), "sequence must strictly increase per product"
    return per_product


async def test_same_seed_same_stream_at_any_rate() -> None:
    """The per-product ticker sequence (all but time) depends on seed and products only."""
    products = ["BTC-USD", "ETH-USD", "SIM0001-USD"]
    fast = await _record(seed=11, rate=20_000, products=products)
    slow = await _record(seed=11, rate=3_000, products=products)
    assert fast == slow
    assert sum(len(v) for v in fast.values()) == 600 + len(products)  # + subscribe snapshots
    other = await _record(seed=12, rate=20_000, products=products)
    assert other["BTC-USD"] != fast["BTC-USD"]


async def test_status_channel() -> None:
    """status needs no product ids and lists every product with its increments."""
    async with running(products=["BTC-USD", "ADA-USD"], rate=0) as sim, client(sim) as ws:
        subs = await subscribe(ws, [], ["status"])
        assert channels_of(subs) == {"status": []}
        status = await recv_type(ws, "status")
        increments = {p["id"]: p["quote_increment"] for p in status["products"]}
        assert increments == {"BTC-USD": "0.01", "ADA-USD": "0.0001"}
        json.dumps(status)


async def test_slow_client_is_dropped_others_keep_flowing() -> None:
    """A client that stops reading is closed as a slow consumer; the others don't stall."""
    products = ["BTC-USD", "ETH-USD"]
    async with running(
        products=products, rate=10_000, max_client_buffer_bytes=64 * 1024, close_timeout_s=0.5
    ) as sim:
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: tiny window
        raw.connect(("127.0.0.1", sim.port))
        raw.setblocking(False)
        # No deflate for the slow one: compressed, it would take ~5x longer to back up.
        async with (
            client(sim, sock=raw, max_queue=1, compression=None) as slow,
            # Unbounded queue: a paused reader couldn't see the close frame on exit.
            client(sim, max_queue=None) as fast,
        ):
            await subscribe(slow, products, ["ticker"])
            await subscribe(fast, ["BTC-USD"], ["ticker"])
            received = 0
            # The slow one is closed (1008 ErrSlowConsume, or aborted when it can't even
            # take the close frame) while the fast one keeps receiving.
            async with asyncio.timeout(10):
                while len(sim.hub.clients) > 1 or received < 2_000:
                    await fast.recv()
                    received += 1
            stats = sim.stats()
            assert stats["clients"]["slow_client_drops"] == 1
            assert stats["clients"]["connected"] == 1
            for _ in range(100):
                await fast.recv()
            slow.transport.abort()  # it never reads: its closing handshake can't complete
