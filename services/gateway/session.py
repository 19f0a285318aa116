"""One WebSocket session: welcome, read commands, write frames, close with the right code."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass
from functools import partial

from nats.js import JetStreamContext
from starlette.websockets import WebSocket, WebSocketDisconnect
from structlog.contextvars import bound_contextvars

from services.common.logging import get_logger
from services.common.logthrottle import throttle
from services.common.subjects import is_valid_product
from services.common.tokenbucket import TokenBucket
from services.gateway import metrics
from services.gateway.admission import peer_name
from services.gateway.backfill import BackfillResult, read_backfill
from services.gateway.connection import ClientConnection, Frame
from services.gateway.errors import BackfillUnavailableError
from services.gateway.frames import FRAME_WRITER, ConnectionGone, FrameWriterProtocol, text_frame
from services.gateway.hub import Hub
from services.gateway.protocol import (
    CLOSE_POLICY,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TOO_BIG,
    BackfillSpec,
    BadCommandError,
    Command,
    ErrorCode,
    Ping,
    Subscribe,
    Unsubscribe,
    backfill_message,
    backfill_spec,
    decode_command,
    encode,
    error,
    request_id_of,
    snapshot_message,
)
from services.gateway.settings import GatewaySettings
from services.gateway.ticks import LiveTick
from services.gateway.window import WindowBatch

log = get_logger(__name__)
_conn_ids = itertools.count(1)

BACKFILL_CHUNK = 500  # ticks per backfill message (~250 KB): bounded frames, few of them
# how long a close may wait for a backed-up socket to take the close frame
_CLOSE_TIMEOUT_S = 5.0
# Commands a session handles before it lets the loop run others: a client's burst of frames
# arrives in one socket read and waits in its inbox, so the reader would otherwise handle
# all of it (hundreds of commands from a flooder, milliseconds) while every other client's
# ticks wait behind it.
COMMANDS_PER_TURN = 16


@dataclass(slots=True)
class SessionContext:
    """What every session shares: the hub, settings, JetStream and the backfill limiter."""

    hub: Hub
    settings: GatewaySettings
    js: JetStreamContext | None
    backfills: asyncio.Semaphore


def new_connection(ctx: SessionContext, *, batch: bool) -> ClientConnection:
    return ClientConnection(
        f"c{next(_conn_ids)}",
        ctx.settings,
        batch=batch,
        schedule=ctx.hub.mark_dirty,
        catch_up=ctx.hub.catch_up,
        schedule_inline=ctx.hub.schedule_inline,
    )


async def run_session(ws: WebSocket, conn: ClientConnection, ctx: SessionContext) -> None:
    settings, hub = ctx.settings, ctx.hub
    with bound_contextvars(conn_id=conn.conn_id):
        hub.add(conn)
        started = time.monotonic()
        throttle.emit(log.info, "client_connected", client=peer_name(ws.client), batch=conn.batch)
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
                        "backfill_max": settings.backfill_max,
                    },
                }
            ),
            "welcome",
        )
        raw = _frame_writer(ws)
        if raw is not None:
            conn.inline_flush = partial(_flush_inline, conn, raw)
        # Both end by returning, never by raising: an exception ending every session (through
        # a TaskGroup) left its tracebacks, frames and the whole session in reference
        # cycles, 130-400 objects per connection, which only the cyclic GC frees — its
        # gen-2 passes then paused the loop 55-92 ms for every client under churn. The
        # reader runs in this task and the writer in one of its own, with a done-callback
        # and no asyncio.wait: a reader task and wait()'s waiter and callbacks cost every
        # idle connection ~2 KiB (30.4 KiB each at 10,000 held, over the 30 KiB goal).
        session = asyncio.current_task()
        assert session is not None
        reading = True

        def on_writer_done(_: object) -> None:
            # the close is out or the socket is gone: nothing more to read
            if reading:
                session.cancel()

        writer = asyncio.create_task(_write(ws, conn, raw))
        writer.add_done_callback(on_writer_done)
        try:
            try:
                await _read(ws, conn, ctx)
            except asyncio.CancelledError:
                # our own cancel (the writer ended) is absorbed; one from outside is not
                if not writer.done() or session.uncancel() > 0:
                    raise
            reading = False
            # the reader is done: the peer left (the writer returns at once) or a close was
            # requested (the writer flushes, then sends it)
            await writer  # an unexpected error ends the session loudly
        finally:
            reading = False
            writer.cancel()
            conn.inline_flush = None  # it holds conn: a reference cycle otherwise
            hub.remove(conn)
            code = conn.close_code or 1000
            metrics.DISCONNECTS.labels(code=str(code)).inc()
            throttle.emit(
                log.info,
                "client_disconnected",
                code=code,
                reason=conn.close_reason,
                duration_s=round(time.monotonic() - started, 3),
            )


async def _read(ws: WebSocket, conn: ClientConnection, ctx: SessionContext) -> None:
    settings = ctx.settings
    commands = TokenBucket(settings.ws_cmds_per_sec, settings.ws_cmd_burst)
    strikes = 0  # rate-limited commands since strikes_since: flooding is persistent
    strikes_since = 0.0  # when they keep coming within WS_FLOOD_WINDOW_S
    # A subscribe with a backfill is sent from a task of its own, so that a ping is answered
    # at once (it waited for the whole backfill); any other command waits for the backfill
    # to finish, and so keeps its order after the subscribe.
    backfilling: asyncio.Task[None] | None = None
    handled = 0
    try:
        while conn.close_code is None:
            handled += 1
            if handled % COMMANDS_PER_TURN == 0:
                await asyncio.sleep(0)
            try:
                message = await ws.receive()
            except WebSocketDisconnect as exc:
                conn.peer_gone(exc.code)
                return
            if message["type"] == "websocket.disconnect":
                # uvicorn reports its own closes here too (1009 frame too big, 1011 keepalive)
                conn.peer_gone(int(message.get("code") or 1000))
                return
            data: str | bytes = message.get("text") or message.get("bytes") or b""
            if len(data) > settings.ws_max_frame_bytes:
                conn.request_close(CLOSE_TOO_BIG, "frame too big")
                return
            if not commands.take():
                now = time.monotonic()
                if now - strikes_since > settings.ws_flood_window_s:
                    strikes, strikes_since = 0, now
                strikes += 1
                if strikes >= settings.ws_flood_strikes:
                    throttle.emit(log.warning, "command_flood", strikes=strikes)
                    conn.request_close(CLOSE_POLICY, "command flood")
                    return
                _error(conn, "rate_limited", "too many commands; slow down", request_id_of(data))
                continue
            try:
                command = decode_command(data)
            except BadCommandError as exc:
                _error(conn, "bad_request", str(exc), exc.request_id)
                continue
            if type(command) is not Ping and backfilling is not None:
                await backfilling
                backfilling = None
            if type(command) is Subscribe and command.backfill is not None:
                backfilling = asyncio.create_task(_answer(command, conn, ctx))
            else:
                await _answer(command, conn, ctx)
    finally:
        if backfilling is not None:
            if not backfilling.done():
                backfilling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await backfilling  # its own failure, if any, ends the session loudly


async def _answer(command: Command, conn: ClientConnection, ctx: SessionContext) -> None:
    try:
        await handle_command(command, conn, ctx)
    except BadCommandError as exc:
        _error(conn, "bad_request", str(exc), exc.request_id)


async def handle_command(command: Command, conn: ClientConnection, ctx: SessionContext) -> None:
    match command:
        case Ping(id=request_id):
            conn.send_control(encode({"type": "pong", "id": request_id}), "pong")
        case Subscribe():
            await _subscribe(command, conn, ctx)
        case Unsubscribe(products=products, id=request_id):
            if not products:
                raise BadCommandError("products must not be empty", request_id)
            if _refused_unknown(products, conn, ctx, request_id):
                return
            for product in products:  # one never subscribed is already unsubscribed: fine
                ctx.hub.unsubscribe(conn, product)
            conn.send_control(
                encode({"type": "unsubscribed", "products": products, "id": request_id}),
                "unsubscribed",
            )


async def _subscribe(command: Subscribe, conn: ClientConnection, ctx: SessionContext) -> None:
    hub, settings = ctx.hub, ctx.settings
    products = list(dict.fromkeys(command.products))
    if not products:
        raise BadCommandError("products must not be empty", command.id)
    spec = backfill_spec(command.backfill, command.id) if command.backfill else None
    if len(conn.products | set(products)) > settings.ws_max_subscriptions:
        _error(
            conn,
            "too_many_subscriptions",
            f"at most {settings.ws_max_subscriptions} products per connection",
            command.id,
        )
        return
    if _refused_unknown(products, conn, ctx, command.id):
        return
    if spec is not None and (again := [p for p in products if p in conn.products]):
        # their live stream already runs: older ticks now would break per-product order
        raise BadCommandError(
            f"already subscribed to {', '.join(again[:20])}: unsubscribe before a backfill",
            command.id,
        )
    # already live: a second snapshot could repeat a seq the client has (order breaks)
    live_already = conn.products.intersection(products)
    # Register every product for live ticks before anything else, without an await in
    # between: the snapshot (or backfill) and the live stream then meet with no gap.
    latest: dict[str, LiveTick | None] = {}
    for product in products:
        latest[product] = hub.subscribe(conn, product)
        if spec is not None:
            conn.hold_live(product)
    conn.send_control(
        encode({"type": "subscribed", "products": products, "id": command.id}), "subscribed"
    )
    if spec is None:
        for product, snapshot in latest.items():
            if product in live_already:
                continue
            if command.snapshot:
                conn.send_control(
                    snapshot_message(product, snapshot.data if snapshot else None), "snapshot"
                )
            conn.start_after(product, snapshot.seq if snapshot else None)
        return
    for product, seen in latest.items():
        await _backfill(conn, ctx, product, spec, seen, command)


def _refused_unknown(
    products: list[str], conn: ClientConnection, ctx: SessionContext, request_id: str | int | None
) -> bool:
    """Answer ``unknown_product`` (and say so) if one of ``products`` is not served."""
    unknown = [p for p in products if not is_valid_product(p) or not ctx.hub.serves(p)]
    if unknown:
        _error(conn, "unknown_product", f"not served: {', '.join(unknown[:20])}", request_id)
    return bool(unknown)


async def _backfill(
    conn: ClientConnection,
    ctx: SessionContext,
    product: str,
    spec: BackfillSpec,
    seen: LiveTick | None,
    command: Subscribe,
) -> None:
    """Snapshot (if asked), backfill chunks, then the buffered live ticks — or, when
    JetStream cannot serve it, the current snapshot, an error and live ticks."""
    form = spec.form
    started = time.perf_counter()
    try:
        result = await _read_backfill(ctx, product, spec, seen.seq if seen else -1)
    except BackfillUnavailableError as exc:
        metrics.BACKFILL_REQUESTS.labels(form=form, outcome="unavailable").inc()
        log.warning("backfill_unavailable", product=product, reason=exc.reason)
        now = ctx.hub.latest.get(product)
        if command.snapshot:
            conn.send_control(snapshot_message(product, now.data if now else None), "snapshot")
        _error(conn, "backfill_unavailable", str(exc), command.id)
        # live from the snapshot just sent, or else from the subscription (held ticks too)
        after = now if command.snapshot else seen
        conn.release_live(product, after.seq if after else None)
        return
    elapsed = time.perf_counter() - started
    metrics.BACKFILL_SECONDS.observe(elapsed)
    metrics.BACKFILL_REQUESTS.labels(form=form, outcome="ok").inc()
    metrics.BACKFILL_TICKS.observe(len(result.ticks))
    log.info(
        "backfill_sent",
        product=product,
        form=form,
        ticks=len(result.ticks),
        read_ms=round(elapsed * 1000, 1),
    )
    if command.snapshot:
        conn.send_control(snapshot_message(product, result.before), "snapshot")
    await _send_chunks(conn, product, result)
    conn.release_live(product, _newest(result.last_seq, result.before_seq))


async def _read_backfill(
    ctx: SessionContext, product: str, spec: BackfillSpec, seen_seq: int
) -> BackfillResult:
    if ctx.js is None:
        raise BackfillUnavailableError(product, "JetStream not connected")
    try:
        async with asyncio.timeout(ctx.settings.backfill_timeout_s):
            # the wait for a slot counts: a gateway too busy to start soon says so
            async with ctx.backfills:
                metrics.BACKFILLS_IN_PROGRESS.inc()
                try:
                    return await read_backfill(
                        ctx.js,
                        product,
                        spec,
                        num_shards=ctx.settings.num_shards,
                        cap=ctx.settings.backfill_max,
                        seen_seq=seen_seq,
                    )
                finally:
                    metrics.BACKFILLS_IN_PROGRESS.dec()
    except TimeoutError:
        raise BackfillUnavailableError(
            product, f"not read within {ctx.settings.backfill_timeout_s:g}s"
        ) from None


async def _send_chunks(conn: ClientConnection, product: str, result: BackfillResult) -> None:
    ticks = result.ticks
    for start in range(0, max(len(ticks), 1), BACKFILL_CHUNK):
        chunk = ticks[start : start + BACKFILL_CHUNK]
        done = start + BACKFILL_CHUNK >= len(ticks)
        conn.send_control(backfill_message(product, chunk, done), "backfill")
        # at most two chunks wait per client: a slow reader holds the backfill back
        # (and meets the slow-consumer close) instead of the gateway's memory
        await conn.wait_drained(1)


def _newest(*seqs: int | None) -> int | None:
    present = [s for s in seqs if s is not None]
    return max(present) if present else None


def _error(conn: ClientConnection, code: ErrorCode, message: str, request_id: object) -> None:
    metrics.ERRORS_SENT.labels(code=code).inc()
    conn.send_control(error(code, message, request_id), "error")


def _frame_writer(ws: WebSocket) -> FrameWriterProtocol | None:
    """The socket's raw frame writer, when the server provides one and frames may be raw."""
    writer = ws.scope.get("extensions", {}).get(FRAME_WRITER)
    if isinstance(writer, FrameWriterProtocol) and writer.raw_frames_allowed():
        return writer
    return None


