"""MD_TICKS → DynamoDB: fetch continuously, coalesce to the newest tick per product, flush
passes back to back, ack after the write that covers each message.

Fetching and flushing overlap: while one pass writes, the next pass accumulates. Under load
each pass therefore covers more ticks with the same number of writes (one per dirty
product) — that is what lets DynamoDB keep up (infra-notes: ~700 conditional writes/s
locally). Memory is bounded by ``MAX_ACK_PENDING`` un-acked messages.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from services.common.broker import fetch_batch
from services.common.logging import get_logger
from services.common.models import decode_tick
from services.snapshotter import metrics
from services.snapshotter.ddb import LatestTick, LatestWriter
from services.snapshotter.settings import SnapshotterSettings
from services.snapshotter.state import DurableState

log = get_logger(__name__)


@dataclass
class Pass:
    """Ticks fetched since the last flush: the newest per product and what to ack."""

    latest: dict[str, LatestTick] = field(default_factory=dict)
    msgs: list[Msg] = field(default_factory=list)

    def add(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            try:
                tick = decode_tick(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                metrics.BAD_TICKS.inc()
                log.error("bad_tick_on_stream", subject=msg.subject, error=str(exc))
                continue
            current = self.latest.get(tick.product)
            if current is None or tick.seq > current.seq:
                self.latest[tick.product] = LatestTick(
                    product=tick.product,
                    seq=tick.seq,
                    tick_json=msg.data.decode(),
                    price=tick.price,
                    time=tick.time,
                    stream_seq=msg.metadata.sequence.stream,
                )
        self.msgs.extend(msgs)
        metrics.TICKS_IN.inc(len(msgs))


async def consume(
    settings: SnapshotterSettings,
    sub: JetStreamContext.PullSubscription,
    writer: LatestWriter,
    state: DurableState,
    stop: asyncio.Event,
) -> None:
    current = Pass()
    have_work = asyncio.Event()
    room = asyncio.Event()
    room.set()
    fetching_done = asyncio.Event()
    # leave room for one more fetch under the server's max_ack_pending
    limit = max(settings.fetch_batch, settings.max_ack_pending - settings.fetch_batch)

    async def fetcher() -> None:
        try:
            while not stop.is_set():
                if len(current.msgs) >= limit:
                    room.clear()
                    await _wait_any(room, stop)
                    continue
                msgs = await fetch_batch(sub, settings.fetch_batch, settings.fetch_timeout_s)
                if msgs:
                    current.add(msgs)
                    have_work.set()
        finally:
            fetching_done.set()
            have_work.set()

    async def flusher() -> None:
        nonlocal current
        while True:
            await have_work.wait()
            have_work.clear()
            if not current.msgs:
                if fetching_done.is_set():
                    return
                continue
            flushing, current = current, Pass()
            room.set()
            if not await flush(flushing):
                log.warning("pass_abandoned_on_stop", ticks=len(flushing.msgs))
                return  # not acked: redelivered to whoever consumes next

    async def flush(work: Pass) -> bool:
        written = list(work.latest.values())
        if not await writer.write_all(written, stop):
            return False
        for msg in work.msgs:
            await msg.ack()
        if written:
            metrics.COALESCE_RATIO.set(len(work.msgs) / len(written))
        state.apply(written, max(m.metadata.sequence.stream for m in work.msgs))
        return True

    async with asyncio.TaskGroup() as tg:
        tg.create_task(fetcher())
        tg.create_task(flusher())


async def _wait_any(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
