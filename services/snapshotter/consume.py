"""MD_TICKS → DynamoDB: fetch a batch, coalesce to the newest tick per product, write, ack.

The loop runs back to back: under load each pass covers more ticks with the same number
of writes (one per dirty product), which is what lets DynamoDB keep up (infra-notes:
~700 conditional writes/s locally). Acks follow the writes that cover them.
"""

from __future__ import annotations

import asyncio

import msgspec
from nats.js import JetStreamContext

from services.common.broker import fetch_batch
from services.common.logging import get_logger
from services.common.models import decode_tick
from services.snapshotter import metrics
from services.snapshotter.ddb import LatestTick, LatestWriter
from services.snapshotter.settings import SnapshotterSettings
from services.snapshotter.state import DurableState

log = get_logger(__name__)


async def consume(
    settings: SnapshotterSettings,
    sub: JetStreamContext.PullSubscription,
    writer: LatestWriter,
    state: DurableState,
    stop: asyncio.Event,
) -> None:
    while not stop.is_set():
        msgs = await fetch_batch(sub, settings.fetch_batch, settings.fetch_timeout_s)
        if not msgs:
            continue
        latest: dict[str, LatestTick] = {}
        for msg in msgs:
            try:
                tick = decode_tick(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                metrics.BAD_TICKS.inc()
                log.error("bad_tick_on_stream", subject=msg.subject, error=str(exc))
                continue
            current = latest.get(tick.product)
            if current is None or tick.seq > current.seq:
                latest[tick.product] = LatestTick(
                    product=tick.product,
                    seq=tick.seq,
                    tick_json=msg.data.decode(),
                    price=tick.price,
                    time=tick.time,
                    stream_seq=msg.metadata.sequence.stream,
                )
        metrics.TICKS_IN.inc(len(msgs))
        written = list(latest.values())
        if not await writer.write_all(written, stop):
            log.warning("batch_abandoned_on_stop", ticks=len(msgs))
            return  # not acked: redelivered to whoever consumes next
        for msg in msgs:
            await msg.ack()
        if written:
            metrics.COALESCE_RATIO.set(len(msgs) / len(written))
        state.apply(written, max(m.metadata.sequence.stream for m in msgs))
