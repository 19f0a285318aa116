"""WebSocket text frames built once and written straight to the socket: the fan-out's hot path.

Through ASGI every message to every client is re-encoded to UTF-8, framed by websockets'
protocol object and written with its own awaits: per client per tick, most of the gateway's
CPU went there (profile in ARCHITECTURE.md). A server-to-client frame is just a header and
the payload (never masked), and a tick's payload is the same bytes for every client, so the
whole frame is built once per tick and each writer hands a list of such frames to its
socket in one call.

:class:`FrameWriterProtocol` is uvicorn's websockets-sansio protocol that puts itself into
the ASGI scope (``scope["extensions"][FRAME_WRITER]``) so a session can do that. Pings,
pongs and the close handshake still go through websockets' state machine; raw frames are
only written while the connection is open, no close was sent or received and no extension
(permessage-deflate) was negotiated — otherwise the session uses plain ASGI sends.

It also refuses upgrades that fail the Origin or API-key check (``Gatekeeper.denial``)
with the 403 itself, before uvicorn builds a scope and starts the ASGI app for them:
:func:`gated_protocol` gives uvicorn a subclass that knows the gatekeeper.
"""

from __future__ import annotations

import email.utils
from typing import Any, ClassVar
from urllib.parse import parse_qsl

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.protocol import State

from services.common.aio import Signal
from services.common.logging import get_logger
from services.common.logthrottle import throttle
from services.common.tokenbucket import TokenBucket
from services.gateway import metrics
from services.gateway.admission import Gatekeeper, denial_body, peer_name
from services.gateway.protocol import CLOSE_POLICY

log = get_logger(__name__)

FRAME_WRITER = "ledgerflux.frame_writer"
# A client's WebSocket pings: a keepalive is one every ~20 s and browsers send none, so 10 a
# second after a burst of 50 is generous. Past that the client is flooding (each ping costs a
# frame parse and a pong write, outside the command limit): closed with 1008.
PING_RATE_PER_S = 10.0
PING_BURST = 50

_FIN_TEXT = 0x81  # FIN + opcode 1 (text)


def text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented text frame carrying ``payload`` (UTF-8 JSON)."""
    size = len(payload)
    if size < 126:
        return bytes((_FIN_TEXT, size)) + payload
    if size < 1 << 16:
        return bytes((_FIN_TEXT, 126)) + size.to_bytes(2, "big") + payload
    return bytes((_FIN_TEXT, 127)) + size.to_bytes(8, "big") + payload


class ConnectionGone(Exception):
    """The socket is closing or closed: nothing more can be written."""


class _Inbox:
    """What uvicorn's protocol needs of its ``asyncio.Queue`` of received events (put_nowait,
    get, empty), in ~200 bytes instead of ~2.6 KiB: three deques and a dict per idle
    connection. uvicorn pauses reading after each message, so it holds one or two."""

    __slots__ = ("_items", "_ready")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._ready = Signal()

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        self._ready.set()

    async def get(self) -> Any:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.pop(0)

    def empty(self) -> bool:
        return not self._items


class _LostTransport:
    """What a protocol's ``transport`` becomes once the connection is lost: closed, inert."""

    def is_closing(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


_LOST = _LostTransport()


class FrameWriterProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # per idle connection these two were ~3.7 KiB of uvicorn's ~6 (10,000 connections)
        self.queue = _Inbox()  # type: ignore[assignment]
        self.writable = Signal()  # type: ignore[assignment]
        self.writable.set()

    # created at a client's first ping: most connections never send one
    _pings: TokenBucket | None = None
    # set on the subclass uvicorn instantiates (gated_protocol)
    gatekeeper: ClassVar[Gatekeeper | None] = None

    def handle_connect(self, event: Request) -> None:
        gatekeeper = self.gatekeeper
        if gatekeeper is not None:
            query = dict(parse_qsl(event.path.partition("?")[2], keep_blank_values=True))
            reason = gatekeeper.denial(query, event.headers, peer_name(self.client))
            if reason is not None:
                self._deny(reason)
                return
        super().handle_connect(event)

    def _deny(self, reason: str) -> None:
        """403 with the protocol's ``unauthorized`` error, then close (as uvicorn answers a
        request that is no valid upgrade): no scope, ASGI task or app involved."""
        body = denial_body(reason)
        headers = Headers(
            [
                ("Date", email.utils.formatdate(usegmt=True)),
                ("Connection", "close"),
                ("Content-Length", str(len(body))),
                ("Content-Type", "application/json"),
            ]
        )
        self.handshake_initiated = self.handshake_complete = self.close_sent = True
        self.conn.send_response(Response(403, "Forbidden", headers, body))
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.transport.close()

    def handle_ping(self) -> None:
        if self._pings is None:
            self._pings = TokenBucket(PING_RATE_PER_S, PING_BURST)
        if self._pings.take() or self.close_sent:
            super().handle_ping()
            return
        metrics.PING_FLOODS.inc()
        throttle.emit(log.warning, "ping_flood", rate_per_s=PING_RATE_PER_S, burst=PING_BURST)
        # as uvicorn's own close for the app: the session is told "disconnect 1008", the
        # close frame goes out after the pongs already queued, and the socket closes when
        # the client echoes it (closing at once reset the connection under the client's
        # pending pings, and it never saw the close frame) or after close_timeout
        self.queue.put_nowait(
            {"type": "websocket.disconnect", "code": CLOSE_POLICY, "reason": "ping flood"}
        )
        self.conn.send_close(CLOSE_POLICY, "ping flood")
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        # Reference cycles per connection would be left to the cyclic GC, whose gen-2
        # passes (55-90 ms here) stall every client under connection churn: websockets'
        # parser generator holds its protocol, and so does the traceback of the parser's
        # error when it closed the connection (1009 frame too big, 1002 protocol error);
        # the transport and this protocol hold each other (and the scope holds this
        # protocol). Nothing is parsed or written after the connection is lost.
        self.conn.parser = None  # type: ignore[assignment]
        self.conn.parser_exc = None
        self.transport = _LOST  # type: ignore[assignment]
        scope = getattr(self, "scope", None)  # none for an upgrade refused before the app
        if scope is not None:
            scope.get("extensions", {}).pop(FRAME_WRITER, None)  # the scope holds us too

    async def run_asgi(self) -> None:
        self.scope["extensions"][FRAME_WRITER] = self  # type: ignore[assignment]
        await super().run_asgi()

    def raw_frames_allowed(self) -> bool:
        """False once permessage-deflate is in use: frames must then be compressed."""
        return not self.conn.extensions

    def can_write_now(self) -> bool:
        """The socket's buffer is under its high-water mark: a write needs no wait."""
        return self.writable.is_set()

    async def write_frames(self, frames: list[bytes]) -> None:
        """Write whole frames, waiting first while the socket's buffer is over its mark
        (the caller bounds that wait: a client that never drains is a slow consumer)."""
        if not self.writable.is_set():
            await self.writable.wait()
        self.write_now(frames)

    def write_now(self, frames: list[bytes]) -> None:
        if (
            self.disconnected
            or self.close_sent
            or self.conn.state is not State.OPEN
            or self.transport.is_closing()
        ):
            raise ConnectionGone
        self.transport.write(b"".join(frames))


def gated_protocol(gatekeeper: Gatekeeper) -> type[FrameWriterProtocol]:
    """The protocol class for uvicorn's ``ws=``, refusing what ``gatekeeper`` denies."""
    return type("GatedFrameWriterProtocol", (FrameWriterProtocol,), {"gatekeeper": gatekeeper})
