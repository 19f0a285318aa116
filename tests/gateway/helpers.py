"""Helpers for the gateway tests: the gateway as a real process, ticks published straight to
MD_TICKS (as the normalizer would), and a small WebSocket client that records everything."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import nats
import websockets
from nats.aio.client import Client as NATS
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from services.common import broker
from services.common.models import Tick, encode_tick
from services.common.settings import CommonSettings
from services.common.subjects import TICKS_STREAM, tick_subject
from services.devstack.ports import free_port
from services.devstack.servers import NatsServer
from tests.support.procs import ServiceProcess

Message = dict[str, Any]

_seqs = itertools.count(1_000)


def fresh_seqs(n: int) -> list[int]:
    """Increasing seqs never used before in this session (gateways shared by tests keep
    their per-product state, so every test must publish newer ticks)."""
    return [next(_seqs) for _ in range(n)]


class Gateway:
    """``python -m services.gateway`` on a free loopback port."""

    def __init__(self, log_dir: Path, nats_url: str, **env: str) -> None:
        self.port = free_port()
        self.env = {
            "NATS_URLS": nats_url,
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(self.port),
            "METRICS_PORT": "0",
            "COINBASE_PRODUCTS": "BTC-USD,ETH-USD",
            "DRAIN_TIMEOUT_S": "5",
            **env,
        }
        self.proc = ServiceProcess("gateway", self.env, log_dir)

    async def start(self) -> Self:
        self.proc.start()
        await self.proc.wait_for_event("gateway_started", timeout=60)
        # gateway_started comes once uvicorn listens; /healthz answering is the proof
        deadline = time.monotonic() + 10
        while True:
            try:
                await asyncio.to_thread(self.get, "/healthz")
            except OSError:
                assert time.monotonic() < deadline, self.proc.tail()
                await asyncio.sleep(0.02)
            else:
                return self

    async def wait_latest(self, product: str, seq: int, timeout: float = 10.0) -> None:
        """Until the gateway's latest tick of ``product`` is ``seq`` (it has seen the feed)."""
        deadline = time.monotonic() + timeout
        while True:
            status, body = await asyncio.to_thread(self.get, f"/v1/ticks/{product}/latest")
            if status == 200 and json.loads(body)["seq"] >= seq:
                return
            assert time.monotonic() < deadline, f"{product} never reached seq {seq}"
            await asyncio.sleep(0.02)

    def get(self, path: str) -> tuple[int, bytes]:
        """Status and body of a GET (error statuses included)."""
        try:
            with urllib.request.urlopen(self.http + path, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _samples(self) -> list[Sample]:
        with urllib.request.urlopen(f"{self.http}/metrics", timeout=5) as response:
            text = response.read().decode()
        return [s for family in text_string_to_metric_families(text) for s in family.samples]

    def metric(self, name: str, **labels: str) -> float:
        """A sample of ``/metrics`` (0 when absent)."""
        for sample in self._samples():
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
        return 0.0

    def histogram(self, name: str) -> dict[float, float]:
        """A histogram of ``/metrics`` as cumulative counts by upper bound (``le``)."""
        return {
            float(sample.labels["le"]): float(sample.value)
            for sample in self._samples()
            if sample.name == f"{name}_bucket"
        }

    async def wait_metric(
        self, name: str, at_least: float, timeout: float = 10.0, **labels: str
    ) -> float:
        deadline = time.monotonic() + timeout
        while (value := await asyncio.to_thread(self.metric, name, **labels)) < at_least:
            assert time.monotonic() < deadline, f"{name}{labels} stuck at {value} < {at_least}"
            await asyncio.sleep(0.05)
        return value


def make_tick(
    product: str,
    seq: int,
    *,
    price: str | None = None,
    recv_ns: int | None = None,
    volume_24h: str = "12345.6789",
) -> Tick:
    return Tick(
        product=product,
        seq=seq,
        trade_id=seq // 10,
        time="2026-11-28T15:00:00.123456Z",
        recv_ns=recv_ns if recv_ns is not None else time.time_ns(),
        price=price or f"{90000 + seq % 1000}.{seq % 100:02d}",
        size="0.00120000",
        side="buy",
        bid="89999.99",
        bid_size="0.5",
        ask="90000.01",
        ask_size="0.3",
        open_24h="90000.00",
        high_24h="92000.00",
        low_24h="89000.00",
        volume_24h=volume_24h,
    )


class Feed:
    """Publishes canonical ticks to MD_TICKS, pipelined, with the normalizer's message ids."""

    def __init__(self, nc: NATS, settings: CommonSettings) -> None:
        self.nc = nc
        self.settings = settings
        self.publisher = broker.Publisher(nc, settings)
        self.js = self.publisher.js
        self.published: dict[str, list[int]] = defaultdict(list)
        self.stored: dict[tuple[str, int], bytes] = {}

    @classmethod
    async def connect(cls, nats_url: str) -> Feed:
        settings = CommonSettings(nats_urls=[nats_url])
        nc = await nats.connect(nats_url)
        feed = cls(nc, settings)
        await broker.ensure_streams(feed.js, settings)
        return feed

    async def publish(
        self, ticks: Iterable[tuple[str, int]], *, window: int = 1000, **kwargs: Any
    ) -> None:
        """Publish ``(product, seq)`` ticks and wait for every ack; remembers what it sent.

        ``window`` publishes are in flight at once (a small one spreads ticks out in time).
        """
        pending = []
        for product, seq in ticks:
            data = encode_tick(make_tick(product, seq, **kwargs))
            pending.append(
                await self.publisher.publish(
                    TICKS_STREAM,
                    tick_subject(product, self.settings.num_shards),
                    data,
                    msg_id=f"tick:coinbase:{product}:{seq}",
                )
            )
            self.published[product].append(seq)
            self.stored[product, seq] = data
            if len(pending) >= window:
                await self.publisher.wait(pending)
                pending = []
        await self.publisher.wait(pending)

    def json(self, product: str, seq: int) -> Any:
        """The tick as published, parsed."""
        return json.loads(self.stored[product, seq])

    async def close(self) -> None:
        await self.nc.close()


@dataclass
class Client:
    """A WebSocket client that flattens batch frames and keeps every message it read."""

    ws: ClientConnection
    messages: list[Message] = field(default_factory=list)
    frames: int = 0
    array_frames: int = 0
    _cursor: int = 0

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> Client:
        ws = await websockets.connect(url, max_size=2**24, **kwargs)
        return cls(ws)

    async def send(self, message: Message) -> None:
        await self.ws.send(json.dumps(message))

    async def _read_frame(self, timeout: float) -> list[Message]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(raw, str), "every frame must be a text frame"
        decoded = json.loads(raw)
        self.frames += 1
        if isinstance(decoded, list):
            self.array_frames += 1
            items = decoded
        else:
            items = [decoded]
        self.messages.extend(items)
        return items

    async def recv(self, timeout: float = 5.0) -> Message:
        """The next message (reads a frame when none is pending)."""
        while self._cursor >= len(self.messages):
            await self._read_frame(timeout)
        message = self.messages[self._cursor]
        self._cursor += 1
        return message

    async def expect(self, kind: str, timeout: float = 5.0, **fields: Any) -> Message:
        """Skip to the next message of ``type`` ``kind`` (ticks are skipped too)."""
        deadline = time.monotonic() + timeout
        while True:
            message = await self.recv(max(0.01, deadline - time.monotonic()))
            if message.get("type") == kind and all(message.get(k) == v for k, v in fields.items()):
                return message

    async def until(self, done: Callable[[Client], bool], timeout: float = 10.0) -> None:
        """Read frames until ``done(self)``."""
        deadline = time.monotonic() + timeout
        while not done(self):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"condition not met in {timeout}s; last: {self.messages[-3:]}"
            try:
                await self._read_frame(remaining)
            except TimeoutError:
                continue

    async def drain(self, quiet_s: float = 0.3, timeout: float = 10.0) -> None:
        """Read until nothing arrives for ``quiet_s``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                await self._read_frame(quiet_s)
            except TimeoutError:
                return

    async def close_code(self, timeout: float = 10.0) -> int | None:
        """Read (and keep) messages until the server closes; its close code."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                await self._read_frame(deadline - time.monotonic())
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None
        raise AssertionError(f"not closed within {timeout}s")

    def of_type(self, kind: str) -> list[Message]:
        return [m for m in self.messages if m.get("type") == kind]

    def ticks(self, product: str) -> list[Message]:
        return [m for m in self.messages if m.get("type") == "tick" and m["product"] == product]

    def backfilled(self, product: str) -> list[Message]:
        return [t for m in self.of_type("backfill") if m["product"] == product for t in m["ticks"]]

    async def close(self) -> None:
        await self.ws.close()


@dataclass
class Stack:
    nats: NatsServer
    gateway: Gateway
    feed: Feed


@contextlib.asynccontextmanager
async def stack(root: Path, **env: str) -> AsyncIterator[Stack]:
    """A nats-server, a gateway on it and a feed, for a module of tests that share them."""
    server = NatsServer.on_free_ports(root / "nats")
    server.start()
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    gateway = Gateway(logs, server.url, **env)
    feed: Feed | None = None
    try:
        feed = await Feed.connect(server.url)
        await gateway.start()
        yield Stack(server, gateway, feed)
    finally:
        if feed is not None:
            await feed.close()
        gateway.proc.kill()
        server.stop()


def assert_backfill_then_live(
    client: Client, products: list[str], published: dict[str, list[int]], since: int | None
) -> None:
    """What a client subscribed with a backfill got per product, backfill then live: every
    tick from ``since`` on (or the last 300+ when ``since`` is None), no gap, no repeat."""
    for product in products:
        sent = published[product]
        got = [t["seq"] for t in client.backfilled(product)]
        got += [t["seq"] for t in client.ticks(product)]
        assert all(not t.get("skipped") for t in client.ticks(product))
        if since is not None:
            assert got == [s for s in sent if s >= since], (product, since)
        else:
            assert len(got) >= 300
            assert got == sent[-len(got) :], product


async def produce_twice_the_limit(feed: Feed, products: list[str]) -> None:
    """~600 ticks/s over three products for ~1.5 s: twice a 100/s + burst 40 limit."""
    seq = 1
    while seq < 300:
        seq += 1
        await feed.publish((p, seq) for p in products)
        await asyncio.sleep(1 / 200)
