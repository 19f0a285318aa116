"""One WebSocket session: welcome, read commands, write frames, close with the right code."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

from starlette.websockets import WebSocket, WebSocketDisconnect
from structlog.contextvars import bound_contextvars

from services.common.logging import get_logger
from services.common.subjects import is_valid_product
from services.gateway import metrics
from services.gateway.connection import (
    CLOSE_POLICY,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TOO_BIG,
    ClientConnection,
)
from services.gateway.hub import Hub
from services.gateway.protocol import (
    BadCommandError,
    Command,
    Ping,
    Subscribe,
    Unsubscribe,
    decode_command,
    encode,
    error,
)
from services.gateway.ratelimit import TokenBucket
from services.gateway.settings import GatewaySettings

log = get_logger(__name__)
_conn_ids = itertools.count(1)


class _Closed(Exception):
    """The session ended (client gone or closed by us)."""


async def run_session(ws: WebSocket, hub: Hub, settings: GatewaySettings) -> None:
    conn = ClientConnection(f"c{next(_conn_ids)}", settings)
    with bound_contextvars(conn_id=conn.conn_id):
        hub.add(conn)
        log.info("client_connected", client=str(ws.client))
        conn.send_control(
            encode(
                {
                    "type": "welcome",
                    "limits": {
                        "max_msgs_per_sec": settings.ws_max_msgs_per_sec,
                        "burst": settings.ws_burst,
                        "max_frame_bytes": settings.ws_max_frame_bytes,
                        "max_subscriptions": settings.ws_max_subscriptions,
                        "cmds_per_sec": settings.ws_cmds_per_sec,
                    },
                }
            ),
            "welcome",
        )
        try:
            async with asyncio.TaskGroup() as tg:
                # the writer ends the session: it flushes, then closes with conn.close_code
                tg.create_task(_write(ws, conn))
                await _read(ws, conn, hub, settings)
        except* _Closed:
            pass
        finally:
            hub.remove(conn)
            code = conn.close_code or 1000
            metrics.DISCONNECTS.labels(code=str(code)).inc()
            log.info("client_disconnected", code=code, reason=conn.close_reason)


async def _read(ws: WebSocket, conn: ClientConnection, hub: Hub, settings: GatewaySettings) -> None:
    commands = TokenBucket(settings.ws_cmds_per_sec, settings.ws_cmd_burst)
    strikes = 0
    while conn.close_code is None:
        try:
            message = await ws.receive()
        except WebSocketDisconnect:
            raise _Closed from None
        if message["type"] == "websocket.disconnect":
            conn.close_code = conn.close_code or int(message.get("code") or 1000)
            raise _Closed
        data: str | bytes = message.get("text") or message.get("bytes") or b""
        if len(data) > settings.ws_max_frame_bytes:
            conn.request_close(CLOSE_TOO_BIG, "frame too big")
            return
        if not commands.take():
            strikes += 1
            if strikes >= settings.ws_flood_strikes:
                conn.request_close(CLOSE_POLICY, "command flood")
                return
            _error(conn, "rate_limited", "too many commands; slow down", None)
            continue
        try:
            command = decode_command(data)
        except BadCommandError as exc:
            _error(conn, "bad_request", str(exc), exc.request_id)
            continue
        handle_command(command, conn, hub, settings)


def handle_command(
    command: Command, conn: ClientConnection, hub: Hub, settings: GatewaySettings
) -> None:
    match command:
        case Ping(id=request_id):
            conn.send_control(encode({"type": "pong", "id": request_id}), "pong")
        case Subscribe():
            _subscribe(command, conn, hub, settings)
        case Unsubscribe(products=products, id=request_id):
            for product in products:
                hub.unsubscribe(conn, product)
            conn.send_control(
                encode({"type": "unsubscribed", "products": products, "id": request_id}),
                "unsubscribed",
            )


def _subscribe(
    command: Subscribe, conn: ClientConnection, hub: Hub, settings: GatewaySettings
) -> None:
    products = list(dict.fromkeys(command.products))
    if not products:
        _error(conn, "bad_request", "products must not be empty", command.id)
        return
    if len(conn.products | set(products)) > settings.ws_max_subscriptions:
        _error(
            conn,
            "too_many_subscriptions",
            f"at most {settings.ws_max_subscriptions} products per connection",
            command.id,
        )
        return
    unknown = [p for p in products if not is_valid_product(p) or not hub.serves(p)]
    if unknown:
        _error(conn, "unknown_product", f"not served: {', '.join(unknown[:20])}", command.id)
        return
    if command.backfill is not None:
        _error(conn, "backfill_unavailable", "backfill is not available yet", command.id)
        return
    conn.send_control(
        encode({"type": "subscribed", "products": products, "id": command.id}), "subscribed"
    )
    for product in products:
        snapshot = hub.subscribe(conn, product)
        if command.snapshot:
            conn.send_control(
                b'{"type":"snapshot","product":%s,"tick":%s}'
                % (encode(product), snapshot.data if snapshot else b"null"),  # type: ignore[arg-type]
                "snapshot",
            )


def _error(conn: ClientConnection, code: str, message: str, request_id: object) -> None:
    metrics.ERRORS_SENT.labels(code=code).inc()
    conn.send_control(error(code, message, request_id), "error")  # type: ignore[arg-type]


async def _write(ws: WebSocket, conn: ClientConnection) -> None:
    slow_s = conn.settings.ws_slow_consumer_s
    while True:
        timeout = conn.seconds_until_more()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(conn.wakeup.wait(), timeout)
        conn.wakeup.clear()
        for frame, kind in conn.next_frames():
            metrics.BUFFER_DEPTH.observe(len(conn.queue))
            try:
                await asyncio.wait_for(ws.send_text(frame.decode()), slow_s)
            except TimeoutError:
                conn.request_close(CLOSE_SLOW_CONSUMER, "slow consumer")
                break
            except (WebSocketDisconnect, RuntimeError, OSError):
                raise _Closed from None
            metrics.MESSAGES_OUT.labels(type=kind).inc()
            metrics.BYTES_OUT.inc(len(frame))
        if conn.close_code is not None:
            await _close(ws, conn)
            raise _Closed


async def _close(ws: WebSocket, conn: ClientConnection) -> None:
    with contextlib.suppress(TimeoutError, RuntimeError, OSError, WebSocketDisconnect):
        await asyncio.wait_for(ws.close(conn.close_code or 1000, conn.close_reason), 2.0)
