"""REST resyncs: when the feed may have lost a product's ticks, publish its REST ticker.

Triggers (``reason``): a heartbeat revealing a missed trade (``gap``), the same on the
first heartbeat after a reconnect (``reconnect``), frames of the product dropped from
the full outbound buffer once NATS is back (``buffer_drop``), a product silent while
others flow (``stale``).

Requests never block the feed reader: :meth:`Resyncer.request` only records what is
wanted. A few workers fetch ``GET /products/{id}/ticker`` through the rate limiter, at
most one in flight per product; a request for a product already waiting is merged into
it (the newest target wins). The result goes to ``md.raw.coinbase.<product>`` as a
Coinbase-``ticker``-shaped frame with header ``Ledgerflux-Resync`` (the normalizer marks
the tick ``"resync": true``), labelled with a sequence that keeps per-product order (see
:mod:`services.ingestor.sequences`) and ``Nats-Msg-Id: coinbase:<product>:resync:<seq>``.

A request is *superseded* (nothing published) when, before its result is ready, the
feed itself delivered a ticker at or past its label: a resync tick would then arrive
downstream older than that ticker and be dropped there. A REST ticker older than the
trade the heartbeat announced is not published either: the request is retried a bit
later, up to ``RESYNC_MAX_ATTEMPTS``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import orjson
from structlog.contextvars import bound_contextvars

from services.common.logging import get_logger
from services.common.subjects import HDR_RECV_NS, HDR_RESYNC, RAW_STREAM, raw_subject
from services.ingestor import metrics
from services.ingestor.errors import RestError, RestRateLimitedError
from services.ingestor.publish import OutboundBuffer, Outgoing
from services.ingestor.rest import RestClient, RestTicker
from services.ingestor.sequences import SequenceTracker

log = get_logger(__name__)

ResyncReason = Literal["gap", "reconnect", "buffer_drop", "stale"]  # metrics.RESYNC_REASONS
SkipCause = Literal["superseded", "coalesced", "failed", "no_sequence"]  # RESYNC_SKIP_CAUSES

# Which trigger produced a resync frame, for whoever reads MD_RAW (the value of
# Ledgerflux-Resync itself stays "1").
HDR_RESYNC_REASON = "Ledgerflux-Resync-Reason"

_WORKERS = 4  # REST round trips to Coinbase take ~50-100 ms: 4 in flight reach 10 req/s
_RETRY_BASE_S = 0.25
_RETRY_MAX_S = 8.0
_NS_DIGITS = re.compile(r"(\.\d{6})\d+(?=Z$|[+-]\d\d:\d\d$)")


@dataclass(slots=True)
class ResyncRequest:
    product: str
    reason: ResyncReason
    sequence: int  # the label of the resync tick
    trade_id: int | None  # the REST ticker must be at least this new
    baseline_put_seq: int | None  # what the buffer held for the product when requested
    attempts: int = 0


def resync_frame(product: str, sequence: int, ticker: RestTicker) -> bytes:
    """A Coinbase ``ticker`` frame from a REST ticker; fields REST lacks (side) are absent."""
    msg: dict[str, object] = {
        "type": "ticker",
        "sequence": sequence,
        "product_id": product,
        "price": ticker.price,
        "volume_24h": ticker.volume,
        "best_bid": ticker.bid,
        "best_ask": ticker.ask,
        # REST times carry nanoseconds; ws tickers microseconds: keep ticks alike
        "time": _NS_DIGITS.sub(r"\1", ticker.time),
        "trade_id": ticker.trade_id,
        "last_size": ticker.size,
    }
    return orjson.dumps({k: v for k, v in msg.items() if v is not None})


class Resyncer:
    """Coalesced, rate-limited REST resyncs feeding the outbound buffer."""

    def __init__(
        self,
        tracker: SequenceTracker,
        buffer: OutboundBuffer,
        rest: RestClient,
        *,
        max_attempts: int,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.tracker = tracker
        self.buffer = buffer
        self.rest = rest
        self.max_attempts = max_attempts
        self.clock_ns = clock_ns
        self._wanted: dict[str, ResyncRequest] = {}
        self._busy: set[str] = set()  # queued, in flight, or waiting to retry
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._timers: dict[str, asyncio.TimerHandle] = {}

    @property
    def pending(self) -> int:
        return len(self._busy)

    def request(
        self,
        product: str,
        reason: ResyncReason,
        *,
        sequence: int | None = None,
        trade_id: int | None = None,
    ) -> None:
        """Want a resync of ``product``; without a heartbeat's target, the newest we know."""
        state = self.tracker.state(product)
        if sequence is None:
            sequence = self.tracker.label(product)
            trade_id = state.trade_id
        if sequence is None:  # nothing ever received: no sequence to label a tick with
            self._skip(reason, "no_sequence")
            log.info("resync_skipped", product=product, reason=reason, cause="no_sequence")
            return
        new = ResyncRequest(product, reason, sequence, trade_id, state.put_seq)
        old = self._wanted.get(product)
        if old is not None:
            self._merge(old, into=new)
        self._wanted[product] = new
        if product not in self._busy:
            self._busy.add(product)
            self._queue.put_nowait(product)
        metrics.RESYNCS_PENDING.set(len(self._busy))

    def on_buffer_drops(self, products: set[str]) -> None:
        """NATS is back after the buffer dropped frames of ``products``."""
        for product in sorted(products):
            self.request(product, "buffer_drop")

    async def run(self, stop: asyncio.Event) -> None:
        """Serve requests until ``stop``; what is in flight then is abandoned."""
        try:
            async with asyncio.TaskGroup() as tg:
                workers = [tg.create_task(self._worker()) for _ in range(_WORKERS)]
                await stop.wait()
                for worker in workers:
                    worker.cancel()
        finally:
            for timer in self._timers.values():
                timer.cancel()
            self._timers.clear()

    # -- internals --------------------------------------------------------------------

    def _merge(self, old: ResyncRequest, *, into: ResyncRequest) -> None:
        """``old`` is replaced by ``into``, which covers both targets."""
        self._skip(old.reason, "coalesced")
        into.sequence = max(into.sequence, old.sequence)
        if old.trade_id is not None and (into.trade_id is None or old.trade_id > into.trade_id):
            into.trade_id = old.trade_id
        if old.baseline_put_seq is None or (
            into.baseline_put_seq is not None and old.baseline_put_seq < into.baseline_put_seq
        ):
            into.baseline_put_seq = old.baseline_put_seq

    def _skip(self, reason: ResyncReason, cause: SkipCause) -> None:
        metrics.RESYNCS_SKIPPED.labels(reason=reason, cause=cause).inc()

    def _superseded(self, req: ResyncRequest) -> bool:
        put = self.tracker.state(req.product).put_seq
        if put is None or put < req.sequence:
            return False
        return req.baseline_put_seq is None or put > req.baseline_put_seq

    async def _worker(self) -> None:
        while True:
            product = await self._queue.get()
            req = self._wanted.pop(product, None)
            retry_in: float | None = None
            if req is not None:
                with bound_contextvars(product=product, resync_reason=req.reason):
                    try:
                        retry_in = await self._attempt(req)
                    except Exception:  # one resync's bug must not stop the others
                        log.exception("resync_crashed")
                        self._skip(req.reason, "failed")
            self._after(product, req, retry_in)

    def _after(self, product: str, req: ResyncRequest | None, retry_in: float | None) -> None:
        if req is not None and retry_in is not None:
            newer = self._wanted.get(product)
            if newer is not None:
                self._merge(req, into=newer)
            else:
                self._wanted[product] = req
            loop = asyncio.get_running_loop()
            self._timers[product] = loop.call_later(retry_in, self._requeue, product)
        elif product in self._wanted:
            self._queue.put_nowait(product)  # asked again while in flight: go again
        else:
            self._busy.discard(product)
        metrics.RESYNCS_PENDING.set(len(self._busy))

    def _requeue(self, product: str) -> None:
        self._timers.pop(product, None)
        self._queue.put_nowait(product)

    async def _attempt(self, req: ResyncRequest) -> float | None:
        """One try; the delay before the next, or ``None`` when the request is settled."""
        if self._superseded(req):
            self._superseded_now(req)
            return None
        req.attempts += 1
        try:
            ticker = await self.rest.ticker(req.product, cancel_if=lambda: self._superseded(req))
        except RestRateLimitedError as exc:
            return self._retry_or_fail(req, exc.retry_after_s or _RETRY_BASE_S, str(exc))
        except RestError as exc:
            return self._retry_or_fail(req, self._backoff(req), str(exc))
        if ticker is None or self._superseded(req):
            self._superseded_now(req)
            return None
        if req.trade_id is not None and ticker.trade_id < req.trade_id:
            # The REST view lags the feed: publishing it would go back in time.
            return self._retry_or_fail(
                req,
                self._backoff(req),
                f"REST trade_id {ticker.trade_id} is behind the feed's {req.trade_id}",
            )
        self._publish(req, ticker)
        return None

    def _superseded_now(self, req: ResyncRequest) -> None:
        self._skip(req.reason, "superseded")
        log.debug("resync_superseded", sequence=req.sequence)

    def _backoff(self, req: ResyncRequest) -> float:
        return float(min(_RETRY_BASE_S * 2 ** max(req.attempts - 1, 0), _RETRY_MAX_S))

    def _retry_or_fail(self, req: ResyncRequest, delay: float, error: str) -> float | None:
        if req.attempts >= self.max_attempts:
            self._skip(req.reason, "failed")
            log.warning("resync_failed", attempts=req.attempts, error=error)
            return None
        log.info("resync_retry", attempts=req.attempts, in_s=round(delay, 3), error=error)
        return delay

    def _publish(self, req: ResyncRequest, ticker: RestTicker) -> None:
        product = req.product
        recv_ns = self.clock_ns()
        self.buffer.put(
            Outgoing(
                stream=RAW_STREAM,
                subject=raw_subject(product),
                payload=resync_frame(product, req.sequence, ticker),
                msg_id=f"coinbase:{product}:resync:{req.sequence}",
                headers={
                    HDR_RECV_NS: str(recv_ns),
                    HDR_RESYNC: "1",
                    HDR_RESYNC_REASON: req.reason,
                },
                product=product,
                type="resync",
            )
        )
        self.tracker.on_put(product, req.sequence, ticker.trade_id)
        metrics.RESYNCS.labels(reason=req.reason).inc()
        log.info(
            "resync_published",
            sequence=req.sequence,
            trade_id=ticker.trade_id,
            wanted_trade_id=req.trade_id,
            price=ticker.price,
            attempts=req.attempts,
        )
