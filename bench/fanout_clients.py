"""Load-generating WebSocket clients for ``bench/fanout.py``, run as their own process.

    python -m bench.fanout_clients --url ws://127.0.0.1:8080/ws --connections 500 \\
        --products BTC-USD,ETH-USD --seconds 10

Opens ``--connections`` connections at a bounded concurrency (so the server's accept
backlog is never overrun), sends each the gateway's subscribe command (snapshot off), and
counts ticks per frame straight from the received bytes (inflated first with ``--deflate``,
permessage-deflate). It is a minimal RFC 6455 client
on asyncio protocols: running every frame through a full WebSocket library and a JSON
decoder would cost the load core more than the server under test spends sending it, and
the benchmark would then measure the clients. For latency it parses only ``recv_ns`` of
every ``--sample-every``-th tick of each connection, at most one per frame: now
(``time.time_ns()``, once per read) minus ``recv_ns``. Batch frames (JSON arrays) count
every tick they carry; their sample is one of their first ``--sample-every`` ticks, the
older end of the frame, so batch latency is if anything overstated.

Talking to the orchestrator: one JSON line ``{"event": "ready", ...}`` on stdout once every
connection is open (and, with ``--ack subscribed``, confirmed); then one JSON line
``{"event": "mark", ...}`` with the counters since the previous mark for every ``mark``
line on stdin; ``quit`` (or end of stdin) prints the totals as ``{"event": "summary"}`` and
exits. With ``--seconds`` it runs standalone and prints the summary after that long.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import resource
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import uvloop

TICK = b'{"type":"tick"'
RECV_NS = b'"recv_ns":'
SUBSCRIBED = b'"type":"subscribed"'
_OP_TEXT, _OP_CLOSE, _OP_PING, _OP_PONG = 0x1, 0x8, 0x9, 0xA
_RSV1_COMPRESSED = 0x40
_DEFLATE_TAIL = b"\x00\x00\xff\xff"  # RFC 7692: stripped by the sender, restored here
# latency histogram: bucket k holds latencies around exp(k / _BUCKETS_PER_E) µs (±0.5 %),
# so processes can merge theirs exactly and the orchestrator reads percentiles from the sum
_BUCKETS_PER_E = 100


def bucket_of(latency_us: float) -> int:
    return round(math.log(max(latency_us, 1.0)) * _BUCKETS_PER_E)


def value_of(bucket: int) -> float:
    return math.exp(bucket / _BUCKETS_PER_E)


def percentiles(hist: dict[int, int], max_us: float) -> dict[str, float | int | None]:
    """p50/p99/p99.9 (ms) of a latency histogram, its exact max and its sample count."""
    count = sum(hist.values())
    out: dict[str, float | int | None] = {"samples": count}
    for name, q in (("p50_ms", 0.50), ("p99_ms", 0.99), ("p999_ms", 0.999)):
        out[name] = None
        rank, seen = q * count, 0
        for bucket in sorted(hist):
            seen += hist[bucket]
            if seen >= rank and count:
                out[name] = round(value_of(bucket) / 1000, 3)
                break
    out["max_ms"] = round(max_us / 1000, 3) if count else None
    return out


@dataclass
class Stats:
    """Counters of all the connections of this process (since the last mark)."""

    ticks: int = 0
    frames: int = 0
    hist: Counter[int] = field(default_factory=Counter)
    max_us: float = 0.0
    closed: Counter[int] = field(default_factory=Counter)

    def record_latency(self, latency_ns: int) -> None:
        latency_us = latency_ns / 1000
        self.hist[bucket_of(latency_us)] += 1
        self.max_us = max(self.max_us, latency_us)

    def report(self, event: str, cpu_s: float) -> dict[str, Any]:
        return {
            "event": event,
            "ticks": self.ticks,
            "frames": self.frames,
            "closed": {str(code): n for code, n in self.closed.items()},
            "hist": {str(k): v for k, v in self.hist.items()},
            "max_us": self.max_us,
            "latency": percentiles(self.hist, self.max_us),
            "cpu_s": cpu_s,
        }

    @classmethod
    def from_report(cls, report: dict[str, Any]) -> Stats:
        return cls(
            ticks=report["ticks"],
            frames=report["frames"],
            hist=Counter({int(k): v for k, v in report["hist"].items()}),
            max_us=report["max_us"],
            closed=Counter({int(k): v for k, v in report["closed"].items()}),
        )

    def add(self, other: Stats) -> None:
        self.ticks += other.ticks
        self.frames += other.frames
        self.hist.update(other.hist)
        self.max_us = max(self.max_us, other.max_us)
        self.closed.update(other.closed)


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked frame (clients must mask); a zero key leaves the payload as it is."""
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, 0x80 | size))
    elif size < 65_536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2)
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8)
    return head + b"\0\0\0\0" + payload


