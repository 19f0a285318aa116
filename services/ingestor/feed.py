"""The Coinbase Exchange WebSocket session: subscribe, read, watch, reconnect.

One session at a time; any failure (network, close, stall) ends it and the next starts
after a jittered exponential backoff, with the subscription sent again (a reconnect that
does not resubscribe receives nothing: coinbase-protocol.md §4.5).
"""

from __future__ import annotations

import asyncio
import random
import time
import zlib
from collections.abc import Callable

import orjson
import websockets
from prometheus_client import Counter
from structlog.contextvars import bound_contextvars
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from services.common.logging import get_logger
from services.common.logthrottle import throttle
from services.common.subjects import (
    DLQ_STREAM,
    HDR_DLQ_ERROR,
    HDR_DLQ_REASON,
    HDR_RECV_NS,
    RAW_STREAM,
    dlq_subject,
    raw_subject,
)
from services.ingestor import metrics
from services.ingestor.errors import FeedClosedError, FeedStalledError
from services.ingestor.frames import RawFrame, UnparseableFrameError, parse_frame
from services.ingestor.publish import OutboundBuffer, Outgoing
from services.ingestor.record import Recorder
from services.ingestor.resync import Resyncer
from services.ingestor.sequences import Gap, SequenceTracker
from services.ingestor.settings import IngestorSettings
from services.ingestor.staleness import StalenessWatch

log = get_logger(__name__)

# Messages that are about the connection, not a product.
_CONTROL_TYPES = frozenset({"subscriptions", "error", "status"})
OVERSIZED_KEPT_BYTES = 4096  # of a frame too big to publish, dead-lettered with its size
# below NATS's max_payload, so that the normalizer's dead letter of any raw frame (the
# same bytes plus its reason and error headers) fits too
PUBLISH_HEADROOM_BYTES = 8192
# Per-product message types of the Exchange feed's channels (ticker, heartbeat, matches,
# level2, full); any other counts as "other" in metrics (a bounded label set)
_FRAME_TYPES = frozenset({
    "ticker", "heartbeat", "match", "last_match", "snapshot", "l2update", "received", "open",
    "done", "change", "activate",
})  # fmt: skip


def subscribe_message(settings: IngestorSettings) -> bytes:
    channels: list[object] = [
        {"name": channel, "product_ids": settings.coinbase_products}
        if channel != "status"
        else {"name": "status"}
        for channel in settings.coinbase_channels
    ]
    return orjson.dumps(
        {"type": "subscribe", "product_ids": settings.coinbase_products, "channels": channels}
    )


