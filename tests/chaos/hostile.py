"""Hostile and well-behaved WebSocket clients of the gateway (issue #10, scenario 5).

``tests/chaos/test_hostile_clients.py`` runs each side as an OS process of its own, so the
attackers' CPU is scheduled apart from the clients whose latency is measured:

    python -m tests.chaos.hostile good   --url WS --key KEY --clients 100 --products A,B --out F
    python -m tests.chaos.hostile attack --plan '{"url": WS, "keys": {...}, ...}'

Both print one JSON object per line on stdout (``{"event": "ready" | ... | "result"}``).
``good`` keeps its clients subscribed until a line ``{"stop": {product: last_seq}}`` arrives on
stdin, reads until each client has that seq, then writes every tick's ``recv_ns`` and latency
(ns, int64, native order: all ``recv_ns`` then all latencies) to ``--out``.

``attack`` connects its long-lived attackers, reports ``ready`` with every attacker paused,
then obeys stdin lines: ``resume`` (an attack window begins), ``pause`` (answered with
``paused`` once every attacker has finished its cycle and waits: the gateway then holds no
attack traffic) and ``stop``. Its ``result`` is, per attacker, a counter of outcomes
(``close:1008``, ``error:rate_limited``, ``welcome``, ...) and the first observations that
differ from DESIGN §8 (``unexpected``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import struct
import sys
import time
import urllib.request
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvloop
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

# Failures an attacker cycle may meet that are recorded as outcomes, never raised.
_CYCLE_ERRORS = (OSError, TimeoutError, WebSocketException, ValueError)


def emit(event: str, **data: Any) -> None:
    """One JSON line on stdout for the test that runs this process."""
    sys.stdout.write(json.dumps({"event": event, **data}) + "\n")
    sys.stdout.flush()


# -- the record of one attacker ------------------------------------------------------------


@dataclass
class Tally:
    """What one kind of attacker did and saw."""

    cycles: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    unexpected_total: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def seen(self, outcome: str, n: int = 1) -> None:
        self.counts[outcome] += n

    def wrong(self, what: str) -> None:
        """An observation that DESIGN §8 does not allow (the first 20 are kept verbatim)."""
        self.unexpected_total += 1
        if len(self.unexpected) < 20:
            self.unexpected.append(what[:300])

    def as_json(self) -> dict[str, Any]:
        return {
            "cycles": self.cycles,
            "counts": dict(self.counts),
            "unexpected": self.unexpected,
            "unexpected_total": self.unexpected_total,
            **self.extra,
        }


# -- WebSocket helpers ---------------------------------------------------------------------


async def connect(url: str, key: str, **kwargs: Any) -> ClientConnection:
    return await websockets.connect(
        f"{url}?token={key}", max_size=2**25, open_timeout=20, close_timeout=2, **kwargs
    )


async def expect_welcome(ws: ClientConnection, timeout: float = 20.0) -> None:
    message = orjson.loads(await asyncio.wait_for(ws.recv(), timeout))
    if message.get("type") != "welcome":
        raise ValueError(f"first message is not a welcome: {message}")


async def read_to_close(ws: ClientConnection, timeout: float) -> tuple[str, list[Any]]:
    """Read until the server closes: (``close:<code>`` | ``close:none`` when the socket ended
    without a close frame | ``open`` when still open after ``timeout``, messages read)."""
    messages: list[Any] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                raw = await ws.recv()
                messages.append(orjson.loads(raw))
    except ConnectionClosed as exc:
        return (f"close:{exc.rcvd.code}" if exc.rcvd else "close:none"), messages
    except TimeoutError:
        return "open", messages


def abort(transport: asyncio.WriteTransport, *, reset: bool) -> None:
    """Drop a connection without a close frame: TCP RST (``reset``) or a bare FIN."""
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()


async def read_server_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One unmasked server frame: (opcode, payload)."""
    head = await reader.readexactly(2)
    length = head[1] & 0x7F
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2))
    elif length == 127:
        length = int.from_bytes(await reader.readexactly(8))
    return head[0] & 0x0F, await reader.readexactly(length)


