"""REST on the feed port: Coinbase's product ticker, rate limit, stats, health, metrics."""

from __future__ import annotations

import socket
import time
from datetime import datetime
from decimal import Decimal

from .helpers import (
    REST_TICKER_FIELDS,
    REST_TIME,
    check_types,
    client,
    http_get,
    http_get_raw,
    recv_type,
    running,
    subscribe,
)


async def test_rest_ticker_matches_last_ticker() -> None:
    """GET /products/{id}/ticker mirrors the last trade the ws feed showed."""
    async with running(products=["BTC-USD"], rate=0) as sim, client(sim) as ws:
        await subscribe(ws, ["BTC-USD"], ["ticker"])
        ticker = await recv_type(ws, "ticker")
        status, body = await http_get(sim, "/products/BTC-USD/ticker")
    assert status == 200
    check_types(body, REST_TICKER_FIELDS)
    assert REST_TIME.match(body["time"])
    assert (body["price"], body["size"], body["trade_id"]) == (
        ticker["price"],
        ticker["last_size"],
        ticker["trade_id"],
    )
    assert (body["bid"], body["ask"], body["volume"]) == (
        ticker["best_bid"],
        ticker["best_ask"],
        ticker["volume_24h"],
    )
    # 9 fraction digits on REST, the same instant truncated to microseconds on ws.
    assert datetime.fromisoformat(body["time"]) == datetime.fromisoformat(ticker["time"])
    assert Decimal(body["rfq_volume"]) >= 0


async def test_rest_ticker_follows_the_market() -> None:
    """While ticking, the REST trade id is one the ws feed delivers with the same fields."""
    async with running(products=["ETH-USD"], rate=200) as sim, client(sim) as ws:
        await subscribe(ws, ["ETH-USD"], ["ticker"])
        status, body = await http_get(sim, "/products/ETH-USD/ticker")
        assert status == 200
        while (t := await recv_type(ws, "ticker"))["trade_id"] < body["trade_id"]:
            pass
        assert (t["trade_id"], t["price"], t["best_bid"]) == (
            body["trade_id"],
            body["price"],
            body["bid"],
        )


async def test_unknown_product_404() -> None:
    """Unknown products (and unknown paths) answer 404 {"message":"NotFound"}."""
    async with running(products=["BTC-USD"], rate=0) as sim:
        assert await http_get(sim, "/products/NOPE-USD/ticker") == (404, {"message": "NotFound"})
        assert (await http_get(sim, "/nothing/here"))[0] == 404


async def test_rate_limit_429_after_burst() -> None:
    """Like Coinbase public endpoints: a burst of 15, then 429 until tokens refill."""
    async with running(products=["BTC-USD"], rate=0) as sim:
        start = time.monotonic()
        replies = [await http_get(sim, "/products/BTC-USD/ticker") for _ in range(30)]
        elapsed = time.monotonic() - start
        statuses = [status for status, _ in replies]
        assert statuses[:15] == [200] * 15
        assert (429, {"message": "Public rate limit exceeded"}) in replies
        assert statuses.count(200) <= 15 + 10 * elapsed + 1  # burst + refill at 10/s
        assert (await http_get(sim, "/healthz"))[0] == 200  # sim endpoints aren't limited
        assert sim.stats()["rest"]["rate_limited"] >= 1


async def test_stats_healthz_and_metrics() -> None:
    """/sim/stats has per-product and fault figures; /metrics speaks Prometheus, also on
    --metrics-port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    async with (
        running(products=["BTC-USD", "ETH-USD"], rate=500, metrics_port=metrics_port) as sim,
        client(sim) as ws,
    ):
        await subscribe(ws, ["BTC-USD"], ["ticker"])
        await recv_type(ws, "ticker")
        await recv_type(ws, "ticker")
        assert await http_get(sim, "/healthz") == (200, {"status": "ok"})
        status, stats = await http_get(sim, "/sim/stats")
        assert status == 200
        assert stats["mode"] == "market"
        assert stats["clients"]["connected"] == 1
        btc = stats["products"]["BTC-USD"]
        assert btc["ticks"] > 0
        assert btc["last_ticker"]["trade_id"] == btc["trade_id"]
        assert set(stats["faults"]["by_kind"]) == {
            "gap",
            "dup",
            "malformed",
            "reorder",
            "disconnect",
            "stall",
        }
        status, text = await http_get_raw("127.0.0.1", sim.port, "/metrics")
        assert status == 200
        assert b'feedsim_ticks_total{product_id="BTC-USD"}' in text
        status, text = await http_get_raw("127.0.0.1", sim.metrics_port, "/metrics")
        assert status == 200
        assert b"feedsim_clients_connected 1.0" in text