class FeedSession:
    """Reads connections into the outbound buffer, checking each product's sequences.

    Outlives a connection: sequence state carries over reconnects, so the first heartbeat
    after one tells whether ticks were missed while away.
    """

    def __init__(
        self,
        settings: IngestorSettings,
        buffer: OutboundBuffer,
        recorder: Recorder | None,
        *,
        tracker: SequenceTracker | None = None,
        resyncer: Resyncer | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
        max_publish_bytes: int | None = None,
    ) -> None:
        self.settings = settings
        self.buffer = buffer
        self.recorder = recorder
        self.tracker = tracker if tracker is not None else SequenceTracker()
        self.resyncer = resyncer
        self.clock_ns = clock_ns
        self.last_seen = metrics.LAST_MESSAGE.last_seen
        self.subscribed = frozenset(settings.coinbase_products)
        # a frame NATS cannot carry would be retried for ever, holding up every frame after it
        self.max_publish_bytes = max_publish_bytes or settings.feed_max_frame_bytes
        self._reported_errors: set[str] = set()
        self._ws: ClientConnection | None = None
        # metric children per label set: .labels() per frame was ~10 % of the ingestor's CPU
        self._received: dict[tuple[str, str], Counter] = {}
        # Without heartbeats a quiet product is silent by nature: nothing to watch then.
        self.staleness = (
            StalenessWatch(settings.coinbase_products, settings.watchdog_timeout_s)
            if "heartbeat" in settings.coinbase_channels
            else None
        )

    def begin(self) -> None:
        """A connection was opened and the subscription sent."""
        self.tracker.new_session()
        if self.staleness is not None:
            self.staleness.start_session(time.monotonic())
            metrics.PRODUCTS_STALE.set(0)

    async def watch_products(self) -> None:
        """Run the per-product watchdog for the current connection (cancelled with it)."""
        if self.staleness is None:
            return
        period = min(1.0, self.settings.watchdog_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            try:
                self.check_stale(time.monotonic())
            except Exception:  # a watchdog bug must not end the session
                log.exception("product_watchdog_failed")

    def check_stale(self, now: float) -> None:
        assert self.staleness is not None
        for product in self.staleness.check(now):
            with bound_contextvars(product=product):
                log.warning("product_stale", timeout_s=self.settings.watchdog_timeout_s)
                if self.resyncer is not None:
                    self.resyncer.request(product, "stale")
        metrics.PRODUCTS_STALE.set(len(self.staleness.stale))

    def read_ahead(self) -> int:
        """Frames websockets has read and queued for :meth:`read` (0 between connections)."""
        ws = self._ws
        return len(ws.recv_messages.frames) if ws is not None else 0

    async def read(self, ws: ClientConnection) -> None:
        """Read frames until the connection ends; raise why it ended."""
        self._ws = ws
        try:
            await self._read(ws)
        finally:
            self._ws = None

    async def _read(self, ws: ClientConnection) -> None:
        timeout = self.settings.watchdog_timeout_s
        push_every = min(1.0, timeout / 4)
        loop = asyncio.get_running_loop()
        try:
            # one watchdog deadline for the connection, pushed back at most every second
            # (a timer per receive was ~8 % of the CPU): silence ends the connection after
            # between 3/4 of ``timeout`` (or ``timeout`` - 1 s) and ``timeout``
            async with asyncio.timeout(timeout) as deadline:
                push_at = loop.time() + push_every
                while True:
                    data = await ws.recv(decode=False)
                    now = loop.time()
                    if now >= push_at:
                        deadline.reschedule(now + timeout)
                        push_at = now + push_every
                    self.on_frame(data, self.clock_ns())
        except TimeoutError:
            raise FeedStalledError(timeout) from None
        except ConnectionClosed as exc:
            raise _closed(exc) from exc

    def on_frame(self, data: bytes, recv_ns: int) -> None:
        if self.recorder is not None:
            self.recorder.write(recv_ns, data)
        if len(data) > self.max_publish_bytes:
            self._dead_letter(
                data[:OVERSIZED_KEPT_BYTES],
                recv_ns,
                "oversized",
                f"{len(data)} bytes, over the {self.max_publish_bytes} a NATS message carries "
                f"here; the first {OVERSIZED_KEPT_BYTES} kept",
            )
            return
        try:
            frame = parse_frame(data, recv_ns)
        except UnparseableFrameError as exc:
            self._dead_letter(data, recv_ns, "unparseable", str(exc))
            return
        if frame.type in _CONTROL_TYPES:
            metrics.CONTROL_FRAMES.labels(type=frame.type).inc()
            if self.staleness is not None:
                self.staleness.seen_other(time.monotonic())
            self._on_control(frame)
            return
        if frame.product is None:
            self._dead_letter(data, recv_ns, "unparseable", "frame has no product_id")
            return
        product = frame.product
        if product not in self.subscribed:
            # Coinbase sends only what was subscribed; anything else is not ours to publish
            # (a product id with a space or a dot is not even a valid subject) and must not
            # become a metric series or per-product state
            self._dead_letter(
                data, recv_ns, "unexpected_product", f"product_id {product[:80]!r} not subscribed"
            )
            return
        # a label value: the feed's own type only when it is one Coinbase documents
        frame_type = frame.type if frame.type in _FRAME_TYPES else "other"
        received = self._received.get((product, frame_type))
        if received is None:
            received = self._received[(product, frame_type)] = metrics.FRAMES_RECEIVED.labels(
                product=product, type=frame_type
            )
        received.inc()
        self.last_seen[product] = recv_ns / 1e9  # exported at scrape (metrics.LAST_MESSAGE)
        if self.staleness is not None and self.staleness.seen(product, time.monotonic()):
            log.info("product_recovered", product=product)
            metrics.PRODUCTS_STALE.set(len(self.staleness.stale))
        if frame.sequence is not None:
            if frame.type == "ticker":
                kind = self.tracker.on_ticker(product, frame.sequence, frame.trade_id)
                if kind is not None:
                    metrics.REGRESSIONS.labels(product=product, kind=kind).inc()
                    log.debug("sequence_regression", product=product, kind=kind)
            elif frame.type == "heartbeat":
                gap = self.tracker.on_heartbeat(product, frame.sequence, frame.trade_id)
                if gap is not None:
                    self._on_gap(gap)
        self.buffer.put(
            Outgoing(
                stream=RAW_STREAM,
                subject=raw_subject(frame.product),
                payload=data,
                msg_id=frame.msg_id,
                headers={HDR_RECV_NS: str(recv_ns)},
                product=frame.product,
                type=frame_type,
            )
        )

    def _on_gap(self, gap: Gap) -> None:
        metrics.GAPS.labels(product=gap.product).inc()
        log.warning(
            "gap_detected",
            product=gap.product,
            reason=gap.reason,
            sequence=gap.sequence,
            last_trade_id=gap.trade_id,
            known_trade_id=gap.known_trade_id,
        )
        if self.resyncer is not None:
            self.resyncer.request(
                gap.product, gap.reason, sequence=gap.sequence, trade_id=gap.trade_id
            )

    def _on_control(self, frame: RawFrame) -> None:
        message = orjson.loads(frame.data)
        if frame.type == "subscriptions":
            log.info("subscribed", channels=message.get("channels"))
            metrics.CONNECTED.set(1)
        elif frame.type == "error":
            reason = str(message.get("reason") or message.get("message") or "unknown")
            metrics.FEED_ERRORS.labels(reason=_metric_reason(reason)).inc()
            if reason not in self._reported_errors:  # once per reason, then only counted
                self._reported_errors.add(reason)
                log.error("feed_error", message=message.get("message"), reason=reason)

    def _dead_letter(self, data: bytes, recv_ns: int, reason: str, error: str) -> None:
        if self.staleness is not None:
            self.staleness.seen_other(time.monotonic())
        metrics.DEAD_LETTERS.labels(reason=reason).inc()
        throttle.emit(
            log.warning, "frame_dead_lettered", reason=reason, error=error, size=len(data)
        )
        self.buffer.put(
            Outgoing(
                stream=DLQ_STREAM,
                subject=dlq_subject(reason),
                payload=data,
                # idempotent when the publisher retries a window that was in fact stored
                msg_id=f"dlq:ingestor:{recv_ns}:{zlib.crc32(data)}",
                headers={
                    HDR_DLQ_REASON: reason,
                    HDR_DLQ_ERROR: error[:512],
                    HDR_RECV_NS: str(recv_ns),
                },
                product="-",
                type="dead_letter",
            )
        )


def _closed(exc: ConnectionClosed) -> FeedClosedError:
    rcvd = exc.rcvd
    return FeedClosedError(rcvd.code if rcvd else None, rcvd.reason if rcvd else "")


def _metric_reason(reason: str) -> str:
    """Bounded label values: product names in reasons would explode the series count."""
    if "is not a valid product" in reason:
        return "invalid_product"
    if "require authentication" in reason:
        return "auth_required"
    if "at least one product" in reason:
        return "missing_product"
    return "other"


async def run_feed(
    settings: IngestorSettings,
    session: FeedSession,
    stop: asyncio.Event,
) -> None:
    """Keep a subscribed session open until ``stop``, reconnecting with jittered backoff."""
    delay = settings.reconnect_initial_s
    subscribe = subscribe_message(settings)
    while not stop.is_set():
        started = time.monotonic()
        reason = "error"
        try:
            async with websockets.connect(
                settings.coinbase_ws_url,
                max_size=settings.feed_max_frame_bytes,
                open_timeout=10,
                close_timeout=2,
                ping_interval=20,
                ping_timeout=20,
                max_queue=settings.feed_max_queue,
            ) as ws:
                # Coinbase drops a connection that has not subscribed within 5 s.
                try:
                    await ws.send(subscribe)
                except ConnectionClosed as exc:  # closed as soon as it opened
                    raise _closed(exc) from exc
                session.begin()
                log.info("feed_connected", url=settings.coinbase_ws_url)
                helpers = [
                    asyncio.create_task(_close_on_stop(ws, stop)),
                    asyncio.create_task(session.watch_products()),
                ]
                try:
                    await session.read(ws)
                finally:
                    for task in helpers:
                        task.cancel()
        except FeedStalledError as exc:
            reason = "stall"
            log.warning("feed_stalled", silent_s=exc.silent_s)
        except FeedClosedError as exc:
            reason = "closed"
            if not stop.is_set():
                log.warning("feed_closed", code=exc.code, reason=exc.reason)
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            reason = "connect"
            log.warning("feed_connect_failed", url=settings.coinbase_ws_url, error=repr(exc))
        finally:
            metrics.CONNECTED.set(0)
        if stop.is_set():
            return
        metrics.RECONNECTS.labels(reason=reason).inc()
        if time.monotonic() - started > 60:  # a session that lived is not a failure streak
            delay = settings.reconnect_initial_s
        sleep_s = delay * (0.5 + random.random())  # full jitter around the step
        log.info("feed_reconnecting", in_s=round(sleep_s, 3), reason=reason)
        try:
            async with asyncio.timeout(sleep_s):
                await stop.wait()
        except TimeoutError:
            pass
        delay = min(delay * 2, settings.reconnect_max_s)


async def _close_on_stop(ws: ClientConnection, stop: asyncio.Event) -> None:
    await stop.wait()
    await ws.close(1000, "shutting down")
