"""The gateway's pure parts, without servers: token bucket, admission checks, backfill
requests, the hand-over buffer and the per-process key limit."""

from __future__ import annotations

from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from pydantic import ValidationError
from uvicorn.config import Config
from uvicorn.server import ServerState
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from services.common.tokenbucket import TokenBucket
from services.gateway.admission import Gatekeeper, presented_key
from services.gateway.app import create_app
from services.gateway.connection import ClientConnection
from services.gateway.frames import gated_protocol, text_frame
from services.gateway.limits import KeyLimiter, key_id
from services.gateway.protocol import Backfill, BadCommandError, backfill_spec
from services.gateway.settings import GatewaySettings
from services.gateway.ticks import LiveTick
from tests.gateway.helpers import make_tick


def test_token_bucket_allows_burst_plus_rate_times_elapsed() -> None:
    """Over t seconds at most B + R·t tokens, however the takes are spread; idle time
    beyond a full bucket earns nothing."""
    bucket = TokenBucket(rate=10, burst=5)
    start = bucket._stamp
    taken = sum(bucket.take(start + i * 0.01) for i in range(300))  # over 2.99 s
    assert taken == int(5 + 10 * 2.99)
    idle = start + 3 + 3600.0
    assert sum(bucket.take(idle) for _ in range(100)) == 5


def test_presented_key_comes_from_token_or_bearer() -> None:
    """``?token=`` wins, then ``Authorization: Bearer``; other schemes present nothing."""
    assert presented_key({"token": "q"}, {"authorization": "Bearer h"}) == "q"
    assert presented_key({}, {"authorization": "bearer  h "}) == "h"
    assert presented_key({}, {"authorization": "Basic h"}) is None
    assert presented_key({}, {}) is None


def test_gatekeeper_checks_keys_and_origins() -> None:
    """Keys must match exactly (any configured one); no keys = open. Origins compare
    case-insensitively without a trailing slash; no allowlist or no Origin = allowed."""
    guarded = Gatekeeper(
        GatewaySettings.model_validate(
            {"gateway_api_keys": "k1,k2", "ws_allowed_origins": "https://a.example/"}
        )
    )
    assert guarded.key_valid("k2") and not guarded.key_valid("k") and not guarded.key_valid(None)
    assert guarded.origin_allowed("HTTPS://A.EXAMPLE") and guarded.origin_allowed(None)
    assert not guarded.origin_allowed("https://b.example")
    assert not guarded.origin_allowed("null")
    open_gate = Gatekeeper(GatewaySettings())
    assert open_gate.key_valid(None) and open_gate.origin_allowed("https://any.example")


def test_settings_keep_keys_secret_and_reject_bad_origins() -> None:
    """API keys never show in the settings' repr; an origin with a path is a config error."""
    settings = GatewaySettings.model_validate({"gateway_api_keys": "super-secret"})
    assert "super-secret" not in repr(settings)
    with pytest.raises(ValidationError):
        GatewaySettings.model_validate({"ws_allowed_origins": "https://a.example/page"})
    with pytest.raises(ValidationError):
        GatewaySettings(redis_url="http://not-redis")


def test_backfill_spec_needs_exactly_one_form_and_a_zoned_time() -> None:
    """One of last/since_seq/since_time; since_time is RFC 3339 with a zone."""
    assert backfill_spec(Backfill(last=3), "r").last == 3
    when = backfill_spec(Backfill(since_time="2026-11-28T15:00:00.5Z"), "r").since_time
    assert when == datetime(2026, 11, 28, 15, 0, 0, 500000, tzinfo=UTC)
    for bad in (
        Backfill(),
        Backfill(last=1, since_seq=2),
        Backfill(since_time="2026-11-28 15:00:00"),
        Backfill(since_time="2026-11-28"),
        Backfill(since_time="soon"),
    ):
        with pytest.raises(BadCommandError) as caught:
            backfill_spec(bad, "r")
        assert caught.value.request_id == "r"