async def _write(ws: WebSocket, conn: ClientConnection, raw: FrameWriterProtocol | None) -> None:
    slow_s = conn.settings.ws_slow_consumer_s
    while True:
        if not conn.wakeup.is_set():
            timeout = conn.seconds_until_more()
            if timeout is None:
                await conn.wakeup.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await conn.wakeup.wait()
        conn.wakeup.clear()
        if conn.gone:
            return
        frames = conn.next_frames()
        if frames:
            metrics.BUFFER_DEPTH.observe(_messages(frames, conn.batch))
            try:
                if raw is not None and raw.can_write_now():
                    # the socket takes it without waiting: no deadline to arm (a timer per
                    # flush was ~11 % of the CPU)
                    sent = _send_raw_now(raw, frames, conn.batch)
                else:
                    # one deadline per flush, not per frame: a client that cannot take a
                    # flush in time is a slow consumer
                    conn.sending = True  # no inline write may overtake these frames
                    try:
                        async with asyncio.timeout(slow_s):
                            sent = await _send_waiting(ws, raw, frames, conn.batch)
                    finally:
                        conn.sending = False
            except TimeoutError:
                metrics.SLOW_CONSUMERS.inc()
                throttle.emit(
                    log.warning, "slow_consumer", queued=len(conn.queue), timeout_s=slow_s
                )
                conn.request_close(CLOSE_SLOW_CONSUMER, "slow consumer")
            except (WebSocketDisconnect, ConnectionGone, RuntimeError, OSError):
                conn.peer_gone()
                return
            else:
                _count(frames, sent)
            conn.drained.set()
        if conn.close_code is not None:
            await _close(ws, conn)
            return


