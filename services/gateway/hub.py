"""The in-process router: one NATS subscription on MD_TICKS → every subscribed client.

Each tick arrives as the canonical JSON bytes stored by the normalizer; those bytes are
what clients receive (encoded once, for everyone). The hub also keeps the latest tick
per product for snapshots and the REST API.
"""

from __future__ import annotations

import time
from collections import defaultdict

import msgspec
from nats.aio.msg import Msg

from services.common.laststate import StoredTick
from services.common.logging import get_logger
from services.common.models import decode_tick
from services.gateway import metrics
from services.gateway.connection import ClientConnection

log = get_logger(__name__)


class Hub:
    def __init__(self, configured_products: list[str]) -> None:
        self.configured = set(configured_products)
        self.latest: dict[str, StoredTick] = {}
        self.last_update: dict[str, float] = {}
        self.subscribers: defaultdict[str, set[ClientConnection]] = defaultdict(set)
        self.connections: set[ClientConnection] = set()

    def serves(self, product: str) -> bool:
        return product in self.configured or product in self.latest

    def warm(self, stored: dict[str, StoredTick]) -> None:
        for product, item in stored.items():
            self._remember(product, item)
        log.info("cache_warmed", products=len(stored))

    def _remember(self, product: str, item: StoredTick) -> bool:
        current = self.latest.get(product)
        if current is not None and current.tick.seq >= item.tick.seq:
            return False
        self.latest[product] = item
        self.last_update[product] = time.time()
        return True

    async def on_tick(self, msg: Msg) -> None:
        """NATS callback for ``md.ticks.>``; synchronous fan-out, no await per client."""
        try:
            tick = decode_tick(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("bad_tick_on_stream", subject=msg.subject, error=str(exc))
            return
        metrics.TICKS_IN.inc()
        item = StoredTick(tick, msg.data, 0)
        if not self._remember(tick.product, item):
            return
        metrics.E2E_LATENCY.observe(max(0.0, (time.time_ns() - tick.recv_ns) / 1e9))
        for conn in self.subscribers.get(tick.product, ()):
            conn.offer_tick(tick.product, item)

    def subscribe(self, conn: ClientConnection, product: str) -> StoredTick | None:
        """Register ``conn`` for live ticks and return the snapshot it starts from."""
        if product not in conn.products:
            conn.products.add(product)
            self.subscribers[product].add(conn)
            metrics.SUBSCRIPTIONS.inc()
        snapshot = self.latest.get(product)
        conn.mark_sent_snapshot(product, snapshot)
        return snapshot

    def unsubscribe(self, conn: ClientConnection, product: str) -> None:
        if product in conn.products:
            conn.products.discard(product)
            self.subscribers[product].discard(conn)
            conn.conflated.pop(product, None)
            conn.last_seq.pop(product, None)
            metrics.SUBSCRIPTIONS.dec()

    def add(self, conn: ClientConnection) -> None:
        self.connections.add(conn)
        metrics.CONNECTIONS.set(len(self.connections))

    def remove(self, conn: ClientConnection) -> None:
        for product in list(conn.products):
            self.unsubscribe(conn, product)
        self.connections.discard(conn)
        metrics.CONNECTIONS.set(len(self.connections))