async def test_handover_buffer_releases_newer_ticks_and_announces_overflow() -> None:
    """Live ticks held during a backfill are released after it, only those newer than its
    last tick; past the buffer's bound only the newest survives, with ``skipped``."""
    settings = GatewaySettings(backfill_max=3, ws_max_msgs_per_sec=1e6, ws_burst=10**6)
    conn = ClientConnection("c", settings)
    conn.hold_live("A-USD")
    for seq in range(1, 8):
        conn.offer_tick("A-USD", LiveTick(make_tick("A-USD", seq), b"%d" % seq))
    assert not conn.queue
    conn.release_live("A-USD", 1)
    frames = [frame for frame, _ in conn.next_frames()]
    assert [f.seq if isinstance(f, LiveTick) else f for f in frames[:2]] == [2, 3]
    last = frames[2]
    assert isinstance(last, bytes) and b'"seq":7' in last and b'"skipped":3' in last


async def test_key_limiter_without_redis_counts_per_process() -> None:
    """Without REDIS_URL the per-key limit holds within the process, per key."""
    limiter = KeyLimiter(GatewaySettings(ws_max_connections_per_key=2))
    a, b = key_id("a"), key_id("b")
    assert a != b and len(a) == 16
    assert [await limiter.acquire(a) for _ in range(3)] == [True, True, False]
    assert await limiter.acquire(b)
    await limiter.release(a)
    assert await limiter.acquire(a)


@pytest.mark.parametrize("size", [0, 2, 125, 126, 65_535, 65_536, 200_000])
def test_prebuilt_text_frames_parse_as_websockets_reads_them(size: int) -> None:
    """Every length encoding (7-bit, 16-bit, 64-bit) of the raw fan-out frames, read back by
    websockets' own client-side parser: one final, unmasked text frame with the payload."""
    payload = b'"' + b"x" * (size - 2) + b'"' if size else b""  # exactly `size` bytes
    client = ClientProtocol(parse_uri("ws://localhost/ws"), state=State.OPEN, max_size=None)
    client.receive_data(text_frame(payload) + text_frame(b"[]"))
    events = client.events_received()
    frames = [e for e in events if isinstance(e, Frame)]
    assert len(frames) == len(events)
    assert [(f.opcode, f.fin, bytes(f.data)) for f in frames] == [
        (Opcode.TEXT, True, payload),
        (Opcode.TEXT, True, b"[]"),
    ]


async def test_the_app_refuses_bad_keys_itself_behind_another_websocket_server() -> None:
    """The gateway's own protocol refuses a bad key before the ASGI app runs; the app checks
    again, so that behind a server without that protocol nobody gets in unchecked: 403 with
    the ``unauthorized`` error, and no accept."""
    app = create_app(GatewaySettings.model_validate({"gateway_api_keys": "k1"}))
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    scope = {
        "type": "websocket", "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1", "scheme": "ws", "server": ("127.0.0.1", 8080),
        "client": ("127.0.0.1", 5555), "root_path": "", "path": "/ws", "raw_path": b"/ws",
        "query_string": b"token=wrong", "headers": [(b"host", b"x")], "subprotocols": [],
        "state": {}, "extensions": {"websocket.http.response": {}},
    }  # fmt: skip
    await app(scope, receive, send)
    assert [m["type"] for m in sent] == [
        "websocket.http.response.start",
        "websocket.http.response.body",
    ], sent
    assert sent[0]["status"] == 403
    body = orjson.loads(sent[1]["body"])
    assert (body["code"], body["message"]) == ("unauthorized", "invalid API key"), body


async def test_a_bad_key_is_refused_by_the_protocol_without_starting_the_app() -> None:
    """uvicorn's own upgrade handling, fed a request with a wrong key, reaches
    ``FrameWriterProtocol``'s refusal: 403 with the ``unauthorized`` body, the socket
    closed, and no ASGI task started. If a uvicorn upgrade stopped calling the hook,
    refusals would fall back to the (slower) endpoint and this fails."""
    settings = GatewaySettings.model_validate({"gateway_api_keys": "k1"})
    app = create_app(settings)
    config = Config(app, ws_max_size=settings.ws_max_frame_bytes)
    config.load()
    state = ServerState()
    protocol = gated_protocol(Gatekeeper(settings))(config=config, server_state=state, app_state={})

    class Transport:
        written = b""
        closed = False

        def write(self, data: bytes) -> None:
            self.written += data

        def close(self) -> None:
            self.closed = True

        def is_closing(self) -> bool:
            return self.closed

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return ("127.0.0.1", 5555) if name in ("peername", "sockname") else default

    transport = Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.data_received(
        b"GET /ws?token=wrong HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    head, _, body = transport.written.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 "), head
    assert orjson.loads(body)["code"] == "unauthorized"
    assert transport.closed and not state.tasks
