"""``python -m services.snapshotter [restore [--snapshot KEY] | verify [--snapshot KEY]]``.

Without a command: MD_TICKS → latest state in DynamoDB, periodic snapshots to S3.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import aioboto3
import nats.errors
from botocore.exceptions import BotoCoreError, ClientError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy

from services.common import broker
from services.common.errors import LedgerFluxError
from services.common.lifecycle import EXIT_CONFIG, EXIT_FAILED, run_service
from services.common.logging import configure_logging, get_logger
from services.common.pull import DirectPull, TrackedPull
from services.common.settings import ConfigError
from services.common.subjects import TICKS_STREAM, shard_of, tick_filters
from services.snapshotter.consume import consume
from services.snapshotter.ddb import LatestWriter, ensure_table, read_latest, until_ddb_answers
from services.snapshotter.settings import SnapshotterSettings
from services.snapshotter.snapshots import SnapshotWriter
from services.snapshotter.state import DurableState
from services.snapshotter.tools import ddb_client_kwargs, restore, s3_client_kwargs, verify

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

log = get_logger(__name__)
EXIT_INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C


async def main(settings: SnapshotterSettings, stop: asyncio.Event) -> None:
    session = aioboto3.Session()
    nc = await broker.connect(settings, name="ledgerflux-snapshotter", stop=stop)
    subs: list[DirectPull] = []
    try:
        js = nc.jetstream()
        await broker.ensure_streams(js, settings)
        async with (
            session.client("dynamodb", **ddb_client_kwargs(settings)) as ddb,  # type: ignore[call-overload]
            session.client("s3", **s3_client_kwargs(settings)) as s3,  # type: ignore[call-overload]
        ):
            await until_ddb_answers(
                "ensure_table",
                lambda: ensure_table(ddb, settings.ddb_table, create=settings.ddb_create_table),
                stop,
            )
            durable = settings.durable_name
            pull = TrackedPull(
                js,
                subs,
                stream=TICKS_STREAM,
                durable=durable,
                filter_subjects=tick_filters(settings.owned_shards, settings.num_shards),
                max_ack_pending=settings.max_ack_pending,
                # passes are flushed in stream order, so one ack of a pass's last message
                # covers the whole pass (instead of tens of thousands of acks)
                ack_policy=AckPolicy.ALL,
            )
            await pull.bind()
            state = await _warm_state(js, ddb, settings, durable, stop)
            log.info(
                "snapshotter_started",
                durable=durable,
                table=settings.ddb_table,
                bucket=settings.s3_bucket,
                products=len(state.latest),
                covered_stream_seq=state.covered_stream_seq,
            )
            writer = LatestWriter(
                ddb, settings.ddb_table, settings.ddb_max_concurrency, settings.ddb_items_per_call
            )
            snapshots = SnapshotWriter(s3, settings, state)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(consume(settings, pull, writer, state, stop))
                tg.create_task(snapshots.run(stop))
                tg.create_task(broker.report_consumer_lag(js, TICKS_STREAM, durable, stop))
    finally:
        await broker.close(nc, settings.drain_timeout_s, pull_subs=subs)


async def _warm_state(
    js: JetStreamContext,
    ddb: DynamoDBClient,
    settings: SnapshotterSettings,
    durable: str,
    stop: asyncio.Event,
) -> DurableState:
    """What is already durable: DynamoDB's items, complete up to the consumer's ack floor."""
    stored = await until_ddb_answers(
        "read_latest", lambda: read_latest(ddb, settings.ddb_table), stop
    )
    info = await js.consumer_info(TICKS_STREAM, durable)
    state = DurableState(
        latest={
            p: item
            for p, item in stored.items()
            if shard_of(p, settings.num_shards) in settings.owned_shards
        },
        covered_stream_seq=info.ack_floor.stream_seq if info.ack_floor else 0,
    )
    return state


def _tool(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    key = None
    if "--snapshot" in rest:
        at = rest.index("--snapshot")
        if at + 1 >= len(rest):
            print("--snapshot needs a key", file=sys.stderr)
            return EXIT_CONFIG
        key = rest[at + 1]
        rest = rest[:at] + rest[at + 2 :]
    elif given := [a for a in rest if a.startswith("--snapshot=")]:
        key = given[0].split("=", 1)[1]
        rest = [a for a in rest if a != given[0]]
    try:
        settings = SnapshotterSettings.load(rest, prog=f"python -m services.snapshotter {command}")
    except ConfigError as exc:
        configure_logging("INFO", service="snapshotter")
        get_logger().error("config_error", error=str(exc))
        return EXIT_CONFIG
    configure_logging("WARNING", service=f"snapshotter-{command}")
    action: Callable[[SnapshotterSettings, str | None], Coroutine[Any, Any, int]] = (
        restore if command == "restore" else verify
    )
    try:
        return asyncio.run(action(settings, key))
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (LedgerFluxError, BotoCoreError, ClientError, nats.errors.Error, OSError) as exc:
        # an unreachable or refusing server is an answer for the operator, not a traceback
        print(f"{command} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("restore", "verify"):
        sys.exit(_tool(sys.argv[1:]))
    sys.exit(run_service("snapshotter", SnapshotterSettings, main))
