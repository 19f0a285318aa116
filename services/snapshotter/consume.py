"""MD_TICKS → DynamoDB: fetch continuously, coalesce to the newest tick per product, flush
passes back to back, ack after the write that covers each message.

Fetching and flushing overlap: while one pass writes, the next pass accumulates. Under load
each pass therefore covers more ticks with the same number of writes (one per dirty
product) — that is what lets DynamoDB keep up (infra-notes: ~700 conditional writes/s
locally). A pass opens at most every ``DDB_FLUSH_INTERVAL_MS``, so at low rates too a write
covers a window of ticks instead of one or two. Memory is bounded by ``MAX_ACK_PENDING``
un-acked messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import msgspec

from services.common.aio import wait_any
from services.common.logging import get_logger
from services.common.logthrottle import throttle
from services.common.models import decode_tick, decode_tick_seq
from services.common.pull import Delivery, TrackedPull
from services.common.subjects import product_of_tick
from services.snapshotter import metrics
from services.snapshotter.ddb import LatestTick, LatestWriter
from services.snapshotter.settings import SnapshotterSettings
from services.snapshotter.state import DurableState

log = get_logger(__name__)


@dataclass
class Pass:
    """Ticks fetched since the last flush: the newest message per product, and the last
    message of the pass (acking it acks the pass: AckPolicy.ALL)."""

    newest: dict[str, tuple[int, Delivery]] = field(default_factory=dict)
    count: int = 0
    last: Delivery | None = None

    def add(self, msgs: list[Delivery]) -> None:
        newest = self.newest
        for msg in msgs:
            product = product_of_tick(msg.subject)
            try:
                seq = decode_tick_seq(msg.data)
            except msgspec.DecodeError as exc:  # includes ValidationError
                metrics.BAD_TICKS.inc()
                throttle.emit(log.error, "bad_tick_on_stream", subject=msg.subject, error=str(exc))
                continue
            if product is None:
                metrics.BAD_TICKS.inc()
                throttle.emit(
                    log.error, "bad_tick_on_stream", subject=msg.subject, error="no product"
                )
                continue
            current = newest.get(product)
            if current is None or seq > current[0]:
                newest[product] = (seq, msg)
        self.count += len(msgs)
        self.last = msgs[-1]
        metrics.TICKS_IN.inc(len(msgs))

    def winners(self) -> list[LatestTick]:
        """The tick to write per product (decoded in full only here: one per product)."""
        out = []
        for product, (_seq, msg) in self.newest.items():
            try:
                tick = decode_tick(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                metrics.BAD_TICKS.inc()
                throttle.emit(log.error, "bad_tick_on_stream", subject=msg.subject, error=str(exc))
                continue
            out.append(
                LatestTick(
                    product=product,
                    seq=tick.seq,
                    tick_json=msg.data.decode(),
                    price=tick.price,
                    time=tick.time,
                    stream_seq=msg.stream_seq,
                    recv_ns=tick.recv_ns,
                )
            )
        return out


async def consume(
    settings: SnapshotterSettings,
    pull: TrackedPull,
    writer: LatestWriter,
    state: DurableState,
    stop: asyncio.Event,
) -> None:
    current = Pass()
    have_work = asyncio.Event()
    room = asyncio.Event()
    room.set()
    fetching_done = asyncio.Event()
    settled = asyncio.Event()  # set while every message fetched so far is written and acked
    settled.set()
    flushing_now = False
    # leave room for one more fetch under the server's max_ack_pending
    limit = max(settings.fetch_batch, settings.max_ack_pending - settings.fetch_batch)
    interval_s = settings.ddb_flush_interval_ms / 1000

    async def fetcher() -> None:
        try:
            while True:
                if stop.is_set():
                    pull.finish()  # what is delivered by now is still written and acked
                elif current.count >= limit:
                    room.clear()
                    await wait_any(room, stop)
                    continue
                msgs = await pull.fetch(settings.fetch_batch, settings.fetch_timeout_s)
                if msgs:
                    settled.clear()
                    current.add(msgs)
                    have_work.set()
                elif pull.finished:
                    return
                if pull.hole:
                    # the rewind starts after the last ack: write and ack what came first
                    await wait_any(settled, stop)
                    if stop.is_set() or not await pull.rewind(stop):
                        return
        finally:
            fetching_done.set()
            have_work.set()

    async def flusher() -> None:
        nonlocal current, flushing_now
        loop = asyncio.get_running_loop()
        next_flush_at = loop.time()
        while True:
            await have_work.wait()
            have_work.clear()
            if current.last is None:
                if not flushing_now:
                    settled.set()
                if fetching_done.is_set():
                    return
                continue
            # a pass opens at most every DDB_FLUSH_INTERVAL_MS: without that, passes run back
            # to back and spend CPU and write capacity on few ticks each; on stop, flush now
            delay = next_flush_at - loop.time()
            if delay > 0 and not fetching_done.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(fetching_done.wait(), delay)
            next_flush_at = loop.time() + interval_s
            flushing, current = current, Pass()
            room.set()
            flushing_now = True
            if not await flush(flushing):
                log.warning("pass_abandoned_on_stop", ticks=flushing.count)
                return  # not acked: redelivered to whoever consumes next
            flushing_now = False
            if current.last is None:
                settled.set()

    async def flush(work: Pass) -> bool:
        started = time.perf_counter()
        written = work.winners()
        if not await writer.write_all(written, stop):
            return False
        now_ns = time.time_ns()
        for item in written:
            if item.recv_ns:
                metrics.STATE_LAG.observe(max(0.0, (now_ns - item.recv_ns) / 1e9))
        log.debug(
            "pass_written",
            ticks=work.count,
            products=len(written),
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        assert work.last is not None
        # AckPolicy.ALL: covers every message of the pass (no hole)
        covered = await pull.ack(work.last)
        if written:
            metrics.COALESCE_RATIO.set(work.count / len(written))
        state.apply(written, covered)
        return True

    async with asyncio.TaskGroup() as tg:
        tg.create_task(fetcher())
        tg.create_task(flusher())
