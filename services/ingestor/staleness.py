"""Per-product watchdog: a subscribed product silent while the others flow.

Coinbase sends a heartbeat per product every second, so with the heartbeat channel a
product that sends nothing (no ticker, no heartbeat) for ``WATCHDOG_TIMEOUT_S`` while
other products' frames keep arriving has a problem of its own, which the whole-connection
watchdog cannot see. A silence of *every* product is the connection's (a stall): that
watchdog reconnects, so it is not reported here. One report per episode; an episode ends
with the product's next frame.
"""

from __future__ import annotations


class StalenessWatch:
    """Pure bookkeeping on a monotonic clock; the feed session drives it."""

    def __init__(self, products: list[str], timeout_s: float) -> None:
        self.products = list(products)
        self.timeout_s = timeout_s
        self.stale: set[str] = set()
        self._last_seen: dict[str, float] = {}
        self._last_any = 0.0
        self._session_start = 0.0

    def start_session(self, now: float) -> None:
        """A new connection: every product gets a full timeout from now, no episode open."""
        self._session_start = now
        self._last_any = now
        self.stale.clear()

    def seen(self, product: str, now: float) -> bool:
        """A frame of ``product`` arrived; True when that ends a stale episode."""
        self._last_seen[product] = now
        self._last_any = now
        if product in self.stale:
            self.stale.discard(product)
            return True
        return False

    def seen_other(self, now: float) -> None:
        """A frame that is not about a product (subscriptions, status...)."""
        self._last_any = now

    def check(self, now: float) -> list[str]:
        """Products that just became stale."""
        if now - self._last_any >= self.timeout_s:
            return []  # nothing flows at all: the connection watchdog's case
        newly = []
        for product in self.products:
            if product in self.stale:
                continue
            since = max(self._last_seen.get(product, 0.0), self._session_start)
            if now - since >= self.timeout_s:
                self.stale.add(product)
                newly.append(product)
        return newly
