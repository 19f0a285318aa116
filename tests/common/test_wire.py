"""Direct dispatch (services.common.wire) against a real nats-server: every byte of every
message reaches its handler, and nats-py's own subscriptions on the same connection still
get theirs, with the headers nats-py would have parsed."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.common.wire import (
    DirectParser,
    direct_parser,
    parse_headers,
    status_of,
    subscribe_direct,
)
from services.devstack.servers import NatsServer

pytestmark = pytest.mark.integration

# payload sizes around the read buffer and control-line boundaries, and large ones that
# arrive in several reads
SIZES = [0, 1, 2, 100, 4094, 4095, 4096, 4097, 32767, 32768, 65536, 200_000]


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


def _payload(i: int, size: int) -> bytes:
    return (b"%d:" % i + bytes(range(256)) * (size // 256 + 1))[:size]


async def test_direct_and_plain_subscriptions_share_a_connection(nc: NATS) -> None:
    direct: list[tuple[bytes, bytes, bytes, bytes | None]] = []
    plain: list[Msg] = []
    done = asyncio.Event()

    def on_direct(subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        direct.append((subject, reply, data, headers))

    async def on_plain(msg: Msg) -> None:
        plain.append(msg)
        if len(plain) == expected:
            done.set()

    await subscribe_direct(nc, "direct.>", on_direct)
    await nc.subscribe("plain.>", cb=on_plain)
    sent: list[tuple[str, str, bytes, dict[str, str] | None]] = []
    for i in range(600):
        size = SIZES[i % len(SIZES)]
        headers = {"Ledgerflux-N": str(i), "X-Colon": "a: b"} if i % 3 else None
        reply = f"reply.{i}" if i % 2 else ""
        sent.append((f"n.{i}", reply, _payload(i, size), headers))
    expected = len(sent)
    for subject, reply, data, headers in sent:
        await nc.publish("direct." + subject, data, reply=reply, headers=headers)
        await nc.publish("plain." + subject, data, reply=reply, headers=headers)
    await asyncio.wait_for(done.wait(), 20)
    await nc.flush()

    assert len(direct) == expected
    for (subject, reply, data, headers), got, msg in zip(sent, direct, plain, strict=True):
        assert got[0] == b"direct." + subject.encode()
        assert got[1] == reply.encode()
        assert got[2] == data == msg.data
        if headers is None:
            assert got[3] is None and msg.headers is None
        else:
            assert got[3] is not None
            # the same dict nats-py builds for its own subscriptions
            assert parse_headers(got[3]) == msg.headers == headers
            assert status_of(got[3]) is None
    assert not direct_parser(nc).buf  # nothing left half-parsed


async def test_status_headers_parse_like_nats_py(nc: NATS) -> None:
    """A request nobody serves gets the server's inline 503 status."""
    statuses: list[bytes | None] = []
    got = asyncio.Event()

    def on_reply(_subject: bytes, _reply: bytes, data: bytes, headers: bytes | None) -> None:
        assert data == b""
        statuses.append(status_of(headers))
        assert headers is not None
        assert parse_headers(headers)["Status"] == "503"
        got.set()

    inbox = nc.new_inbox()
    await subscribe_direct(nc, inbox, on_reply)
    await nc.publish("nobody.listens", b"?", reply=inbox)
    await asyncio.wait_for(got.wait(), 5)
    assert statuses == [b"503"]


def test_parse_headers_inline_status_and_values() -> None:
    raw = (
        b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 5\r\nNats-Pending-Bytes: 0\r\n\r\n"
    )
    assert parse_headers(raw) == {
        "Status": "408",
        "Description": "Request Timeout",
        "Nats-Pending-Messages": "5",
        "Nats-Pending-Bytes": "0",
    }
    assert status_of(raw) == b"408"
    assert status_of(b"NATS/1.0\r\nA: b\r\n\r\n") is None
    assert parse_headers(b"NATS/1.0\r\nA: b:c\r\n\r\n") == {"A": "b:c"}


class _RecordingClient:
    """What the parser calls on its client for lines that are not direct messages."""

    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        self.events.append(("plain", sid, subject, reply, data, headers))

    async def _process_ping(self) -> None:
        self.events.append(("ping",))

    async def _process_pong(self) -> None:
        self.events.append(("pong",))


def _protocol_stream(rng: random.Random) -> tuple[bytes, list[tuple[object, ...]]]:
    """MSG/HMSG (direct sid 7, plain sid 9), PING, PONG and +OK lines, and what each means."""
    wire: list[bytes] = []
    expected: list[tuple[object, ...]] = []
    for i in range(300):
        kind = rng.choice(["msg", "hmsg", "msg", "hmsg", "ping", "pong", "ok"])
        if kind == "ping":
            wire.append(b"PING\r\n")
            expected.append(("ping",))
        elif kind == "pong":
            wire.append(b"PONG\r\n")
            expected.append(("pong",))
        elif kind == "ok":
            wire.append(b"+OK\r\n")
        else:
            sid = rng.choice([7, 9])
            subject = b"md.ticks.%d.P%d" % (i % 4, i)
            reply = rng.choice([b"", b"$JS.ACK.S.c.1.%d.%d.1.0" % (i, i)])
            data = _payload(i, rng.choice([0, 1, 30, 700, 5000]))
            headers = b"NATS/1.0\r\nNats-Msg-Id: m%d\r\n\r\n" % i if kind == "hmsg" else None
            args = [subject, b"%d" % sid] + ([reply] if reply else [])
            if headers is None:
                wire.append(b"MSG %s %d\r\n" % (b" ".join(args), len(data)))
            else:
                total = len(headers) + len(data)
                wire.append(
                    b"HMSG %s %d %d\r\n%s" % (b" ".join(args), len(headers), total, headers)
                )
            wire.append(data + b"\r\n")
            expected.append(("direct" if sid == 7 else "plain", sid, subject, reply, data, headers))
    return b"".join(wire), expected


@pytest.mark.parametrize("seed", range(20))
async def test_the_parser_gives_every_message_whole_however_the_reads_split(seed: int) -> None:
    """The same protocol stream cut into reads at random places (inside control lines,
    headers, payloads and CRLFs, down to one byte): every message reaches its handler or
    nats-py's path whole and in order, every PING/PONG is handled, nothing is left over."""
    rng = random.Random(seed)
    stream, expected = _protocol_stream(rng)
    client = _RecordingClient()
    parser = DirectParser(client)  # type: ignore[arg-type]  # the calls the parser makes

    def direct(subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        client.events.append(("direct", 7, subject, reply, data, headers))

    parser.handlers[7] = direct
    pos = 0
    while pos < len(stream):
        step = rng.choice([1, 2, 3, 7, 64, 1000, 4096, 20_000])
        await parser.parse(stream[pos : pos + step])
        pos += step
    assert client.events == expected
    assert not parser.buf
