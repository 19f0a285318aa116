"""The in-process router: one NATS subscription on MD_TICKS → every subscribed client.

Each tick arrives as the canonical JSON bytes stored by the normalizer; those bytes are
what clients receive (encoded once, for everyone, and decoded to text once). The hub also
keeps the latest tick per product for snapshots and the REST API, and runs the shared
flush clock of ``?batch=true`` connections, which get their ticks through the window lane
(``window.py``) rather than one offer per tick.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import msgspec

from services.common.laststate import StoredTick
from services.common.logging import get_logger
from services.common.logthrottle import throttle
from services.common.models import decode_tick
from services.gateway import metrics
from services.gateway.connection import ClientConnection
from services.gateway.ticks import LiveTick
from services.gateway.window import WindowLane

log = get_logger(__name__)


class Hub:
    def __init__(self, configured_products: list[str]) -> None:
        self.configured = set(configured_products)
        self.latest: dict[str, LiveTick] = {}
        self.last_update: dict[str, float] = {}
        # plain connections; batch ones are in the window lane's groups
        self.subscribers: defaultdict[str, set[ClientConnection]] = defaultdict(set)
        self.window = WindowLane()
        self.connections: set[ClientConnection] = set()
        # batch connections with output waiting for the next flush tick
        self.dirty: set[ClientConnection] = set()
        # plain connections with ticks to write once the current NATS read is handled
        self._inline: list[ClientConnection] = []
        self.idle = asyncio.Event()  # set while no connection is open
        self.idle.set()

    def serves(self, product: str) -> bool:
        return product in self.configured or product in self.latest

    def warm(self, stored: dict[str, StoredTick]) -> None:
        for product, item in stored.items():
            self._remember(product, LiveTick.from_stored(item))
        log.info("cache_warmed", products=len(stored))

    def _remember(self, product: str, item: LiveTick) -> bool:
        current = self.latest.get(product)
        if current is not None and current.seq >= item.seq:
            return False
        self.latest[product] = item
        self.last_update[product] = time.time()
        return True

    def on_stored_tick(self, data: bytes, subject: bytes) -> None:
        """The live tail's handler (in the NATS read loop): synchronous fan-out."""
        try:
            tick = decode_tick(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            metrics.BAD_TICKS.labels(path="live").inc()
            throttle.emit(log.error, "bad_tick_on_stream", subject=subject.decode(), error=str(exc))
            return
        metrics.TICKS_IN.inc()
        self.fan_out(LiveTick(tick, data))

    def fan_out(self, item: LiveTick) -> None:
        """A tick newer than the latest of its product to its plain subscribers, and into
        the open window for the batch ones."""
        product = item.tick.product
        if not self._remember(product, item):
            return
        metrics.E2E_LATENCY.observe(max(0.0, (time.time_ns() - item.tick.recv_ns) / 1e9))
        now = time.monotonic()  # one clock reading for every subscriber's token bucket
        for conn in self.subscribers.get(product, ()):
            conn.offer_tick(product, item, 0, now)
        if product in self.window.watched:
            self.window.log.append((product, item))

    def subscribe(self, conn: ClientConnection, product: str) -> LiveTick | None:
        """Register ``conn`` for live ticks of ``product``; returns the latest tick now.

        Synchronous on purpose: nothing can arrive between the registration and the
        returned tick, so the caller's snapshot → live hand-over has no gap.
        """
        if product not in conn.products:
            conn.products.add(product)
            if conn.batch:
                self.window.regroup(conn)
            else:
                self.subscribers[product].add(conn)
            metrics.SUBSCRIPTIONS.inc()
        return self.latest.get(product)

    def unsubscribe(self, conn: ClientConnection, product: str) -> None:
        if product in conn.products:
            conn.products.discard(product)
            if conn.batch:
                self.window.regroup(conn)
            else:
                self.subscribers[product].discard(conn)
            conn.forget(product)
            metrics.SUBSCRIPTIONS.dec()

    def add(self, conn: ClientConnection) -> None:
        self.connections.add(conn)
        self.idle.clear()
        metrics.CONNECTIONS.set(len(self.connections))

    def remove(self, conn: ClientConnection) -> None:
        for product in list(conn.products):
            self.unsubscribe(conn, product)
        self.connections.discard(conn)
        self.dirty.discard(conn)
        if not self.connections:
            self.idle.set()
        metrics.CONNECTIONS.set(len(self.connections))

    def schedule_inline(self, conn: ClientConnection) -> None:
        """Write ``conn``'s queued ticks once the running callback (the NATS read loop's
        dispatch of one socket read) is done: every tick of that read in one write, and no
        writer task woken per tick per client."""
        if not self._inline:
            asyncio.get_running_loop().call_soon(self._flush_inline)
        self._inline.append(conn)

    def _flush_inline(self) -> None:
        due, self._inline = self._inline, []
        for conn in due:
            if conn.inline_flush is not None:
                conn.inline_flush()
            else:
                conn.inline_due = False
                conn.wakeup.set()

    def mark_dirty(self, conn: ClientConnection) -> None:
        self.dirty.add(conn)

    def catch_up(self, conn: ClientConnection) -> None:
        """Offer ``conn`` the open window's ticks now (it closes before the next flush)."""
        if conn.products:
            now = time.monotonic()
            for product, live in self.window.pending(conn.products):
                conn.offer_tick(product, live, 0, now)

    def flush(self) -> None:
        """The window to the batch connections, then write what each has waiting: at once
        where the socket takes it (no writer task woken per connection per flush: ~30 % of
        batch mode's CPU at 2k ticks/s to 100 clients), else through its writer task."""
        if self.window.log:
            self.window.flush(time.monotonic(), self.latest)
        if self.dirty:
            dirty, self.dirty = self.dirty, set()
            for conn in dirty:
                conn.scheduled = False
                if conn.inline_flush is not None:
                    conn.inline_flush()
                else:
                    conn.wakeup.set()

    async def run_flusher(self, interval_s: float, stop: asyncio.Event) -> None:
        """Every ``interval_s``, :meth:`flush`: the open window's ticks to the batch
        connections, and their writers woken.

        One clock for all of them: a timer per connection per flush would cost a heap
        operation each, and aligned flushes wake many writers in one loop pass. A fixed
        cadence, not a sleep after each flush: the flush's own time would otherwise add
        to every window (a tick's wait in the window is most of batch mode's latency).
        """
        loop = asyncio.get_running_loop()
        next_at = loop.time() + interval_s
        while not stop.is_set():
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            self.flush()
            # after a stall, start again from now rather than flushing in a burst
            next_at = max(next_at + interval_s, loop.time())
