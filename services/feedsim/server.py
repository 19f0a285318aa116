"""WebSocket + HTTP server: one port for the ws feed and the REST endpoints (websockets)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from structlog.contextvars import bound_contextvars
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from services.common.logging import get_logger
from services.feedsim.hub import Client
from services.feedsim.rest import RestApi, respond, respond_json

log = get_logger(__name__)
# websockets logs each handshake/HTTP response at INFO; __main__ keeps it at WARNING.
WS_LOGGER = logging.getLogger("services.feedsim.websockets")

SUBSCRIBE_TIMEOUT_CODE = 1008  # policy violation; the close code Coinbase uses isn't documented
MAX_CLIENT_FRAME = 64 * 1024  # inbound: subscribe messages are small


class Session(Protocol):
    """What the server needs from the simulator for each connection."""

    def on_connect(self, client: Client) -> None: ...
    def on_message(self, client: Client, raw: str | bytes) -> None: ...
    def on_disconnect(self, client: Client) -> None: ...


class FeedServer:
    """Accepts ws feed clients on any path and answers plain HTTP through ``RestApi``."""

    def __init__(
        self,
        session: Session,
        rest: RestApi,
        *,
        subscribe_timeout_s: float,
        close_timeout_s: float,
        compression: bool,
    ) -> None:
        self._session = session
        self._rest = rest
        self._subscribe_timeout_s = subscribe_timeout_s
        self._close_timeout_s = close_timeout_s
        self._compression = compression
        self._server: Server | None = None
        self._metrics_server: Server | None = None
        self._next_id = 0
        self.port = 0
        self.metrics_port = 0

    async def start(self, host: str, port: int) -> int:
        self._server = await serve(
            self._handler,
            host,
            port,
            process_request=self._process_request,
            compression="deflate" if self._compression else None,
            max_size=MAX_CLIENT_FRAME,
            close_timeout=self._close_timeout_s,
            logger=WS_LOGGER,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def start_metrics(self, host: str, port: int, render: Callable[[], bytes]) -> int:
        """A second, HTTP-only port for Prometheus (``--metrics-port``)."""

        def metrics_only(conn: ServerConnection, request: Request) -> Response:
            if request.path.split("?", 1)[0] == "/metrics":
                return respond(200, render(), "text/plain; version=0.0.4; charset=utf-8")
            return respond_json(404, {"message": "NotFound"})

        self._metrics_server = await serve(
            self._refuse, host, port, process_request=metrics_only, logger=WS_LOGGER
        )
        self.metrics_port = self._metrics_server.sockets[0].getsockname()[1]
        return self.metrics_port

    async def close(self) -> None:
        """Stop accepting, close every client with 1001 (going away), wait for handlers."""
        servers = [s for s in (self._server, self._metrics_server) if s is not None]
        for server in servers:
            # We close connections ourselves: websockets' close() waits, without a timeout,
            # for the write buffer to drain, which a stuck client never lets happen.
            server.close(close_connections=False)
        if self._server is not None:
            async with asyncio.TaskGroup() as tg:
                for ws in self._server.connections:
                    tg.create_task(self._close_ws(ws, 1001, ""))
        for server in servers:
            await server.wait_closed()

    async def _close_ws(self, ws: ServerConnection, code: int, reason: str) -> None:
        """Closing handshake, bounded: a peer that won't read gets its TCP connection cut."""
        try:
            async with asyncio.timeout(self._close_timeout_s):
                await ws.close(code, reason)
        except TimeoutError:
            ws.transport.abort()

    @staticmethod
    async def _refuse(ws: ServerConnection) -> None:  # pragma: no cover - never upgraded
        await ws.close(1008)

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None  # the ws feed, on any path
        addr = conn.remote_address
        ip = str(addr[0]) if isinstance(addr, tuple) else str(addr)
        return self._rest.handle(request, ip)

    async def _handler(self, ws: ServerConnection) -> None:
        self._next_id += 1
        client = Client(ws, self._next_id)
        with bound_contextvars(conn_id=client.conn_id):
            self._session.on_connect(client)
            log.info("client_connected", remote=client.remote)
            reader = asyncio.create_task(self._read(client))
            try:
                try:
                    async with asyncio.timeout(self._subscribe_timeout_s):
                        await client.settled.wait()
                except TimeoutError:
                    log.info("subscribe_timeout", timeout_s=self._subscribe_timeout_s)
                    client.kick(SUBSCRIBE_TIMEOUT_CODE, "subscribe timeout")
                await client.closing.wait()
            finally:
                reader.cancel()
                await asyncio.wait([reader])
                self._session.on_disconnect(client)
            if client.close_code is not None:
                await self._close_ws(ws, client.close_code, client.close_reason)
            log.info(
                "client_disconnected",
                frames_sent=client.frames_sent,
                close_code=client.close_code or ws.close_code,
                reason=client.close_reason or ws.close_reason,
            )

    async def _read(self, client: Client) -> None:
        try:
            async for raw in client.ws:
                try:
                    self._session.on_message(client, raw)
                except Exception:  # boundary: one bad message must not kill the connection
                    log.exception("client_message_failed")
        except ConnectionClosed:
            pass
        finally:
            client.closing.set()
            client.settled.set()
