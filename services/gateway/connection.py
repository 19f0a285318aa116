"""One client: subscriptions, per-product order, outbound rate limit and its send buffer.

Ticks are offered synchronously by the hub (no await on the fan-out path). Each
connection keeps per-product ``seq`` strictly increasing; when its token bucket is empty
or its send buffer is full, it keeps only the newest tick per product and sends it with
``skipped`` = how many older ticks it replaced. While a product's backfill is read, its
live ticks wait in a bounded hand-over buffer and are released after the backfill, newer
than its last tick only. The writer (``session.py``) drains :meth:`next_frames`.

A ``?batch=true`` connection gets live ticks from the hub's window lane (``window.py``):
each flush, a prebuilt frame of the window's ticks when :meth:`take_window` finds that the
per-tick path would have queued every one of them unchanged, else those ticks one by one
through :meth:`offer_tick`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import msgspec

from services.common.aio import Signal
from services.common.logging import get_logger
from services.common.models import encode_tick
from services.common.tokenbucket import TokenBucket
from services.gateway import metrics
from services.gateway.protocol import CLOSE_ABNORMAL
from services.gateway.settings import GatewaySettings
from services.gateway.ticks import LiveTick
from services.gateway.window import WindowBatch

log = get_logger(__name__)

# A queued frame: a shared tick (its bytes and cached text serve every client), a shared
# window of ticks (batch connections), or bytes of this connection's own (control
# messages, ticks re-encoded with ``skipped``).
Frame = LiveTick | WindowBatch | bytes


@dataclass(slots=True)
class _Conflated:
    live: LiveTick
    skipped: int


@dataclass(slots=True)
class _HandoverBuffer:
    """Live ticks of one product that arrive while its backfill is read."""

    limit: int
    ticks: list[LiveTick] = field(default_factory=list)
    overflow: LiveTick | None = None
    dropped: int = 0

    def add(self, live: LiveTick) -> None:
        if len(self.ticks) < self.limit:
            self.ticks.append(live)
            return
        # past the bound only the newest survives, announced later with `skipped`
        if self.overflow is not None:
            self.dropped += 1
        self.overflow = live


class ClientConnection:
    def __init__(
        self,
        conn_id: str,
        settings: GatewaySettings,
        *,
        batch: bool = False,
        schedule: Callable[[ClientConnection], None] | None = None,
        catch_up: Callable[[ClientConnection], None] | None = None,
        schedule_inline: Callable[[ClientConnection], None] = lambda _conn: None,
    ) -> None:
        self.conn_id = conn_id
        self.settings = settings
        self.batch = batch
        self.products: set[str] = set()
        self.last_seq: dict[str, int] = {}
        self.bucket = TokenBucket(settings.ws_max_msgs_per_sec, settings.ws_burst)
        self.queue: list[tuple[Frame, str]] = []  # a list: an empty deque is 760 bytes
        self._queue_limit = settings.ws_send_queue
        # ticks in queued windows beyond their one entry each: the limit counts ticks
        self._window_extra = 0
        # every last_seq is at most the hub's latest seq as of the previous flush, so no
        # tick of the next window was sent already: only taking a window whole keeps it
        self.in_step = False
        self.conflated: dict[str, _Conflated] = {}
        self.handover: dict[str, _HandoverBuffer] = {}
        self.wakeup = Signal()
        self.drained = Signal()
        self.close_code: int | None = None
        self.gone = False  # the socket is closed or failed (see peer_gone)
        self.close_reason = ""
        # batch connections are woken by the hub's flush clock, others at once
        self._schedule = schedule if batch and schedule is not None else None
        self.scheduled = False  # on the hub's list for the next flush tick
        # connections with a raw frame writer: the session's inline flush (plain ones right
        # after the NATS read, see offer_tick; batch ones at the hub's flush tick), whether
        # one is due, and whether the writer task is waiting in a send (nothing may overtake
        # it then)
        self.inline_flush: Callable[[], None] | None = None
        self.inline_due = False
        self._schedule_inline = schedule_inline
        self.sending = False
        # hands over what the hub's open window holds for this connection (batch only)
        self._catch_up = catch_up if batch else None

    def _notify(self) -> None:
        if self._schedule is None:
            self.wakeup.set()
        elif not self.scheduled:  # once per flush window, not once per tick
            self.scheduled = True
            self._schedule(self)

    # -- called by the hub / command handler (synchronous) ---------------------------------

    def send_control(self, frame: bytes, kind: str) -> None:
        """Protocol messages bypass the tick rate limit (one token per tick only)."""
        self.queue.append((frame, kind))
        self._notify()

    def offer_tick(
        self, product: str, live: LiveTick, skipped: int = 0, now: float | None = None
    ) -> None:
        """Called for every subscriber of every tick: kept to plain attribute and dict work."""
        self.in_step = False
        if self.handover and product in self.handover:
            self.handover[product].add(live)
            return
        seq = live.seq
        last_seq = self.last_seq
        if seq <= last_seq.get(product, -1):
            return  # already sent (snapshot/backfill hand-over) or older
        last_seq[product] = seq
        pending = self.conflated.get(product) if self.conflated else None
        if pending is not None:
            # an older tick of this product is waiting: the newest replaces it
            metrics.CONFLATED.inc()
            pending.live = live
            pending.skipped += 1 + skipped
        elif (
            not skipped
            and len(self.queue) + self._window_extra < self._queue_limit
            and self.bucket.take(now)
        ):
            self.queue.append((live, "tick"))
            if self.inline_flush is not None and not self.batch:
                # written by the hub right after the NATS read that brought it (with any
                # other tick of that read), without waking the writer task
                if not self.inline_due:
                    self.inline_due = True
                    self._schedule_inline(self)
                return
        else:
            self.conflated[product] = _Conflated(live, skipped)
        self._notify()

    def take_window(self, batch: WindowBatch, now: float, latest: Mapping[str, LiveTick]) -> bool:
        """Queue ``batch``'s prebuilt frame when :meth:`offer_tick` would have queued each of
        its ticks unchanged: no hand-over or conflation under way, room in the queue,
        tokens for all of them, none sent already. Otherwise False: the caller offers them
        one by one. ``latest`` is the hub's newest tick per product."""
        count = batch.count
        if (
            self.conflated
            or self.handover
            or len(self.queue) + self._window_extra + count > self._queue_limit
            or not (self.in_step or self._none_sent(batch, latest))
            or not self.bucket.take(now, count)
        ):
            return False
        self.queue.append((batch, "window"))
        self._window_extra += count - 1
        self.last_seq.update(batch.last)
        self.in_step = True
        self._notify()  # the hub's flush tick is now: written in this flush
        return True

    def _none_sent(self, batch: WindowBatch, latest: Mapping[str, LiveTick]) -> bool:
        """No tick of ``batch`` was sent already (snapshot, backfill, the per-tick path),
        and no last_seq is ahead of the hub (a backfill read past the live tail): then
        taking ``batch`` leaves the connection in step."""
        first = batch.first
        for product, seq in self.last_seq.items():
            start = first.get(product)
            if start is not None:
                if seq >= start:
                    return False
            else:
                current = latest.get(product)
                if current is None or seq > current.seq:
                    return False
        return True

    def start_after(self, product: str, seq: int | None) -> None:
        """Live ticks of ``product`` start after ``seq`` (the snapshot's or backfill's last)."""
        self.in_step = False
        if seq is not None:
            self.last_seq[product] = max(self.last_seq.get(product, -1), seq)

    def hold_live(self, product: str) -> None:
        """Buffer live ticks of ``product`` until :meth:`release_live` (backfill hand-over)."""
        self.handover[product] = _HandoverBuffer(self.settings.backfill_max)

    def release_live(self, product: str, after_seq: int | None) -> None:
        """Send the buffered live ticks newer than ``after_seq``, then go live."""
        buffer = self.handover.pop(product, None)
        self.start_after(product, after_seq)
        if buffer is None:
            return
        for live in buffer.ticks:
            self.offer_tick(product, live)
        if buffer.overflow is not None:
            metrics.CONFLATED.inc(buffer.dropped)
            self.offer_tick(product, buffer.overflow, buffer.dropped)

    def forget(self, product: str) -> None:
        self.conflated.pop(product, None)
        self.last_seq.pop(product, None)
        self.handover.pop(product, None)

    def peer_gone(self, code: int = CLOSE_ABNORMAL) -> None:
        """The socket is closed or failed: the writer stops without sending anything. The
        close is recorded as ``code`` unless one was already (1006: no close frame)."""
        if self.close_code is None:
            self.close_code = code
        self.gone = True
        self.wakeup.set()
        self.drained.set()

    def request_close(self, code: int, reason: str) -> None:
        if self.close_code is None:
            # the ticks of the open window come before the close, as queued ticks do
            if self._catch_up is not None:
                self._catch_up(self)
            self.close_code = code
            self.close_reason = reason
            self.wakeup.set()
            self.drained.set()

    async def wait_drained(self, max_queued: int) -> None:
        """Until at most ``max_queued`` frames wait (backpressure for bulk responses)."""
        while len(self.queue) > max_queued and self.close_code is None and not self.gone:
            self.drained.clear()
            await self.drained.wait()

    # -- the writer -----------------------------------------------------------------------

    def next_frames(self) -> list[tuple[Frame, str]]:
        """Frames ready to send now: the queue, then conflated ticks as tokens allow."""
        frames, self.queue = self.queue, []
        self._window_extra = 0
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


def _with_skipped(pending: _Conflated) -> Frame:
    if pending.skipped == 0:
        return pending.live
    tick = msgspec.structs.replace(pending.live.tick, skipped=pending.skipped)
    return encode_tick(tick)