class Connection(asyncio.Protocol):
    """One WebSocket connection: handshake, subscribe, then count what arrives."""

    def __init__(self, request: bytes, subscribe: bytes, stats: Stats, sample_every: int) -> None:
        self.request = request
        # set when the server accepts permessage-deflate (--deflate)
        self.inflate: Callable[[bytes], bytes] | None = None
        self.subscribe = subscribe
        self.stats = stats
        self.sample_every = sample_every
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.handshaken = False
        self.ticks = 0  # this connection's, for picking which ticks to sample
        self.due = 0  # the number of this connection's next tick to sample
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.subscribed: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not an asyncio.Transport subclass, but it is one
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        for future in (self.opened, self.subscribed):
            if not future.done():
                future.set_exception(ConnectionError("connection lost during setup"))
                future.exception()  # retrieved: with --ack none nobody awaits `subscribed`

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        if not self.handshaken and not self._handshake():
            return
        now = time.time_ns()  # everything in this read arrived together
        stats, pos, end_of_data = self.stats, 0, len(buf)
        while end_of_data - pos >= 2:
            length, head = buf[pos + 1] & 0x7F, 2
            if length == 126:
                if end_of_data - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4]), 4
            elif length == 127:
                if end_of_data - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10]), 10
            start = pos + head
            end = start + length
            if end > end_of_data:
                break
            first = buf[pos]
            opcode = first & 0x0F
            pos = end
            stats.frames += 1
            # the servers here never fragment a message: a text frame is a whole message
            if opcode == _OP_TEXT and first & _RSV1_COMPRESSED and self.inflate is not None:
                text = self.inflate(bytes(buf[start:end]) + _DEFLATE_TAIL)
                self._count(text, 0, len(text), now)
            elif opcode == _OP_TEXT:
                self._count(buf, start, end, now)
            elif opcode == _OP_PING:
                self._send(_client_frame(_OP_PONG, bytes(buf[start:end])))
            elif opcode == _OP_CLOSE:
                code = int.from_bytes(buf[start : start + 2]) if length >= 2 else 1005
                stats.closed[code] += 1
                self._send(_client_frame(_OP_CLOSE, bytes(buf[start : start + 2])))
                if self.transport is not None:
                    self.transport.close()
                break
        del buf[:pos]

    def _handshake(self) -> bool:
        buf = self.buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        if not buf.startswith(b"HTTP/1.1 101"):
            status = bytes(buf[: buf.find(b"\r\n")]).decode(errors="replace")
            self.opened.set_exception(ConnectionError(f"handshake refused: {status}"))
            if self.transport is not None:
                self.transport.close()
            return False
        if b"permessage-deflate" in buf[:end].lower():
            self.inflate = zlib.decompressobj(wbits=-15).decompress
        del buf[: end + 4]
        self.handshaken = True
        self._send(_client_frame(_OP_TEXT, self.subscribe))
        self.opened.set_result(None)
        return True

    def _count(self, buf: bytes | bytearray, start: int, end: int, now: int) -> None:
        if not self.subscribed.done() and buf.find(SUBSCRIBED, start, end) >= 0:
            self.subscribed.set_result(None)
        if buf[start] == 0x5B:  # "[": a batch frame
            n = buf.count(TICK, start, end)
        elif buf.startswith(TICK, start):
            n = 1
        else:
            return
        before = self.ticks
        self.ticks = before + n
        self.stats.ticks += n
        index = self.due - before  # where in this frame the next sampled tick is
        if index >= n:
            return
        pos = start
        for _ in range(index + 1):
            pos = buf.find(RECV_NS, pos, end) + len(RECV_NS)
        self.stats.record_latency(now - int(buf[pos : buf.find(b",", pos, end)]))
        # one sample per frame at most (walking a batch frame to each costs the load core
        # more than the count): the ticks due later in this frame are skipped
        every = self.sample_every
        self.due += every * ((n - index - 1) // every + 1)

    def _send(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _request(url: str, deflate: bool) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        + ("Sec-WebSocket-Extensions: permessage-deflate\r\n" if deflate else "")
        + "\r\n"
    )
    return host, port, request.encode()


def _subscriptions(products: list[str], connections: int, one_each: bool) -> Iterable[bytes]:
    for i in range(connections):
        chosen = [products[i % len(products)]] if one_each else products
        yield json.dumps({"op": "subscribe", "products": chosen, "snapshot": False}).encode()


async def open_all(args: argparse.Namespace, stats: Stats) -> tuple[list[Connection], int]:
    """Every connection opened (and acknowledged), ``args.concurrency`` at a time."""
    loop = asyncio.get_running_loop()
    host, port, request = _request(args.url, args.deflate)
    gate = asyncio.Semaphore(args.concurrency)
    opened: list[Connection] = []
    failed = 0

    async def one(subscribe: bytes) -> None:
        nonlocal failed
        async with gate:
            conn = Connection(request, subscribe, stats, args.sample_every)
            try:
                async with asyncio.timeout(args.open_timeout):
                    await loop.create_connection(lambda: conn, host, port)
                    await conn.opened
                    if args.ack == "subscribed":
                        await conn.subscribed
            except (OSError, TimeoutError) as exc:
                failed += 1
                if failed <= 3:
                    print(f"connection failed: {exc!r}", file=sys.stderr, flush=True)
                conn.close()
                return
            opened.append(conn)

    subscriptions = _subscriptions(args.products.split(","), args.connections, args.one_product)
    async with asyncio.TaskGroup() as tg:
        for subscribe in subscriptions:
            tg.create_task(one(subscribe))
    return opened, failed


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def run(args: argparse.Namespace) -> None:
    total, window = Stats(), Stats()
    started = time.monotonic()
    connections, failed = await open_all(args, window)
    _emit(
        {
            "event": "ready",
            "connected": len(connections),
            "failed": failed,
            "open_s": round(time.monotonic() - started, 3),
        }
    )
    cpu_mark = time.process_time()
    try:
        if args.seconds is not None:
            await asyncio.sleep(args.seconds)
            return
        while (line := (await asyncio.to_thread(sys.stdin.readline)).strip()) != "quit":
            if not line:
                return  # stdin closed: the orchestrator is gone
            if line == "mark":
                # the connections keep counting into the same object: swap in a fresh one
                fresh = Stats()
                for conn in connections:
                    conn.stats = fresh
                now = time.process_time()
                _emit(window.report("mark", now - cpu_mark))
                total.add(window)
                window, cpu_mark = fresh, now
    finally:
        total.add(window)
        for conn in connections:
            conn.close()
        _emit(total.report("summary", time.process_time()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--url", required=True, help="ws://host:port/path[?batch=true]")
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--products", required=True, help="comma separated")
    parser.add_argument(
        "--one-product",
        action="store_true",
        help="each connection subscribes to one product (round robin) instead of all",
    )
    parser.add_argument(
        "--ack",
        choices=["subscribed", "none"],
        default="subscribed",
        help="wait for the gateway's subscribed reply (none: the server sends no reply)",
    )
    parser.add_argument("--sample-every", type=int, default=10, help="latency of every Nth tick")
    parser.add_argument("--concurrency", type=int, default=32, help="connections opening at once")
    parser.add_argument("--open-timeout", type=float, default=30.0)
    parser.add_argument("--deflate", action="store_true", help="offer permessage-deflate")
    parser.add_argument("--seconds", type=float, help="run standalone this long, then summarize")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
