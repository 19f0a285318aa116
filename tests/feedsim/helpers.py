"""Shared helpers for the feedsim tests: a running simulator, a ws client, a raw HTTP GET,
and the Coinbase field tables the messages are checked against."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from services.feedsim import FeedSim, FeedSimSettings

# coinbase-protocol.md §1, `ticker` message: field -> JSON type.
TICKER_FIELDS: dict[str, type] = {
    "type": str,
    "sequence": int,
    "product_id": str,
    "price": str,
    "open_24h": str,
    "volume_24h": str,
    "low_24h": str,
    "high_24h": str,
    "volume_30d": str,
    "best_bid": str,
    "best_bid_size": str,
    "best_ask": str,
    "best_ask_size": str,
    "side": str,
    "time": str,
    "trade_id": int,
    "last_size": str,
}
TICKER_DECIMALS = [
    "price",
    "open_24h",
    "volume_24h",
    "low_24h",
    "high_24h",
    "volume_30d",
    "best_bid",
    "best_bid_size",
    "best_ask",
    "best_ask_size",
    "last_size",
]
# coinbase-protocol.md §1, `heartbeat` message.
HEARTBEAT_FIELDS: dict[str, type] = {
    "type": str,
    "last_trade_id": int,
    "product_id": str,
    "sequence": int,
    "time": str,
}
# coinbase-protocol.md §3, GET /products/{id}/ticker.
REST_TICKER_FIELDS: dict[str, type] = {
    "ask": str,
    "bid": str,
    "volume": str,
    "trade_id": int,
    "price": str,
    "size": str,
    "time": str,
    "rfq_volume": str,
}
WS_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
REST_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6,9}Z$")


def check_types(msg: dict[str, Any], table: dict[str, type]) -> None:
    """Exactly the documented keys, each with its JSON type (bool is not an int here)."""
    assert set(msg) == set(table), sorted(set(msg) ^ set(table))
    for key, typ in table.items():
        value = msg[key]
        assert type(value) is typ, (key, value)


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def check_ticker(msg: dict[str, Any]) -> None:
    check_types(msg, TICKER_FIELDS)
    assert msg["type"] == "ticker"
    assert WS_TIME.match(msg["time"]), msg["time"]
    assert parse_time(msg["time"]).utcoffset() is not None
    assert msg["side"] in ("buy", "sell")
    d = {k: Decimal(msg[k]) for k in TICKER_DECIMALS}
    assert all(v > 0 for v in d.values()), d
    assert d["best_bid"] <= d["price"] <= d["best_ask"], msg
    assert d["best_bid"] < d["best_ask"], msg
    assert d["low_24h"] <= d["price"] <= d["high_24h"], msg
    assert d["volume_30d"] >= d["volume_24h"] >= d["last_size"], msg


def check_heartbeat(msg: dict[str, Any]) -> None:
    check_types(msg, HEARTBEAT_FIELDS)
    assert msg["type"] == "heartbeat"
    assert WS_TIME.match(msg["time"]), msg["time"]


@contextlib.asynccontextmanager
async def running(**overrides: Any) -> AsyncIterator[FeedSim]:
    """A simulator on a free port, stopped (clients closed, tasks cancelled) on exit."""
    overrides.setdefault("port", 0)
    async with FeedSim(FeedSimSettings(**overrides)) as sim:
        yield sim


@contextlib.asynccontextmanager
async def client(sim: FeedSim, **kwargs: Any) -> AsyncIterator[ClientConnection]:
    async with connect(sim.ws_url, **kwargs) as ws:
        yield ws


async def send(ws: ClientConnection, msg: dict[str, Any]) -> None:
    await ws.send(json.dumps(msg))


async def recv(ws: ClientConnection, timeout: float = 2.0) -> Any:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def recv_type(ws: ClientConnection, kind: str, timeout: float = 2.0) -> dict[str, Any]:
    """The next message of type ``kind``, skipping others."""
    async with asyncio.timeout(timeout):
        while True:
            msg = json.loads(await ws.recv())
            if msg.get("type") == kind:
                return dict(msg)


async def subscribe(
    ws: ClientConnection, products: list[str], channels: list[Any]
) -> dict[str, Any]:
    """Subscribe and return the ``subscriptions`` reply (errors before it are skipped)."""
    await send(ws, {"type": "subscribe", "product_ids": products, "channels": channels})
    return await recv_type(ws, "subscriptions")


def channels_of(subscriptions: dict[str, Any]) -> dict[str, list[str]]:
    return {c["name"]: c["product_ids"] for c in subscriptions["channels"]}


async def wait_for(predicate: Any, timeout: float = 5.0, step: float = 0.01) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(step)


async def http_get(sim: FeedSim, path: str) -> tuple[int, Any]:
    """A bare HTTP/1.1 GET (the server answers and closes); returns status and JSON body."""
    status, body = await http_get_raw("127.0.0.1", sim.port, path)
    return status, json.loads(body)


async def http_get_raw(host: str, port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def drain_until_heartbeats(
    ws: ClientConnection, final_trade_ids: dict[str, int], timeout: float = 5.0
) -> list[Any]:
    """Read until every product's heartbeat reports its final trade id.

    Heartbeats go out after the ticks generated before them, on the same connection, so
    such a heartbeat is a barrier: every frame the feed sent before it has arrived.
    Returns all frames read (JSON-decoded where possible, else the raw text).
    """
    frames: list[Any] = []
    pending = dict(final_trade_ids)
    async with asyncio.timeout(timeout):
        while pending:
            raw = await ws.recv()
            try:
                msg = json.loads(raw)
            except ValueError:
                frames.append(raw)
                continue
            frames.append(msg)
            if (
                isinstance(msg, dict)
                and msg.get("type") == "heartbeat"
                and pending.get(msg["product_id"]) == msg["last_trade_id"]
            ):
                del pending[msg["product_id"]]
    return frames
