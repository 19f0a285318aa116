"""``python -m services.normalizer``: MD_RAW → validated canonical ticks on MD_TICKS."""

from __future__ import annotations

import asyncio
import sys

from nats.js.api import AckPolicy

from services.common import broker
from services.common.lifecycle import run_service
from services.common.logging import get_logger
from services.common.pull import DirectPull, TrackedPull
from services.common.subjects import RAW_STREAM, RAW_WILDCARD
from services.normalizer.consume import Normalizer
from services.normalizer.settings import NormalizerSettings
from services.normalizer.state import recover_last_seqs

log = get_logger(__name__)


async def main(settings: NormalizerSettings, stop: asyncio.Event) -> None:
    nc = await broker.connect(settings, name="ledgerflux-normalizer", stop=stop)
    subs: list[DirectPull] = []
    try:
        publisher = broker.Publisher(nc, settings)
        js = publisher.js
        await broker.ensure_streams(js, settings)
        last_seq = await recover_last_seqs(js, settings.owned_shards)
        durable = settings.durable_name
        pull = TrackedPull(
            js,
            subs,
            stream=RAW_STREAM,
            durable=durable,
            filter_subjects=[RAW_WILDCARD],
            # one batch in flight at a time: a redelivery (ack_wait passed) comes before
            # anything newer, so per-product order never has to drop it as stale
            max_ack_pending=settings.fetch_batch,
            ack_wait_s=settings.ack_wait_s,
            # batches are made durable in stream order: one ack of a batch's last frame
            # covers the batch (a thousand acks fewer per batch); pull.fetch never returns
            # a batch across a hole in the deliveries, which that ack would swallow
            ack_policy=AckPolicy.ALL,
        )
        await pull.bind()
        log.info("normalizer_started", durable=durable, shards=sorted(settings.owned_shards))
        normalizer = Normalizer(settings, publisher, last_seq)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(normalizer.run(pull, stop))
            tg.create_task(broker.report_consumer_lag(js, RAW_STREAM, durable, stop))
    finally:
        await broker.close(nc, settings.drain_timeout_s, pull_subs=subs)


if __name__ == "__main__":
    sys.exit(run_service("normalizer", NormalizerSettings, main))