def _flush_inline(conn: ClientConnection, raw: FrameWriterProtocol) -> None:
    """The hub's write of ``conn``'s queue, right after a NATS read (plain, see
    ``Hub.schedule_inline``) or at its flush tick (batch), while the writer task is idle and
    the socket takes it without waiting; else the writer is woken to do it (it owns waiting,
    slow-consumer detection and the close)."""
    conn.inline_due = False
    if conn.sending or conn.close_code is not None or not raw.can_write_now():
        conn.wakeup.set()
        return
    frames = conn.next_frames()
    if not frames:
        return
    try:
        sent = _send_raw_now(raw, frames, conn.batch)
    except ConnectionGone:
        conn.wakeup.set()  # the writer finds the socket gone and ends the session
        return
    _count(frames, sent)
    metrics.FLUSHED.inline += _messages(frames, conn.batch)
    conn.drained.set()
    if conn.conflated:
        conn.wakeup.set()  # the writer releases them as tokens return


async def _send_waiting(
    ws: WebSocket, raw: FrameWriterProtocol | None, frames: list[tuple[Frame, str]], batch: bool
) -> int:
    if raw is not None:
        out, sent = _raw_frames(frames, batch)
        await raw.write_frames(out)
        return sent
    return await (_send_batch(ws, frames) if batch else _send(ws, frames))


