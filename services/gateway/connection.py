"""One client: subscriptions, per-product order, outbound rate limit and its writer.

Ticks are offered synchronously by the hub (no await on the fan-out path). Each
connection keeps per-product ``seq`` strictly increasing; when its token bucket is empty
or its send buffer is full, it keeps only the newest tick per product and sends it with
``skipped`` = how many older ticks it replaced. A client that cannot drain its buffer for
``WS_SLOW_CONSUMER_S`` is closed with 4008.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

import msgspec

from services.common.laststate import StoredTick
from services.common.logging import get_logger
from services.common.models import encode_tick
from services.gateway import metrics
from services.gateway.ratelimit import TokenBucket
from services.gateway.settings import GatewaySettings

log = get_logger(__name__)

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN = 1013
CLOSE_SLOW_CONSUMER = 4008
CLOSE_UNAUTHORIZED = 4401


@dataclass(slots=True)
class _Conflated:
    stored: StoredTick
    skipped: int


class SlowConsumerError(Exception):
    """The client did not drain its buffer in time."""


class ClientConnection:
    def __init__(self, conn_id: str, settings: GatewaySettings) -> None:
        self.conn_id = conn_id
        self.settings = settings
        self.products: set[str] = set()
        self.last_seq: dict[str, int] = {}
        self.bucket = TokenBucket(settings.ws_max_msgs_per_sec, settings.ws_burst)
        self.queue: deque[tuple[bytes, str]] = deque()
        self.conflated: dict[str, _Conflated] = {}
        self.wakeup = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason = ""

    # -- called by the hub / command handler (synchronous) ---------------------------------

    def send_control(self, frame: bytes, kind: str) -> None:
        """Protocol messages bypass the tick rate limit (one token per tick only)."""
        self.queue.append((frame, kind))
        self.wakeup.set()

    def offer_tick(self, product: str, stored: StoredTick) -> None:
        seq = stored.tick.seq
        if seq <= self.last_seq.get(product, -1):
            return  # already sent (snapshot/backfill handover) or older
        self.last_seq[product] = seq
        pending = self.conflated.get(product)
        if pending is not None:
            # an older tick of this product is waiting: the newest replaces it
            metrics.CONFLATED.inc()
            self.conflated[product] = _Conflated(stored, pending.skipped + 1)
        elif len(self.queue) < self.settings.ws_send_queue and self.bucket.take():
            self.queue.append((stored.data, "tick"))
        else:
            self.conflated[product] = _Conflated(stored, 0)
        self.wakeup.set()

    def mark_sent_snapshot(self, product: str, stored: StoredTick | None) -> None:
        if stored is not None:
            self.last_seq[product] = max(self.last_seq.get(product, -1), stored.tick.seq)

    def request_close(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            self.wakeup.set()

    # -- the writer -----------------------------------------------------------------------

    def next_frames(self) -> list[tuple[bytes, str]]:
        """Frames ready to send now: the queue, then conflated ticks as tokens allow."""
        frames = list(self.queue)
        self.queue.clear()
        if self.conflated:
            for product in list(self.conflated):
                if not self.bucket.take():
                    break
                pending = self.conflated.pop(product)
                frames.append((_with_skipped(pending), "tick"))
        return frames

    def seconds_until_more(self) -> float | None:
        if not self.conflated:
            return None
        return max(self.bucket.seconds_until_token(), 0.001)


def _with_skipped(pending: _Conflated) -> bytes:
    if pending.skipped == 0:
        return pending.stored.data
    tick = msgspec.structs.replace(pending.stored.tick, skipped=pending.skipped)
    return encode_tick(tick)
