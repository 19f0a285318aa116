"""Frames → MD_RAW through a bounded buffer, pipelined, retried until acked.

The feed reader never waits on NATS: it appends to :class:`OutboundBuffer`. When NATS is
away the buffer fills; past ``INGEST_BUFFER_MAX`` the oldest frame is dropped (loudly)
and its product is marked for a REST resync once NATS is back. The publisher sends the
buffer's head as one pipelined window and retries the *same* window (same
``Nats-Msg-Id``, so JetStream stores each frame once) until every frame is acked:
per-product order is kept and nothing is acked out of turn.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.aio import Signal
from services.common.broker import PendingPublish, Publisher
from services.common.logging import get_logger
from services.ingestor import metrics

log = get_logger(__name__)

# Frames that carry a product's state: losing one leaves the product stale downstream.
_STATE_TYPES = frozenset({"ticker", "resync"})


@dataclass(slots=True)
class Outgoing:
    stream: str
    subject: str
    payload: bytes
    msg_id: str | None
    headers: dict[str, str]
    product: str
    type: str


@dataclass
class OutboundBuffer:
    """FIFO of frames not yet acked by JetStream, bounded by dropping the oldest."""

    maxlen: int
    _items: deque[Outgoing] = field(default_factory=deque)
    _ready: Signal = field(default_factory=Signal)
    dropped_products: set[str] = field(default_factory=set)
    _last_drop_log: float = 0.0
    _drops_since_log: int = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Outgoing) -> None:
        if len(self._items) >= self.maxlen:
            oldest = self._items.popleft()
            if oldest.type in _STATE_TYPES:  # a lost heartbeat or dead letter needs no resync
                self.dropped_products.add(oldest.product)
            metrics.FRAMES_DROPPED.labels(product=oldest.product).inc()
            self._drops_since_log += 1
            now = time.monotonic()
            if now - self._last_drop_log >= 1.0:  # loud, but one line a second, not per frame
                log.error(
                    "buffer_full_dropping_oldest",
                    dropped=self._drops_since_log,
                    buffer_max=self.maxlen,
                    products=sorted(self.dropped_products),
                )
                self._last_drop_log = now
                self._drops_since_log = 0
        self._items.append(item)
        self._ready.set()

    def take_dropped(self) -> set[str]:
        """Products that lost ticks to the full buffer since the last call."""
        dropped, self.dropped_products = self.dropped_products, set()
        return dropped

    def peek(self, n: int) -> list[Outgoing]:
        return [self._items[i] for i in range(min(n, len(self._items)))]

    def pop(self, n: int) -> None:
        for _ in range(min(n, len(self._items))):
            self._items.popleft()
        if not self._items:
            self._ready.clear()

    def wake(self) -> None:
        """Make a pending :meth:`wait` return (``stop`` was set)."""
        self._ready.set()

    async def wait(self, stop: asyncio.Event) -> None:
        """Return when there is something to send, or ``stop`` is set (the caller arranges
        :meth:`wake` on stop: two tasks per wait, as ``wait_any`` makes, cost more than a
        low-rate frame's whole publish)."""
        if self._items or stop.is_set():
            return
        await self._ready.wait()


async def publish_loop(
    publisher: Publisher,
    buffer: OutboundBuffer,
    *,
    batch_max: int,
    stop: asyncio.Event,
    drain_timeout_s: float,
    on_drops_recovered: Callable[[set[str]], None] | None = None,
) -> None:
    """Publish the buffer until ``stop``; then drain what is left within the timeout.

    ``on_drops_recovered`` gets the products whose ticks the full buffer dropped, once a
    window is acked again (NATS is back): their state downstream needs a resync.
    """
    stop_watch = asyncio.ensure_future(stop.wait())
    stop_watch.add_done_callback(lambda _: buffer.wake())
    try:
        await _publish_until_stopped(
            publisher, buffer, batch_max, stop, drain_timeout_s, on_drops_recovered
        )
    finally:
        stop_watch.cancel()


async def _publish_until_stopped(
    publisher: Publisher,
    buffer: OutboundBuffer,
    batch_max: int,
    stop: asyncio.Event,
    drain_timeout_s: float,
    on_drops_recovered: Callable[[set[str]], None] | None,
) -> None:
    backoff = 0.1
    deadline: float | None = None
    while True:
        if stop.is_set():
            if deadline is None:
                deadline = time.monotonic() + drain_timeout_s
                log.info("draining_buffer", frames=len(buffer))
            if not buffer or time.monotonic() >= deadline:
                if buffer:
                    # logged, not counted: the process exits before another scrape. The
                    # next ingestor's first heartbeat per product shows the gap and resyncs
                    unpublished = Counter(item.product for item in buffer.peek(len(buffer)))
                    log.error(
                        "drain_timeout_frames_unpublished",
                        frames=len(buffer),
                        products=dict(sorted(unpublished.items())),
                    )
                return
        await buffer.wait(stop)
        window = buffer.peek(batch_max)
        if not window:
            continue
        try:
            pending: list[PendingPublish] = []
            for item in window:
                pending.append(
                    await publisher.publish(
                        item.stream,
                        item.subject,
                        item.payload,
                        msg_id=item.msg_id,
                        headers=item.headers,
                    )
                )
            await publisher.wait(pending)
        except Exception as exc:  # noqa: BLE001 - nats-py raises assorted errors while reconnecting; all mean "retry the window"
            log.warning("publish_retry", frames=len(window), error=repr(exc), backoff_s=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            continue
        backoff = 0.1
        # one counter update per (product, type) per window: a label lookup per frame
        # was ~5 % of the ingestor's CPU
        for (product, kind), count in Counter((item.product, item.type) for item in window).items():
            metrics.FRAMES_PUBLISHED.labels(product=product, type=kind).inc(count)
        buffer.pop(len(window))
        if buffer.dropped_products and on_drops_recovered is not None and not stop.is_set():
            dropped = buffer.take_dropped()
            log.warning("buffer_drops_recovered", products=sorted(dropped))
            on_drops_recovered(dropped)