async def _send(ws: WebSocket, frames: list[tuple[Frame, str]]) -> int:
    sent = 0
    for frame, _kind in frames:
        # a shared tick's text is decoded once for all its subscribers
        if isinstance(frame, bytes):
            text, size = frame.decode(), len(frame)
        else:
            text, size = frame.text, len(frame.data)
        await ws.send({"type": "websocket.send", "text": text})
        sent += size
    return sent


def _send_raw_now(writer: FrameWriterProtocol, frames: list[tuple[Frame, str]], batch: bool) -> int:
    out, sent = _raw_frames(frames, batch)
    writer.write_now(out)
    return sent


def _raw_frames(frames: list[tuple[Frame, str]], batch: bool) -> tuple[list[bytes], int]:
    """The flush as prebuilt frames for one socket write (a shared tick's or window's frame
    is built once for all its subscribers), and the payload bytes they carry."""
    out: list[bytes] = []
    sent = 0
    if batch:
        for payload in _batch_payloads(frames):
            if isinstance(payload, WindowBatch):
                out.append(payload.frame)
                sent += len(payload.data)
            else:
                out.append(text_frame(payload))
                sent += len(payload)
        return out, sent
    for frame, _kind in frames:
        if isinstance(frame, bytes):
            out.append(text_frame(frame))
            sent += len(frame)
        else:
            out.append(frame.frame)
            sent += len(frame.data)
    return out, sent