async def raw_open(url: str, key: str) -> tuple[str, asyncio.StreamWriter | None]:
    """A WebSocket opened by hand (a fraction of a client library's CPU, so one attacker
    process can open hundreds per second): (``welcome`` and the open stream, or the outcome
    ``close:<code>`` / ``http:<status>`` / ``frame:<opcode>`` and None)."""
    reader, writer = await asyncio.open_connection(*host_port(url))
    try:
        writer.write(upgrade_request(url, key))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        status = head.split(b" ", 2)[1].decode()
        if status != "101":
            return f"http:{status}", None
        opcode, payload = await asyncio.wait_for(read_server_frame(reader), 20)
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        writer.transport.abort()
        return f"error:{type(exc).__name__}", None
    if opcode == 0x1 and b'"welcome"' in payload:
        return "welcome", writer
    writer.transport.abort()
    if opcode == 0x8:
        return f"close:{int.from_bytes(payload[:2]) if len(payload) >= 2 else 'none'}", None
    return f"frame:{opcode}", None


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("ws://").split("/")[0].rsplit(":", 1)
    return host, int(port)


def upgrade_request(url: str, key: str) -> bytes:
    host, port = host_port(url)
    return (
        f"GET /ws?token={key} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


class Pacer:
    """At most ``rate`` events per second, without catching up after a stall (a nice'd
    process that wakes late must not burst past the gateway's command bucket)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.next = time.monotonic()

    async def wait(self) -> None:
        now = time.monotonic()
        if self.next > now:
            await asyncio.sleep(self.next - now)
            now = self.next
        self.next = now + self.interval


# -- the attack plan -----------------------------------------------------------------------


@dataclass
class AttackPlan:
    """Who attacks how hard; every attacker kind connects with an API key of its own."""

    url: str
    keys: dict[str, str]
    valid_key: str  # a real key the bad-key attacker mangles
    hot_products: list[str]  # what the well-behaved clients watch
    big_products: list[str]  # products with a large backfill, for the slow readers
    nice: int = 10
    max_s: float = 900.0  # stops by itself after this long, whatever it is told
    flooders: int = 2
    flood_commands: int = 200
    flood_strikes: int = 50  # WS_FLOOD_STRIKES of the gateway
    oversized: int = 1
    max_frame_bytes: int = 64 * 1024  # WS_MAX_FRAME_BYTES of the gateway
    bad_utf8: int = 1
    bad_input: int = 2
    bad_input_rate: float = 8.0
    churners: int = 10
    churn_rate: float = 15.0  # commands/s per churner, under WS_CMDS_PER_SEC (20)
    churn_target: int = 2_000  # subscribe + unsubscribe commands in all
    # per batch: readers of one batch are read together once all are flagged, and the first
    # one's close frame is only written for a few seconds; 1 is robust on a loaded machine
    slow_readers: int = 1
    slow_backfill: int = 1_000
    slow_wait_max_s: float = 20.0
    storm_rate: float = 100.0  # new connections/s
    storm_hold_s: float = 2.5  # each is held this long, then dropped: ~250 at once
    storm_concurrency: int = 64  # handshakes in flight
    storm_pileup_every: int = 3  # attack windows 1, 4, 7... open with a pile-up
    key_limit: int = 150  # WS_MAX_CONNECTIONS_PER_KEY of the gateway
    bad_keys: int = 1
    pause_s: float = 0.05  # between cycles of the closing attackers


class Control:
    """Attack windows: attackers pass ``checkpoint`` between units of work and wait there
    while paused; ``pause`` returns once every one of them waits (their current cycle done),
    so a quiet window holds no attack traffic."""

    def __init__(self) -> None:
        self.running = asyncio.Event()  # starts paused
        self.windows = 0  # attack windows begun (resumes)
        self.attackers = 0
        self.waiting = 0
        self.stopped = False
        self._changed = asyncio.Event()

    async def checkpoint(self) -> bool:
        """Wait while paused; ``False`` once stopped (the attacker then returns)."""
        while not self.running.is_set() and not self.stopped:
            self.waiting += 1
            self._changed.set()
            try:
                await self.running.wait()
            finally:
                self.waiting -= 1
        return not self.stopped

    async def all_waiting(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.waiting < self.attackers:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                return self.waiting >= self.attackers
        return True

    def stop(self) -> None:
        self.stopped = True
        self.running.set()


AttackFn = Callable[[AttackPlan, Control, Tally], Awaitable[None]]


async def flood(plan: AttackPlan, control: Control, tally: Tally) -> None:
    """Commands as fast as the socket takes them: ``rate_limited`` errors (with the refused
    command's id), then the WS_FLOOD_STRIKES-th rate-limited command closes with 1008."""
    key = plan.keys["flood"]
    while await control.checkpoint():
        tally.cycles += 1
        ws = await connect(plan.url, key)
        await expect_welcome(ws)
        with contextlib.suppress(ConnectionClosed):
            for i in range(plan.flood_commands):
                if i % 2:
                    await ws.send(json.dumps({"op": "ping", "id": i}))
                else:
                    command = {"op": "subscribe", "products": plan.hot_products, "id": i}
                    await ws.send(json.dumps(command))
        outcome, messages = await read_to_close(ws, 20)
        tally.seen(outcome)
        limited = [m for m in messages if m.get("type") == "error"]
        tally.seen("error:rate_limited", sum(m.get("code") == "rate_limited" for m in limited))
        if outcome != "close:1008":
            tally.wrong(f"flood ended with {outcome}")
        if any(
            m.get("code") != "rate_limited" or not isinstance(m.get("id"), int) for m in limited
        ):  # each refusal names the refused command (ids are the command numbers)
            tally.wrong(f"flood got other errors: {limited[:3]}")
        if len(limited) != plan.flood_strikes - 1:
            tally.wrong(f"{len(limited)} rate_limited errors, not {plan.flood_strikes - 1}")
        await asyncio.sleep(plan.pause_s)


async def oversized(plan: AttackPlan, control: Control, tally: Tally) -> None:
    """A frame over WS_MAX_FRAME_BYTES (a valid ping, padded), or a message fragmented into
    frames under the limit that add up to more: close 1009."""
    key = plan.keys["oversized"]
    limit = plan.max_frame_bytes
    fragmented = True
    while await control.checkpoint():
        tally.cycles += 1
        fragmented = not fragmented
        ws = await connect(plan.url, key)
        await expect_welcome(ws)
        with contextlib.suppress(ConnectionClosed):
            if fragmented:
                await ws.send(iter(["y" * (limit // 2)] * 3))
            else:
                await ws.send(json.dumps({"op": "ping", "id": "z" * (limit + 1024)}))
        outcome, messages = await read_to_close(ws, 20)
        tally.seen(f"{'fragmented' if fragmented else 'single'}:{outcome}")
        if outcome != "close:1009" or messages:
            tally.wrong(f"oversized (fragmented={fragmented}): {outcome}, read {messages[:2]}")
        await asyncio.sleep(plan.pause_s)


async def bad_utf8(plan: AttackPlan, control: Control, tally: Tally) -> None:
    """A text frame that is not UTF-8: the WebSocket layer closes with 1007 (RFC 6455 §8.1)."""
    key = plan.keys["bad_utf8"]
    while await control.checkpoint():
        tally.cycles += 1
        ws = await connect(plan.url, key)
        await expect_welcome(ws)
        with contextlib.suppress(ConnectionClosed):
            await ws.send(b'{"op": "ping", "id": "\xff\xfe\xc3\x28"}', text=True)
        outcome, messages = await read_to_close(ws, 20)
        tally.seen(outcome)
        if outcome != "close:1007" or messages:
            tally.wrong(f"invalid UTF-8 text frame: {outcome}, read {messages[:2]}")
        await asyncio.sleep(plan.pause_s)


def bad_inputs() -> list[tuple[str, str, str | None]]:
    """(frame, expected reply type or error code, expected id): bad input gets an error
    reply naming the request id where one can be read, and the connection stays usable."""
    too_many = [f"X{i}-USD" for i in range(101)]
    return [
        ('{"op": "ping"', "bad_request", None),  # truncated
        ("not json at all", "bad_request", None),
        ("[1, 2, 3]", "bad_request", None),
        ('"ping"', "bad_request", None),
        ("[" * 20_000, "bad_request", None),  # deep nesting, under the frame limit
        # deep nesting msgspec must skip while looking for "op": a RecursionError that
        # ended the session before it was caught
        ('{"x": ' + "[" * 20_000 + ', "op": "ping"}', "bad_request", None),
        ('{"op": "ping", "id": {"nested": true}}', "bad_request", None),
        ('{"op": "ping", "id": 1e999}', "bad_request", None),
        ('{"op": "launch", "id": "b1"}', "bad_request", "b1"),
        ('{"op": "ping", "id": "b2", "extra": 1}', "bad_request", "b2"),
        ('{"op": "subscribe", "products": "HOT1-USD", "id": "b3"}', "bad_request", "b3"),
        ('{"op": "subscribe", "products": [], "id": "b4"}', "bad_request", "b4"),
        ('{"op": "unsubscribe", "products": [1], "id": "b5"}', "bad_request", "b5"),
        (
            '{"op": "subscribe", "products": ["HOT1-USD"], '
            '"backfill": {"last": 1, "since_seq": 2}, "id": "b6"}',
            "bad_request",
            "b6",
        ),
        (
            '{"op": "subscribe", "products": ["HOT1-USD"], '
            '"backfill": {"since_time": "yesterday"}, "id": 7}',
            "bad_request",
            "7",
        ),
        ('{"op": "subscribe", "products": ["NOPE-USD"], "id": "b8"}', "unknown_product", "b8"),
        ('{"op": "subscribe", "products": ["a.*>"], "id": "b9"}', "unknown_product", "b9"),
        (
            json.dumps({"op": "subscribe", "products": too_many, "id": "b10"}),
            "too_many_subscriptions",
            "b10",
        ),
        ('{"op": "ping", "id": "alive"}', "pong", "alive"),
    ]


async def bad_input(plan: AttackPlan, control: Control, tally: Tally) -> None:
    """One long-lived connection sending malformed and invalid commands under the command
    rate limit: each gets its documented reply, in order, and the socket is never closed."""
    key = plan.keys["bad_input"]
    cases = bad_inputs()
    pacer = Pacer(plan.bad_input_rate)
    ws = await connect(plan.url, key)
    await expect_welcome(ws)
    try:
        while await control.checkpoint():
            tally.cycles += 1
            for frame, expected, request_id in cases:
                if not await control.checkpoint():
                    break
                await pacer.wait()
                await ws.send(frame)
                reply = orjson.loads(await asyncio.wait_for(ws.recv(), 20))
                kind = reply.get("code") if reply.get("type") == "error" else reply.get("type")
                tally.seen(f"{reply.get('type')}:{kind}")
                got_id = None if reply.get("id") is None else str(reply.get("id"))
                if (
                    kind != expected
                    or got_id != request_id
                    or (reply.get("type") == "error" and not reply.get("message"))
                ):
                    tally.wrong(f"{frame[:60]!r} → {reply} (expected {expected}, {request_id})")
    except ConnectionClosed as exc:
        tally.wrong(f"bad input closed the connection: {exc.rcvd}")
        return
    await ws.close()


async def churn(plan: AttackPlan, control: Control, tally: Tally) -> None:
    """Subscribe / unsubscribe the hot products over and over (the hub's subscriber sets of
    the products the good clients watch change under them): every command answered once,
    with its id and the right type, no error, the connection never closed by the gateway."""
    key = plan.keys["churn"]
    ws = await connect(plan.url, key)
    await expect_welcome(ws)
    answers: Counter[str] = Counter()
    errors: list[Any] = []
    closed: list[str] = []

    async def reader() -> None:
        try:
            while True:
                message = orjson.loads(await ws.recv())
                kind = message.get("type")
                if kind in ("subscribed", "unsubscribed"):
                    answers[f"{kind}:{message.get('id')}"] += 1
                elif kind == "error":
                    errors.append(message)
                elif kind in ("tick", "snapshot"):
                    tally.seen(kind)
        except ConnectionClosed as exc:
            closed.append(f"close:{exc.rcvd.code}" if exc.rcvd else "close:none")

    read_task = asyncio.create_task(reader())
    pacer = Pacer(plan.churn_rate)
    sent: list[str] = []
    i = 0
    try:
        while tally.extra.setdefault("commands", 0) < plan.churn_target:
            if not await control.checkpoint():
                break
            i += 1
            products = [plan.hot_products[i % len(plan.hot_products)]]
            # the pair goes out together: a pause never leaves this client subscribed
            for op in ("subscribe", "unsubscribe"):
                await pacer.wait()
                request_id = f"{os.getpid()}-{id(ws)}-{op}-{i}"
                await ws.send(json.dumps({"op": op, "products": products, "id": request_id}))
                sent.append(f"{op}d:{request_id}")
                tally.extra["commands"] += 1
            tally.cycles += 1
        deadline = time.monotonic() + 20
        while any(answers[s] == 0 for s in sent[-5:]) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    except ConnectionClosed:
        pass
    read_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await read_task
    missing = [s for s in sent if answers[s] != 1]
    tally.seen("answered", len(sent) - len(missing))
    for s in missing[:5]:
        tally.wrong(f"churn command answered {answers[s]} times: {s}")
    for message in errors[:5]:
        tally.wrong(f"churn got an error: {message}")
    for outcome in closed:
        tally.wrong(f"churn connection closed by the gateway: {outcome}")
    await ws.close()
    while await control.checkpoint():  # target reached: idle (and pausable) until stopped
        await asyncio.sleep(0.1)


class _UnreadClient:
    """A WebSocket opened by hand on a socket with a tiny receive buffer, which then reads
    nothing until told to: the gateway's send buffer fills behind it."""

    def __init__(self, sock: socket.socket, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:  # fmt: skip
        self.sock, self.reader, self.writer = sock, reader, writer

    @classmethod
    async def open(cls, plan: AttackPlan) -> _UnreadClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: no autotune
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, host_port(plan.url))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(upgrade_request(plan.url, plan.keys["slow"]))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise AssertionError(f"slow reader refused: {head[:60]!r}")
        _, payload = await asyncio.wait_for(read_server_frame(reader), 20)
        if b'"welcome"' not in payload:
            raise AssertionError(f"slow reader not welcomed: {payload[:80]!r}")
        return cls(sock, reader, writer)

    def send(self, command: dict[str, Any]) -> None:
        self.writer.write(client_text_frame(orjson.dumps(command)))

    async def drain_to_close(self, timeout: float) -> str:
        """Read everything, parsing frame headers only, until the server's close frame
        (``close:<code>``), the end of the stream without one (``close:none``) or
        ``timeout`` (``open``). A client library's per-message parse made this take
        seconds for megabytes of ticks, longer under load than the gateway lets a closed
        slow consumer drain."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        buffer, reader = bytearray(), self.reader
        try:
            async with asyncio.timeout(timeout):
                while True:
                    chunk = await reader.read(1 << 20)
                    if not chunk:
                        return "close:none"
                    buffer += chunk
                    pos, end = 0, len(buffer)
                    while end - pos >= 2:
                        length, start = buffer[pos + 1] & 0x7F, pos + 2
                        if length >= 126:
                            size = 2 if length == 126 else 8
                            if end - start < size:
                                break
                            length = int.from_bytes(buffer[start : start + size])
                            start += size
                        if end - start < length:
                            break
                        if buffer[pos] & 0x0F == 0x8:  # close
                            code = buffer[start : start + 2]
                            return f"close:{int.from_bytes(code) if len(code) == 2 else 'none'}"
                        pos = start + length
                    del buffer[:pos]
        except TimeoutError:
            return "open"
        except ConnectionError:
            return "close:none"
        finally:
            self.writer.transport.abort()


def client_text_frame(payload: bytes) -> bytes:
    """A client's text frame, masked as clients must (an all-zero mask: payload as is)."""
    size = len(payload)
    if size < 126:
        head = bytes((0x81, 0x80 | size))
    elif size < 1 << 16:
        head = bytes((0x81, 0x80 | 126)) + size.to_bytes(2)
    else:
        head = bytes((0x81, 0x80 | 127)) + size.to_bytes(8)
    return head + b"\0\0\0\0" + payload


def slow_consumers(plan: AttackPlan) -> float:
    """The gateway's ``ledgerflux_gateway_slow_consumers_total`` (read from /metrics)."""
    host, port = host_port(plan.url)
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("ledgerflux_gateway_slow_consumers_total "):
                return float(line.split()[1])
    return 0.0


async def slow_readers(plan: AttackPlan, control: Control, tally: Tally) -> None:
    """Batches of clients that ask for megabytes of backfill and do not read. Once the
    kernel buffers and the bounded send buffer of each are full for WS_SLOW_CONSUMER_S, the
    gateway closes it with 4008. The close frame waits behind the unread backlog, which the
    gateway keeps trying to flush for a few seconds only: so the batch reads (everything)
    once the gateway has counted all of its members as slow consumers, and must then see
    4008 each. The wait is bounded; a reader that was never flagged reads anyway and is
    reported (``open``: the gateway never closed it)."""
    while await control.checkpoint():
        tally.cycles += 1
        flagged = await asyncio.to_thread(slow_consumers, plan)
        readers = [await _UnreadClient.open(plan) for _ in range(plan.slow_readers)]
        command = {
            "op": "subscribe",
            "products": plan.big_products,
            "snapshot": False,
            "backfill": {"last": plan.slow_backfill},
        }
        for reader in readers:
            reader.send(command)
        started = time.monotonic()
        while time.monotonic() - started < plan.slow_wait_max_s:
            await asyncio.sleep(0.25)
            if await asyncio.to_thread(slow_consumers, plan) >= flagged + len(readers):
                break
        waited = round(time.monotonic() - started, 2)
        tally.extra["max_wait_s"] = max(tally.extra.get("max_wait_s", 0.0), waited)
        outcomes = await asyncio.gather(*(reader.drain_to_close(30) for reader in readers))
        for outcome in outcomes:
            tally.seen(outcome)
            if outcome != "close:4008":
                tally.wrong(f"slow reader: {outcome} (read after {waited}s)")
        await asyncio.sleep(plan.pause_s)


async def storm(plan: AttackPlan, control: Control, tally: Tally) -> None:
    """Connections with one API key, dropped without a close frame (half by RST, half by a
    bare FIN). Every ``storm_pileup_every``-th attack window (the first included) opens with
    a pile-up: connections held until the per-key limit refuses one with 1013, then all
    dropped at once; then, in every window, connections at
    ``storm_rate``/s, each held ``storm_hold_s``, every fifth an upgrade abandoned
    mid-handshake. Each connection gets a welcome or 1013, nothing else, and never more
    welcomes at once than the per-key limit."""
    key = plan.keys["storm"]
    gate = asyncio.Semaphore(plan.storm_concurrency)
    host, port = host_port(plan.url)
    held = 0
    tally.extra["max_admitted_at_once"] = 0
    tally.extra["pileups"] = 0
    in_flight: set[asyncio.Task[None]] = set()

    async def open_one() -> asyncio.StreamWriter | None:
        """A welcomed connection (counted as held), or None when refused with 1013."""
        nonlocal held
        async with gate:
            outcome, writer = await raw_open(plan.url, key)
        tally.seen(outcome)
        if writer is None:
            if outcome != "close:1013":
                tally.wrong(f"storm connection: {outcome}")
            return None
        held += 1
        tally.extra["max_admitted_at_once"] = max(tally.extra["max_admitted_at_once"], held)
        if held > plan.key_limit:
            tally.wrong(f"{held} admitted at once, over the per-key limit {plan.key_limit}")
        return writer

    def drop(writer: asyncio.StreamWriter, n: int) -> None:
        nonlocal held
        held -= 1
        abort(writer.transport, reset=n % 2 == 0)

    async def one(n: int) -> None:
        tally.cycles += 1
        if n % 5 == 4:
            async with gate:
                _, abandoned = await asyncio.open_connection(host, port)
                abandoned.write(upgrade_request(plan.url, key))
                abandoned.transport.abort()
            tally.seen("abandoned_handshake")
            return
        writer = await open_one()
        if writer is not None:
            try:
                await asyncio.sleep(plan.storm_hold_s)
            finally:
                drop(writer, n)

    async def pileup() -> None:
        tally.extra["pileups"] += 1
        admitted: list[asyncio.StreamWriter] = []
        refused = False
        while not refused and len(admitted) <= plan.key_limit + 10:
            batch = await asyncio.gather(*(open_one() for _ in range(32)))
            tally.cycles += len(batch)
            refused = any(ws is None for ws in batch)
            admitted += [ws for ws in batch if ws is not None]
        if not refused:
            tally.wrong(f"pile-up of {len(admitted)} connections never refused with 1013")
        for n, writer in enumerate(admitted):
            drop(writer, n)

    def done(task: asyncio.Task[None]) -> None:
        in_flight.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            tally.wrong(f"storm connection failed: {exc!r}")

    pacer = Pacer(plan.storm_rate)
    window = 0
    n = 0
    while True:
        if not control.running.is_set() and in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)  # drop all, then idle
        if not await control.checkpoint():
            break
        if window != control.windows:
            window = control.windows
            if window % plan.storm_pileup_every == 1 or plan.storm_pileup_every == 1:
                await pileup()
            pacer = Pacer(plan.storm_rate)
            continue
        await pacer.wait()
        n += 1
        task = asyncio.create_task(one(n))
        in_flight.add(task)
        task.add_done_callback(done)
    await asyncio.gather(*in_flight, return_exceptions=True)


async def bad_keys(plan: AttackPlan, control: Control, tally: Tally) -> None:
    """Missing, wrong, malformed and oversized API keys: HTTP 403 before any socket opens,
    with the protocol's ``unauthorized`` error as the body."""
    good = plan.valid_key
    cases: list[tuple[str, str, dict[str, str]]] = [
        ("missing", "", {}),
        ("invalid", "?token=not-a-key", {}),
        ("invalid", "", {"Authorization": "Bearer not-a-key"}),
        ("missing", "", {"Authorization": f"Basic {good}"}),
        ("invalid", f"?token={good[:-1]}", {}),
        ("invalid", f"?token={good}x", {}),
        ("invalid", "?token=" + "A" * 4096, {}),
        ("invalid", "?token=%00%ff%fe", {}),
    ]
    while await control.checkpoint():
        tally.cycles += 1
        for reason, query, headers in cases:
            try:
                async with websockets.connect(
                    plan.url + query, additional_headers=headers, open_timeout=20
                ):
                    tally.wrong(f"bad key admitted: {reason} {query[:40]} {headers}")
            except InvalidStatus as exc:
                response = exc.response
                body = orjson.loads(response.body or b"{}")
                tally.seen(f"http:{response.status_code}:{reason}")
                if response.status_code != 403 or body.get("code") != "unauthorized":
                    tally.wrong(f"bad key ({reason}): {response.status_code} {body}")
            await asyncio.sleep(plan.pause_s / 5)


ATTACKERS: dict[str, tuple[str, AttackFn]] = {
    "flood": ("flooders", flood),
    "oversized": ("oversized", oversized),
    "bad_utf8": ("bad_utf8", bad_utf8),
    "bad_input": ("bad_input", bad_input),
    "churn": ("churners", churn),
    "slow": ("slow_readers", slow_readers),
    "storm": ("storm_rate", storm),
    "bad_keys": ("bad_keys", bad_keys),
}


async def _guarded(fn: AttackFn, plan: AttackPlan, control: Control, tally: Tally) -> None:
    """Run one attacker until stopped; a failed cycle is an observation, then it goes on."""
    while not control.stopped:
        try:
            await fn(plan, control, tally)
        except _CYCLE_ERRORS as exc:
            tally.wrong(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.2)


async def _commands(control: Control) -> None:
    """``resume`` / ``pause`` / ``stop`` lines on stdin; each acknowledged on stdout."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while not control.stopped:
        line = (await reader.readline()).decode().strip()
        if line == "resume":
            control.windows += 1
            control.running.set()
            emit("resumed", time_ns=time.time_ns())
        elif line == "pause":
            control.running.clear()
            idle = await control.all_waiting(timeout=60)
            emit("paused", time_ns=time.time_ns(), idle=idle)
        elif line in ("stop", ""):  # "" = stdin closed
            control.stop()


async def run_attack(plan: AttackPlan) -> dict[str, Any]:
    control = Control()
    tallies = {name: Tally() for name in ATTACKERS}
    started = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        for name, (count_field, fn) in ATTACKERS.items():
            count = getattr(plan, count_field)
            # slow_readers sizes one task's batches and storm_rate its pace; any other
            # count is how many of that attacker run side by side
            for _ in range(min(int(count), 1) if name in ("storm", "slow") else int(count)):
                control.attackers += 1
                tg.create_task(_guarded(fn, plan, control, tallies[name]))
        emit("ready", idle=await control.all_waiting(timeout=60), time_ns=time.time_ns())
        commands = tg.create_task(_commands(control))
        stopper = asyncio.get_running_loop().call_later(plan.max_s, control.stop)
        while not control.stopped:
            await asyncio.sleep(0.1)
        stopper.cancel()
        commands.cancel()
    return {
        "attack_s": round(time.monotonic() - started, 2),
        "attackers": {name: tally.as_json() for name, tally in tallies.items()},
    }


# -- the well-behaved clients --------------------------------------------------------------


@dataclass
class GoodClient:
    """Subscribes to one product and records every tick: latency, order, conflation."""

    index: int
    product: str
    snapshot_seq: int | None = None
    count: int = 0
    skipped: int = 0
    regressions: int = 0
    last: int = -1
    closed: str | None = None
    others: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data["others"] = dict(self.others)
        return data


async def _good_session(
    client: GoodClient, url: str, key: str, born: array[int], lat: array[int]
) -> tuple[ClientConnection, asyncio.Task[None]]:
    ws = await connect(url, key)
    await expect_welcome(ws)
    command = {"op": "subscribe", "products": [client.product], "id": f"g{client.index}"}
    await ws.send(json.dumps(command))
    while True:
        message = orjson.loads(await asyncio.wait_for(ws.recv(), 20))
        if message.get("type") == "snapshot":
            tick = message.get("tick")
            client.snapshot_seq = tick["seq"] if tick else None
            client.last = tick["seq"] if tick else -1
            break

    async def read() -> None:
        try:
            while True:
                raw = await ws.recv()
                now = time.time_ns()
                message = orjson.loads(raw)
                if message.get("type") != "tick":
                    client.others[str(message.get("type"))] += 1
                    continue
                born.append(message["recv_ns"])
                lat.append(now - message["recv_ns"])
                seq = message["seq"]
                if seq <= client.last:
                    client.regressions += 1
                client.last = seq
                client.count += 1
                client.skipped += message.get("skipped", 0)
        except ConnectionClosed as exc:
            client.closed = f"close:{exc.rcvd.code}" if exc.rcvd else "close:none"

    return ws, asyncio.create_task(read())


async def run_good(url: str, key: str, n: int, products: list[str], out: Path) -> dict[str, Any]:
    born: array[int] = array("q")
    lat: array[int] = array("q")
    clients = [GoodClient(i, products[i % len(products)]) for i in range(n)]
    gate = asyncio.Semaphore(20)

    async def start(client: GoodClient) -> tuple[ClientConnection, asyncio.Task[None]]:
        async with gate:
            return await _good_session(client, url, key, born, lat)

    sessions = await asyncio.gather(*(start(c) for c in clients))
    emit("ready", clients=len(sessions))
    line = await asyncio.to_thread(sys.stdin.readline)
    targets: dict[str, int] = json.loads(line)["stop"] if line.strip() else {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(
        c.closed is None and c.last < targets.get(c.product, -1) for c in clients
    ):
        await asyncio.sleep(0.05)
    for _, task in sessions:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await asyncio.gather(*(ws.close() for ws, _ in sessions), return_exceptions=True)
    await asyncio.to_thread(out.write_bytes, born.tobytes() + lat.tobytes())
    return {"clients": [c.summary() for c in clients], "samples": len(born)}


# -- entry point ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.hostile")
    sub = parser.add_subparsers(dest="role", required=True)
    good = sub.add_parser("good", help="well-behaved clients that measure latency")
    good.add_argument("--url", required=True)
    good.add_argument("--key", required=True)
    good.add_argument("--clients", type=int, default=100)
    good.add_argument("--products", required=True)
    good.add_argument("--out", type=Path, required=True)
    attack = sub.add_parser("attack", help="every attacker of a plan, for its duration")
    attack.add_argument("--plan", required=True, help="AttackPlan fields as JSON")
    args = parser.parse_args(argv)
    if args.role == "good":
        products = [p for p in args.products.split(",") if p]
        result = uvloop.run(run_good(args.url, args.key, args.clients, products, args.out))
    else:
        plan = AttackPlan(**json.loads(args.plan))
        # The attackers stand for hosts elsewhere: on this shared 2-core machine their own
        # CPU yields to the gateway and the measured clients (the gateway's work for them,
        # which is what is under test, is not deprioritised).
        os.nice(plan.nice)
        result = uvloop.run(run_attack(plan))
    emit("result", **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
