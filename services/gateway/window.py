"""The window lane of ``?batch=true`` connections: each tick logged once, each frame built once.

Offering every tick to every batch subscriber and joining each connection's ticks at its
flush was most of batch mode's CPU, per client per tick, although clients with the same
subscriptions end up with the same bytes. Instead the hub logs each accepted tick once
(arrival order) for the products some batch connection watches. At each flush tick the
window's ticks are cut once per set of subscribed products into a JSON array (the stored
tick bytes joined, as the per-connection path builds it) and its WebSocket frame, and that
frame is queued whole for every connection that would have queued each of those ticks
unchanged (:meth:`ClientConnection.take_window`). The others get the same ticks one by one
through :meth:`ClientConnection.offer_tick`, which keeps rate limiting with conflation,
the backfill hand-over and per-product de-duplication exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from services.gateway.frames import text_frame
from services.gateway.ticks import LiveTick

if TYPE_CHECKING:
    from services.gateway.connection import ClientConnection

Entry = tuple[str, LiveTick]  # (product, tick) in arrival order


class WindowBatch:
    """One window's ticks of some products: the JSON array, its frame, and per product the
    first and last seq (what a connection must not have sent yet, and has sent after)."""

    __slots__ = ("_text", "count", "data", "first", "frame", "last", "ticks")

    def __init__(self, ticks: list[Entry]) -> None:
        self.ticks = ticks
        self.count = len(ticks)
        # like a LiveTick: the payload, its frame and (on demand) its text
        self.data = b"[%b]" % b",".join(live.data for _, live in ticks)
        self.frame = text_frame(self.data)
        self.first: dict[str, int] = {}
        self.last: dict[str, int] = {}
        first, last = self.first, self.last
        for product, live in ticks:
            if product not in first:
                first[product] = live.seq
            last[product] = live.seq
        self._text: str | None = None

    @property
    def text(self) -> str:
        """The payload as text, for the ASGI send path (permessage-deflate)."""
        if self._text is None:
            self._text = self.data.decode()
        return self._text


class WindowLane:
    """Batch connections grouped by subscription set, and the ticks of the open window."""

    def __init__(self) -> None:
        self.log: list[Entry] = []
        self.groups: dict[frozenset[str], set[ClientConnection]] = {}
        self.watched: dict[str, int] = {}  # product → batch connections subscribed to it
        self._keys: dict[ClientConnection, frozenset[str]] = {}

    def regroup(self, conn: ClientConnection) -> None:
        """File ``conn`` under its current subscription set (call after it changed)."""
        old = self._keys.pop(conn, None)
        if old is not None:
            group = self.groups[old]
            group.discard(conn)
            if not group:
                del self.groups[old]
            for product in old:
                left = self.watched[product] - 1
                if left:
                    self.watched[product] = left
                else:
                    del self.watched[product]
        if conn.products:
            key = frozenset(conn.products)
            self._keys[conn] = key
            self.groups.setdefault(key, set()).add(conn)
            for product in key:
                self.watched[product] = self.watched.get(product, 0) + 1

    def pending(self, products: set[str]) -> list[Entry]:
        """The open window's ticks of ``products``, in arrival order."""
        return [entry for entry in self.log if entry[0] in products]

    def flush(self, now: float, latest: Mapping[str, LiveTick]) -> None:
        """Hand the window's ticks to every batch connection and open the next window.

        ``latest`` is the hub's newest tick per product (see ``take_window``)."""
        log, self.log = self.log, []
        if not log:
            return
        in_window = {product for product, _ in log}
        built: dict[frozenset[str], WindowBatch] = {}
        for key, conns in self.groups.items():
            present = key & in_window
            if not present:
                continue
            # groups whose products ticked alike this window share one frame
            batch = built.get(present)
            if batch is None:
                batch = built[present] = WindowBatch([e for e in log if e[0] in present])
            for conn in conns:
                if conn.close_code is not None:
                    continue  # its writer already took its last flush
                if not conn.take_window(batch, now, latest):
                    for product, live in batch.ticks:
                        conn.offer_tick(product, live, 0, now)