async def _send_batch(ws: WebSocket, frames: list[tuple[Frame, str]]) -> int:
    sent = 0
    for payload in _batch_payloads(frames):
        if isinstance(payload, WindowBatch):
            text, size = payload.text, len(payload.data)
        else:
            text, size = payload.decode(), len(payload)
        await ws.send({"type": "websocket.send", "text": text})
        sent += size
    return sent


def _batch_payloads(frames: list[tuple[Frame, str]]) -> list[WindowBatch | bytes]:
    """A batch flush as JSON arrays, in queue order: a window taken whole is sent as it was
    built for its group; whatever was queued around windows is joined into arrays."""
    out: list[WindowBatch | bytes] = []
    run: list[LiveTick | bytes] = []
    for frame, _kind in frames:
        if isinstance(frame, WindowBatch):
            if run:
                out.append(_batch_body(run))
                run = []
            out.append(frame)
            metrics.FLUSHED.batch_frames += 1
            metrics.BATCH_MESSAGES.observe(frame.count)
        else:
            run.append(frame)
    if run:
        out.append(_batch_body(run))
    return out


def _batch_body(frames: list[LiveTick | bytes]) -> bytes:
    # encode once: the array is the stored tick bytes joined, never re-serialized
    body = b"[%b]" % b",".join(f.data if isinstance(f, LiveTick) else f for f in frames)
    metrics.FLUSHED.batch_frames += 1
    metrics.BATCH_MESSAGES.observe(len(frames))
    return body


def _messages(frames: list[tuple[Frame, str]], batch: bool) -> int:
    """Messages in a flush: in a batch one, a window counts its ticks."""
    if not batch:
        return len(frames)
    return sum(f.count if isinstance(f, WindowBatch) else 1 for f, _ in frames)


def _count(frames: list[tuple[Frame, str]], sent_bytes: int) -> None:
    ticks = 0
    for frame, kind in frames:
        if kind == "tick":
            ticks += 1
        elif isinstance(frame, WindowBatch):
            ticks += frame.count
        else:
            metrics.MESSAGES_OUT.labels(type=kind).inc()
    counts = metrics.FLUSHED
    counts.ticks += ticks
    counts.bytes += sent_bytes


async def _close(ws: WebSocket, conn: ClientConnection) -> None:
    # uvicorn only writes the close frame once the socket drains below its high-water
    # mark: a slow consumer that catches up within the timeout still sees 4008
    with contextlib.suppress(TimeoutError, RuntimeError, OSError, WebSocketDisconnect):
        async with asyncio.timeout(_CLOSE_TIMEOUT_S):
            await ws.close(conn.close_code or 1000, conn.close_reason)
