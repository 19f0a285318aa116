"""Periodic snapshots of every owned product's latest tick to S3 (DESIGN §7).

Object: ``snapshots/YYYY/MM/DD/HHMMSSmmm.json.gz`` (gzip JSON, schema :class:`Snapshot`),
then the pointer ``snapshots/latest.json`` — always in that order, so a reader never sees
a pointer to nothing. A snapshot records ``stream_seq``: every owned tick of MD_TICKS up
to it is in the snapshot, so snapshot + replay from ``stream_seq + 1`` restores exactly.
"""

from __future__ import annotations

import asyncio
import gzip
import time
import zlib
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import msgspec
from botocore.exceptions import BotoCoreError, ClientError

from services.common.logging import get_logger
from services.common.models import Tick
from services.common.subjects import TICKS_STREAM
from services.snapshotter import metrics
from services.snapshotter.errors import SnapshotReadError
from services.snapshotter.settings import SnapshotterSettings
from services.snapshotter.state import DurableState

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = get_logger(__name__)

SNAPSHOT_VERSION = 1
_encode = msgspec.json.Encoder().encode


class Snapshot(msgspec.Struct, forbid_unknown_fields=True):
    version: int
    created: str
    stream: str
    stream_seq: int
    num_shards: int
    shards: list[int]
    products: dict[str, Tick]


class Pointer(msgspec.Struct):
    key: str
    stream_seq: int
    created: str
    products: int


def snapshot_key(prefix: str, when: datetime) -> str:
    return f"{prefix}{when:%Y/%m/%d/%H%M%S}{when.microsecond // 1000:03d}.json.gz"


def pointer_key(prefix: str) -> str:
    return f"{prefix}latest.json"


def build_snapshot(state: DurableState, settings: SnapshotterSettings, when: datetime) -> bytes:
    """The snapshot JSON, assembled from the stored tick bytes (no re-encoding of ticks)."""
    head = _encode(
        {
            "version": SNAPSHOT_VERSION,
            "created": when.isoformat().replace("+00:00", "Z"),
            "stream": TICKS_STREAM,
            "stream_seq": state.covered_stream_seq,
            "num_shards": settings.num_shards,
            "shards": sorted(settings.owned_shards),
        }
    )
    items = b",".join(
        _encode(product) + b":" + item.tick_json.encode()
        for product, item in sorted(state.latest.items())
    )
    return head[:-1] + b',"products":{' + items + b"}}"


# ~600 bytes a product: 256 MiB is some 400,000 products. A cap, so that a hostile or broken
# object cannot inflate into gigabytes (gzip compresses repeated bytes ~1000:1)
MAX_SNAPSHOT_BYTES = 256 * 1024 * 1024


def parse_snapshot(data: bytes, key: str = "snapshot") -> Snapshot:
    """Decode (gunzip if needed) and schema-check a snapshot object; raise
    :class:`SnapshotReadError` naming ``key`` for anything else."""
    try:
        if data[:2] == b"\x1f\x8b":
            inflate = zlib.decompressobj(wbits=31)  # gzip framing
            data = inflate.decompress(data, MAX_SNAPSHOT_BYTES + 1)
            if len(data) > MAX_SNAPSHOT_BYTES:
                raise SnapshotReadError(key, f"inflates past {MAX_SNAPSHOT_BYTES} bytes")
            if not inflate.eof:
                raise SnapshotReadError(key, "truncated gzip")
        snapshot = msgspec.json.decode(data, type=Snapshot)
    except (zlib.error, msgspec.DecodeError, RecursionError) as exc:
        raise SnapshotReadError(key, str(exc) or "JSON nested too deeply") from None
    if snapshot.version != SNAPSHOT_VERSION or snapshot.stream_seq < 0:
        raise SnapshotReadError(
            key, f"version {snapshot.version}, stream_seq {snapshot.stream_seq}: not one we wrote"
        )
    return snapshot


async def ensure_bucket(s3: S3Client, bucket: str) -> None:
    try:
        await s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
        try:
            await s3.create_bucket(Bucket=bucket)
            log.info("s3_bucket_created", bucket=bucket)
        except ClientError as create_exc:
            code = create_exc.response.get("Error", {}).get("Code")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise


class SnapshotWriter:
    def __init__(self, s3: S3Client, settings: SnapshotterSettings, state: DurableState) -> None:
        self.s3 = s3
        self.settings = settings
        self.state = state
        self.prefix = settings.snapshot_prefix

    async def run(self, stop: asyncio.Event) -> None:
        """One snapshot per period until ``stop``, then a last one; failures wait a period."""
        period = self.settings.snapshot_period_ms / 1000
        bucket_ready = False
        while True:
            try:
                async with asyncio.timeout(period):
                    await stop.wait()
            except TimeoutError:
                pass
            try:
                if not bucket_ready:
                    await ensure_bucket(self.s3, self.settings.s3_bucket)
                    bucket_ready = True
                await self.snapshot_once()
            except (ClientError, BotoCoreError, OSError) as exc:
                metrics.ERRORS.labels(kind="s3_unavailable").inc()
                log.warning("snapshot_failed", error=repr(exc), retry_in_s=period)
            if stop.is_set():
                return

    async def snapshot_once(self) -> str | None:
        """Write one snapshot and move the pointer to it; returns its key."""
        if not self.state.latest:
            return None
        started = time.perf_counter()
        when = datetime.now(UTC)
        raw = build_snapshot(self.state, self.settings, when)
        body = (
            await asyncio.to_thread(gzip.compress, raw, 6)
            if len(raw) > 256_000
            else gzip.compress(raw, 6)
        )
        key = snapshot_key(self.prefix, when)
        bucket = self.settings.s3_bucket
        await self.s3.put_object(
            Bucket=bucket, Key=key, Body=body, ContentType="application/json",
            ContentEncoding="gzip",
        )  # fmt: skip
        pointer = Pointer(
            key=key,
            stream_seq=self.state.covered_stream_seq,
            created=when.isoformat().replace("+00:00", "Z"),
            products=len(self.state.latest),
        )
        await self.s3.put_object(
            Bucket=bucket, Key=pointer_key(self.prefix), Body=_encode(pointer),
            ContentType="application/json",
        )  # fmt: skip
        elapsed = time.perf_counter() - started
        metrics.SNAPSHOTS.inc()
        metrics.SNAPSHOT_SECONDS.observe(elapsed)
        metrics.SNAPSHOT_BYTES.set(len(body))
        metrics.SNAPSHOT_PRODUCTS.set(len(self.state.latest))
        metrics.LAST_SNAPSHOT.set(time.time())
        log.info(
            "snapshot_written", key=key, products=pointer.products,
            stream_seq=pointer.stream_seq, bytes=len(body), ms=round(elapsed * 1000, 1),
        )  # fmt: skip
        await self._retain()
        return key

    async def _retain(self) -> None:
        keys = await list_snapshot_keys(self.s3, self.settings.s3_bucket, self.prefix)
        for key in keys[: -self.settings.snapshot_retention]:
            await self.s3.delete_object(Bucket=self.settings.s3_bucket, Key=key)


async def list_snapshot_keys(s3: S3Client, bucket: str, prefix: str) -> list[str]:
    """Snapshot object keys under ``prefix``, oldest first (the key sorts by time)."""
    keys: list[str] = []
    paginator = s3.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            # only this replica's own objects: YYYY/... directly under its prefix
            if key.endswith(".json.gz") and key[len(prefix) : len(prefix) + 1].isdigit():
                keys.append(key)
    return sorted(keys)


async def read_pointer(s3: S3Client, bucket: str, prefix: str) -> Pointer | None:
    try:
        response = await s3.get_object(Bucket=bucket, Key=pointer_key(prefix))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    if response.get("ContentLength", 0) > _MAX_POINTER_BYTES:
        raise SnapshotReadError(pointer_key(prefix), f"{response['ContentLength']} bytes")
    async with response["Body"] as body:
        data = await body.read()
    try:
        return msgspec.json.decode(data, type=Pointer)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise SnapshotReadError(pointer_key(prefix), str(exc)) from None


async def read_snapshot(s3: S3Client, bucket: str, key: str) -> Snapshot:
    response = await s3.get_object(Bucket=bucket, Key=key)
    if response.get("ContentLength", 0) > MAX_SNAPSHOT_BYTES:
        raise SnapshotReadError(key, f"{response['ContentLength']} bytes")
    async with response["Body"] as body:
        return parse_snapshot(await body.read(), key)


_MAX_POINTER_BYTES = 64 * 1024
