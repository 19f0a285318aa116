"""``restore`` and ``verify``: rebuild DynamoDB from a snapshot plus the stream, and check
DynamoDB, the newest snapshot and MD_TICKS against each other. Both print a progress line."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from typing import TYPE_CHECKING

import aioboto3
import msgspec
import orjson
from aiobotocore.config import AioConfig
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.common import broker
from services.common.laststate import load_last_ticks
from services.common.models import Tick, decode_tick, encode_tick
from services.common.subjects import TICKS_STREAM, shard_of, tick_filters
from services.snapshotter.ddb import LatestTick, LatestWriter, ensure_table, read_latest
from services.snapshotter.settings import SnapshotterSettings
from services.snapshotter.snapshots import Snapshot, read_pointer, read_snapshot

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient


class Progress:
    """One line, rewritten in place on a terminal, a new line a second otherwise."""

    def __init__(self, label: str, total: int | None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self._last = 0.0
        self._tty = sys.stderr.isatty()

    def advance(self, n: int, *, force: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if not force and now - self._last < 1.0:
            return
        self._last = now
        pct = f" ({self.done / self.total:.0%})" if self.total else ""
        total = f"/{self.total}" if self.total else ""
        line = f"{self.label}: {self.done}{total}{pct}"
        print(
            ("\r" + line) if self._tty else line,
            end="" if self._tty else "\n",
            file=sys.stderr,
            flush=True,
        )

    def finish(self) -> None:
        self.advance(0, force=True)
        if self._tty:
            print(file=sys.stderr)


# Few, quick retries inside botocore: our own loops retry (and log, and count) with
# backoff, so an outage shows in logs and metrics instead of hiding in botocore's backoff.


def _credentials(settings: SnapshotterSettings) -> dict[str, object]:
    """Explicit keys when configured (env or ``.env``), else boto's own credential chain."""
    key_id, secret = settings.aws_access_key_id, settings.aws_secret_access_key
    if not key_id or secret is None:
        return {}
    return {"aws_access_key_id": key_id, "aws_secret_access_key": secret.get_secret_value()}


def s3_client_kwargs(settings: SnapshotterSettings) -> dict[str, object]:
    return {
        **_credentials(settings),
        "endpoint_url": settings.s3_endpoint_url,
        "region_name": settings.aws_region,
        "config": AioConfig(
            s3={"addressing_style": "path"},
            connect_timeout=2,
            read_timeout=10,
            retries={"max_attempts": 2, "mode": "standard"},
        ),
    }


def ddb_client_kwargs(settings: SnapshotterSettings) -> dict[str, object]:
    return {
        **_credentials(settings),
        "endpoint_url": settings.ddb_endpoint_url,
        "region_name": settings.aws_region,
        "config": AioConfig(
            connect_timeout=2,
            read_timeout=10,
            retries={"max_attempts": 2, "mode": "standard"},
            max_pool_connections=max(10, settings.ddb_max_concurrency),
            # our requests are built by typed code; botocore re-validating every parameter
            # of every 100-item transaction was ~14 % of the service's CPU (py-spy)
            parameter_validation=False,
        ),
    }


def _item(tick: Tick, data: bytes, stream_seq: int) -> LatestTick:
    return LatestTick(tick.product, tick.seq, data.decode(), tick.price, tick.time, stream_seq)


def _owned(settings: SnapshotterSettings, product: str) -> bool:
    return shard_of(product, settings.num_shards) in settings.owned_shards


async def _load_snapshot(
    settings: SnapshotterSettings, key: str | None
) -> tuple[str | None, Snapshot | None]:
    session = aioboto3.Session()
    async with session.client("s3", **s3_client_kwargs(settings)) as s3:  # type: ignore[call-overload]
        if key is None:
            pointer = await read_pointer(s3, settings.s3_bucket, settings.snapshot_prefix)
            if pointer is None:
                return None, None
            key = pointer.key
        return key, await read_snapshot(s3, settings.s3_bucket, key)


async def _replay(
    js: JetStreamContext, settings: SnapshotterSettings, from_seq: int, writer: LatestWriter
) -> int:
    """Write the newest tick per product of MD_TICKS from ``from_seq`` on; returns ticks read."""
    info = await js.stream_info(TICKS_STREAM)
    last_seq = info.state.last_seq
    if from_seq > last_seq:
        return 0
    name = f"restore-{uuid.uuid4().hex[:10]}"
    filters = tick_filters(settings.owned_shards, settings.num_shards)
    await js.add_consumer(
        TICKS_STREAM,
        ConsumerConfig(
            name=name,
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=from_seq,
            filter_subjects=filters if len(filters) > 1 else None,
            filter_subject=filters[0] if len(filters) == 1 else None,
            inactive_threshold=60,
        ),
    )
    sub = await js.pull_subscribe_bind(durable=name, stream=TICKS_STREAM)
    progress = Progress("replaying MD_TICKS", last_seq - from_seq + 1)
    stop = asyncio.Event()
    seen = 0
    bad = 0
    try:
        while True:
            msgs = await broker.fetch_batch(sub, 5000, 1.0)
            if not msgs:
                break
            latest: dict[str, LatestTick] = {}
            for msg in msgs:
                try:
                    tick = decode_tick(msg.data)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    # skipped like the live consumer does (it wiped the table before: a
                    # crash here left it empty, and every rerun crashed the same way)
                    bad += 1
                    continue
                current = latest.get(tick.product)
                if current is None or tick.seq > current.seq:
                    latest[tick.product] = _item(tick, msg.data, msg.metadata.sequence.stream)
            await writer.write_all(list(latest.values()), stop)
            seen += len(msgs)
            progress.advance(msgs[-1].metadata.sequence.stream - from_seq + 1 - progress.done)
            if msgs[-1].metadata.sequence.stream >= last_seq:
                break
    finally:
        await sub.unsubscribe()
        await js.delete_consumer(TICKS_STREAM, name)
    progress.finish()
    if bad:
        print(
            f"replay: skipped {bad} message(s) on {TICKS_STREAM} that are not canonical ticks",
            file=sys.stderr,
        )
    return seen


