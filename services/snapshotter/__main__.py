"""``python -m services.snapshotter``: MD_TICKS → latest state in DynamoDB."""

from __future__ import annotations

import asyncio
import sys

import aioboto3
from nats.js import JetStreamContext

from services.common import broker
from services.common.lifecycle import run_service
from services.common.logging import get_logger
from services.common.subjects import TICKS_PREFIX, TICKS_STREAM
from services.snapshotter.consume import consume
from services.snapshotter.ddb import LatestWriter, ensure_table
from services.snapshotter.settings import SnapshotterSettings

log = get_logger(__name__)


async def main(settings: SnapshotterSettings, stop: asyncio.Event) -> None:
    session = aioboto3.Session()
    nc = await broker.connect(settings, name="ledgerflux-snapshotter", stop=stop)
    subs: list[JetStreamContext.PullSubscription] = []
    try:
        js = nc.jetstream()
        await broker.ensure_streams(js, settings)
        async with session.client(
            "dynamodb", endpoint_url=settings.ddb_endpoint_url, region_name=settings.aws_region
        ) as ddb:
            await ensure_table(ddb, settings.ddb_table, create=settings.ddb_create_table)
            durable = settings.durable_name
            sub = await broker.durable_pull(
                js,
                stream=TICKS_STREAM,
                durable=durable,
                filter_subjects=[f"{TICKS_PREFIX}{s}.>" for s in sorted(settings.owned_shards)],
                max_ack_pending=settings.max_ack_pending,
            )
            subs.append(sub)
            log.info("snapshotter_started", durable=durable, table=settings.ddb_table)
            writer = LatestWriter(ddb, settings.ddb_table, settings.ddb_max_concurrency)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(consume(settings, sub, writer, stop))
                tg.create_task(broker.report_consumer_lag(js, TICKS_STREAM, durable, stop))
    finally:
        await broker.close(nc, settings.drain_timeout_s, pull_subs=subs)


if __name__ == "__main__":
    sys.exit(run_service("snapshotter", SnapshotterSettings, main))
