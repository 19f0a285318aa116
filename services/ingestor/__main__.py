"""``python -m services.ingestor``: Coinbase WebSocket → MD_RAW."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from services.common import broker
from services.common.lifecycle import run_service
from services.common.logging import get_logger
from services.ingestor import metrics
from services.ingestor.feed import PUBLISH_HEADROOM_BYTES, FeedSession, run_feed
from services.ingestor.publish import OutboundBuffer, publish_loop
from services.ingestor.record import Recorder
from services.ingestor.rest import RestClient
from services.ingestor.resync import Resyncer
from services.ingestor.sequences import SequenceTracker
from services.ingestor.settings import IngestorSettings

log = get_logger(__name__)


async def main(settings: IngestorSettings, stop: asyncio.Event) -> None:
    nc = await broker.connect(settings, name="ledgerflux-ingestor", stop=stop)
    recorder = (
        Recorder(Path(settings.record), settings.record_max_bytes) if settings.record else None
    )
    try:
        publisher = broker.Publisher(nc, settings)
        await broker.ensure_streams(publisher.js, settings)
        metrics.init_products(settings.coinbase_products)
        buffer = OutboundBuffer(maxlen=settings.ingest_buffer_max)
        metrics.BUFFER_DEPTH.set_function(buffer.__len__)  # read at scrape, not per frame
        tracker = SequenceTracker()
        rest = RestClient(
            settings.coinbase_rest_url,
            timeout_s=settings.coinbase_rest_timeout_s,
            rate=settings.coinbase_rest_rate_per_s,
            burst=settings.coinbase_rest_burst,
        )
        resyncer = Resyncer(tracker, buffer, rest, max_attempts=settings.resync_max_attempts)
        session = FeedSession(
            settings,
            buffer,
            recorder,
            tracker=tracker,
            resyncer=resyncer,
            max_publish_bytes=nc.max_payload - PUBLISH_HEADROOM_BYTES,
        )
        metrics.READ_AHEAD.set_function(session.read_ahead)
        log.info(
            "ingestor_started",
            url=settings.coinbase_ws_url,
            products=settings.coinbase_products,
            channels=settings.coinbase_channels,
        )
        async with asyncio.TaskGroup() as tg:
            tg.create_task(run_feed(settings, session, stop))
            tg.create_task(resyncer.run(stop))
            tg.create_task(
                publish_loop(
                    publisher,
                    buffer,
                    batch_max=settings.publish_batch_max,
                    stop=stop,
                    drain_timeout_s=settings.drain_timeout_s,
                    on_drops_recovered=resyncer.on_buffer_drops,
                )
            )
    finally:
        if recorder is not None:
            recorder.close()
        await broker.close(nc, settings.drain_timeout_s)


if __name__ == "__main__":
    sys.exit(run_service("ingestor", IngestorSettings, main))