async def restore(settings: SnapshotterSettings, key: str | None) -> int:
    key, snapshot = await _load_snapshot(settings, key)
    if snapshot is not None and (
        snapshot.num_shards != settings.num_shards
        or sorted(snapshot.shards) != sorted(settings.owned_shards)
    ):
        print(
            f"snapshot {key} covers shards {snapshot.shards} of {snapshot.num_shards}; "
            f"this replica owns {sorted(settings.owned_shards)} of {settings.num_shards}",
            file=sys.stderr,
        )
        return 2
    session = aioboto3.Session()
    nc = await broker.connect(
        settings,
        name="ledgerflux-snapshotter-restore",
        give_up_after_s=settings.nats_connect_timeout_s,
    )
    try:
        js = nc.jetstream()
        async with session.client("dynamodb", **ddb_client_kwargs(settings)) as ddb:  # type: ignore[call-overload]
            await ensure_table(ddb, settings.ddb_table, create=True)
            wiped = await _wipe_owned(ddb, settings)
            writer = LatestWriter(
                ddb, settings.ddb_table, settings.ddb_max_concurrency, settings.ddb_items_per_call
            )
            start_seq = 1
            restored = 0
            if snapshot is not None:
                items = [
                    _item(tick, encode_tick(tick), snapshot.stream_seq)
                    for tick in snapshot.products.values()
                ]
                progress = Progress(f"writing snapshot {key}", len(items))
                for i in range(0, len(items), 500):
                    await writer.write_all(items[i : i + 500], asyncio.Event())
                    progress.advance(len(items[i : i + 500]))
                progress.finish()
                restored = len(items)
                start_seq = snapshot.stream_seq + 1
            replayed = await _replay(js, settings, start_seq, writer)
    finally:
        await broker.close(nc, settings.drain_timeout_s)
    print(
        f"restored {settings.ddb_table}: wiped {wiped} items, {restored} from snapshot "
        f"{key or '(none)'}, then {replayed} ticks replayed from MD_TICKS seq {start_seq}"
    )
    return 0


async def _wipe_owned(ddb: DynamoDBClient, settings: SnapshotterSettings) -> int:
    stored = await read_latest(ddb, settings.ddb_table)
    owned = [p for p in stored if _owned(settings, p)]
    for product in owned:
        await ddb.delete_item(TableName=settings.ddb_table, Key={"product": {"S": product}})
    return len(owned)


async def verify(settings: SnapshotterSettings, key: str | None) -> int:
    session = aioboto3.Session()
    nc = await broker.connect(
        settings,
        name="ledgerflux-snapshotter-verify",
        give_up_after_s=settings.nats_connect_timeout_s,
    )
    try:
        js = nc.jetstream()
        progress = Progress("verify: reading MD_TICKS, DynamoDB, S3", 3)
        stream = await load_last_ticks(js, settings.owned_shards)
        progress.advance(1)
    finally:
        await broker.close(nc, settings.drain_timeout_s)
    async with session.client("dynamodb", **ddb_client_kwargs(settings)) as ddb:  # type: ignore[call-overload]
        stored = {
            p: v
            for p, v in (await read_latest(ddb, settings.ddb_table)).items()
            if _owned(settings, p)
        }
    progress.advance(1)
    key, snapshot = await _load_snapshot(settings, key)
    progress.advance(1)
    progress.finish()

    differences: list[str] = []
    for product in sorted(set(stream) | set(stored)):
        in_stream = stream.get(product)
        in_table = stored.get(product)
        if in_stream is None or in_table is None:
            where = "DynamoDB" if in_stream is None else "MD_TICKS"
            differences.append(f"{product}: only in {where}")
        elif orjson.loads(in_stream.data) != orjson.loads(in_table.tick_json):
            differences.append(
                f"{product}: DynamoDB seq {in_table.seq} != MD_TICKS seq {in_stream.tick.seq}"
            )
    if snapshot is not None:
        for product, tick in sorted(snapshot.products.items()):
            latest = stream.get(product)
            if latest is None:
                differences.append(f"{product}: in snapshot {key} but not in MD_TICKS")
            elif tick.seq > latest.tick.seq:
                differences.append(f"{product}: snapshot seq {tick.seq} is ahead of MD_TICKS")
            elif latest.stream_seq <= snapshot.stream_seq and msgspec.structs.asdict(
                tick
            ) != msgspec.structs.asdict(latest.tick):
                differences.append(
                    f"{product}: snapshot {key} (covers seq {snapshot.stream_seq}) differs from "
                    f"MD_TICKS at its last tick (stream seq {latest.stream_seq})"
                )
        for product, latest in stream.items():
            if latest.stream_seq <= snapshot.stream_seq and product not in snapshot.products:
                differences.append(f"{product}: missing from snapshot {key}")
    for line in differences:
        print(f"DIFF {line}")
    print(
        f"verify: {len(stream)} products in MD_TICKS, {len(stored)} in DynamoDB, "
        f"{len(snapshot.products) if snapshot else 0} in snapshot {key or '(none)'}: "
        f"{len(differences)} difference(s)"
    )
    return 1 if differences else 0
