"""The snapshotter against real nats-server, DynamoDB Local and SeaweedFS S3."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from prometheus_client.parser import text_string_to_metric_families

from services.common import broker
from services.common.laststate import load_last_ticks
from services.common.models import Tick, encode_tick
from services.common.settings import CommonSettings
from services.common.subjects import TICKS_STREAM, tick_subject
from services.devstack.ports import free_port
from services.devstack.stack import DevStack, StackPorts
from services.snapshotter.snapshots import parse_snapshot
from tests.support.aws import stack_client
from tests.support.metrics import local_value
from tests.support.procs import REPO, ServiceProcess
from tests.support.streams import wait_consumer_idle

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

PRODUCTS = [f"P{i:02d}-USD" for i in range(12)]


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    """Servers of this module's own, so stopping DynamoDB or S3 hurts no other test."""
    stack = DevStack(
        tmp_path_factory.mktemp("snapstack"),
        StackPorts.free(),
        with_redis=False,
        tools_dir=REPO / ".devstack" / "tools" / "dynamodb",
    )
    with stack:
        yield stack


@pytest.fixture
async def nc(own_stack: DevStack) -> AsyncIterator[NATS]:
    client = await nats.connect(own_stack.nats.url)
    js = client.jetstream()
    for stream in await js.streams_info():  # every test starts from empty streams
        await js.delete_stream(str(stream.config.name))
    yield client
    await client.close()


def _tick(product: str, seq: int) -> Tick:
    return Tick(
        product=product, seq=seq, trade_id=seq // 3, time="2026-11-28T15:00:00.000001Z",
        recv_ns=seq, price=f"{1000 + seq % 97}.{seq % 100:02d}", size="0.01000000", side="buy",
        bid="999.99", bid_size="1.5", ask="1000.01", ask_size="2.25", open_24h="990.00",
        high_24h="1100.00", low_24h="900.00", volume_24h="12345.67800000",
    )  # fmt: skip


async def _publish(nc: NATS, url: str, ticks: list[Tick], pause_every: int = 0) -> None:
    settings = CommonSettings(nats_urls=[url])
    publisher = broker.Publisher(nc, settings)
    await broker.ensure_streams(publisher.js, settings)
    for start in range(0, len(ticks), 200):
        pending = [
            await publisher.publish(TICKS_STREAM, tick_subject(t.product, 4), encode_tick(t))
            for t in ticks[start : start + 200]
        ]
        await publisher.wait(pending)
        if pause_every:
            await asyncio.sleep(0.05)


def _histogram(port: int, name: str) -> dict[float, float]:
    """Cumulative bucket counts of a histogram on a service's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        float(sample.labels["le"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == f"{name}_bucket"
    }


def _env(stack: DevStack, table: str, bucket: str, **extra: str) -> dict[str, str]:
    return {
        **stack.env(),
        "DDB_TABLE": table,
        "S3_BUCKET": bucket,
        "METRICS_PORT": "0",
        "SNAPSHOT_PERIOD_MS": "300",
        **extra,
    }


async def _table(stack: DevStack, table: str) -> dict[str, dict[str, Any]]:
    async with _ddb(stack) as ddb:
        items: dict[str, dict[str, Any]] = {}
        paginator = ddb.get_paginator("scan")
        async for page in paginator.paginate(TableName=table, ConsistentRead=True):
            for item in page["Items"]:
                items[item["product"]["S"]] = json.loads(item["tick"]["S"])
        return items


def _ddb(stack: DevStack) -> Any:
    return stack_client(stack.env(), "dynamodb")


def _s3(stack: DevStack) -> Any:
    return stack_client(stack.env(), "s3")


async def _truth(nc: NATS) -> dict[str, dict[str, Any]]:
    return {p: json.loads(s.data) for p, s in (await load_last_ticks(nc.jetstream())).items()}


def _tool(command: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "services.snapshotter", command, *args],
        cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip


async def test_out_of_order_duplicates_and_two_replicas_leave_the_newest_tick(
    own_stack: DevStack, nc: NATS, service_logs: Path, spawn: list[ServiceProcess]
) -> None:
    """Shuffled and duplicated ticks, written concurrently by two snapshotters into one
    table: every product ends with exactly its highest-seq tick (conditional writes)."""
    rng = random.Random(5)
    ticks = [_tick(p, s) for p in PRODUCTS for s in rng.sample(range(1, 5000), 150)]
    ticks += rng.sample(ticks, 300)
    rng.shuffle(ticks)
    await _publish(nc, own_stack.nats.url, ticks)
    table, bucket = f"t-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    metrics_port = free_port()
    for durable, port in (("replica-a", str(metrics_port)), ("replica-b", "0")):
        env = _env(own_stack, table, bucket, SNAPSHOTTER_DURABLE=durable, METRICS_PORT=port)
        proc = ServiceProcess("snapshotter", env, service_logs)
        spawn.append(proc.start())
        await proc.wait_for_event("snapshotter_started", timeout=60)
    js = nc.jetstream()
    for durable in ("replica-a", "replica-b"):
        await wait_consumer_idle(js, TICKS_STREAM, durable, timeout=90)
    newest = {p: max((t for t in ticks if t.product == p), key=lambda t: t.seq) for p in PRODUCTS}
    stored = await _table(own_stack, table)
    assert stored == {p: json.loads(encode_tick(t)) for p, t in newest.items()}
    # state lag: one observation per product written, now - recv_ns (these ticks say they
    # were received in 1970, so every one is past the last finite bucket)
    buckets = await asyncio.to_thread(
        _histogram, metrics_port, "ledgerflux_snapshotter_state_lag_seconds"
    )
    assert buckets[float("inf")] >= len(PRODUCTS)
    assert buckets[300.0] == 0, buckets
    for proc in spawn:
        assert await proc.terminate() == 0, proc.tail()


async def test_kill_9_then_restart_converges_and_restore_rebuilds_exactly(
    own_stack: DevStack, nc: NATS, service_logs: Path, spawn: list[ServiceProcess]
) -> None:
    """kill -9 mid-stream, restart: the table equals the stream's last tick per product.
    Snapshots are well formed, the pointer names an existing object; wiping the table and
    restoring from an early (mid-stream) snapshot plus replay gives zero differences."""
    table, bucket = f"t-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    env = _env(own_stack, table, bucket, FETCH_BATCH="300")
    ticks = [_tick(p, s) for s in range(1, 400) for p in PRODUCTS]
    first = ServiceProcess("snapshotter", env, service_logs)
    spawn.append(first.start())
    await first.wait_for_event("snapshotter_started", timeout=60)
    feeder = asyncio.create_task(_publish(nc, own_stack.nats.url, ticks, pause_every=1))
    await first.wait_for_event("snapshot_written", timeout=60)
    first.kill()
    await feeder
    second = ServiceProcess("snapshotter", env, service_logs)
    spawn.append(second.start())
    await wait_consumer_idle(nc.jetstream(), TICKS_STREAM, "snapshotter", timeout=90)
    truth = await _truth(nc)
    assert await _table(own_stack, table) == truth
    await asyncio.sleep(1.0)  # let a snapshot cover the end of the stream
    assert await second.terminate() == 0

    async with _s3(own_stack) as s3:
        pointer = json.loads(
            await (await s3.get_object(Bucket=bucket, Key="snapshots/latest.json"))["Body"].read()
        )
        latest_obj = await (await s3.get_object(Bucket=bucket, Key=pointer["key"]))["Body"].read()
        listing = await s3.list_objects_v2(Bucket=bucket, Prefix="snapshots/")
    keys = sorted(o["Key"] for o in listing["Contents"] if o["Key"].endswith(".json.gz"))
    assert latest_obj[:2] == b"\x1f\x8b", "snapshot objects are gzip"
    snapshot = parse_snapshot(latest_obj)  # schema: unknown or missing fields fail here
    assert snapshot.stream == TICKS_STREAM and snapshot.num_shards == 4
    assert snapshot.shards == [0, 1, 2, 3]
    assert pointer["stream_seq"] == snapshot.stream_seq
    assert {p: json.loads(encode_tick(t)) for p, t in snapshot.products.items()} == truth
    assert len(keys) >= 2 and pointer["key"] == keys[-1]

    assert _tool("verify", env).returncode == 0
    early = keys[0]  # taken while the feed was still running
    async with _s3(own_stack) as s3:
        early_snapshot = parse_snapshot(
            await (await s3.get_object(Bucket=bucket, Key=early))["Body"].read()
        )
    assert (
        early_snapshot.stream_seq < (await nc.jetstream().stream_info(TICKS_STREAM)).state.last_seq
    )
    restored = _tool("restore", env, "--snapshot", early)
    assert restored.returncode == 0, restored.stderr
    assert "replaying MD_TICKS" in restored.stderr  # the progress line
    assert await _table(own_stack, table) == truth
    verified = _tool("verify", env, "--snapshot", early)
    assert verified.returncode == 0, verified.stdout
    assert "0 difference(s)" in verified.stdout


async def test_dynamodb_and_s3_outages_lose_nothing_and_snapshots_resume(
    own_stack: DevStack, nc: NATS, service_logs: Path, spawn: list[ServiceProcess]
) -> None:
    """DynamoDB Local stopped for a while, then S3: the process stays up, stops acking,
    catches up when each is back; snapshots resume and the pointer never dangles."""
    table, bucket = f"t-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    proc = ServiceProcess("snapshotter", _env(own_stack, table, bucket), service_logs)
    spawn.append(proc.start())
    await proc.wait_for_event("snapshotter_started", timeout=60)
    url = own_stack.nats.url
    await _publish(nc, url, [_tick(p, 1) for p in PRODUCTS])
    await proc.wait_for_event("snapshot_written", timeout=30)

    own_stack.dynamodb.stop()
    await _publish(nc, url, [_tick(p, s) for s in range(2, 60) for p in PRODUCTS])
    await asyncio.sleep(2.0)
    assert proc.proc is not None and proc.proc.poll() is None, "died while DynamoDB was down"
    info = await nc.jetstream().consumer_info(TICKS_STREAM, "snapshotter")
    assert info.num_ack_pending > 0 or info.num_pending > 0, "acked without DynamoDB"
    own_stack.dynamodb.start()
    await wait_consumer_idle(nc.jetstream(), TICKS_STREAM, "snapshotter", timeout=90)
    assert await _table(own_stack, table) == await _truth(nc)

    own_stack.s3.stop()
    await _publish(nc, url, [_tick(p, s) for s in range(60, 90) for p in PRODUCTS])
    await asyncio.sleep(3.0)
    own_stack.s3.start()
    deadline = time.monotonic() + 30
    async with _s3(own_stack) as s3:
        while True:
            pointer = json.loads(
                await (await s3.get_object(Bucket=bucket, Key="snapshots/latest.json"))[
                    "Body"
                ].read()
            )
            head = await s3.head_object(Bucket=bucket, Key=pointer["key"])  # never dangling
            assert head["ContentLength"] > 0
            if (
                pointer["stream_seq"]
                == (await nc.jetstream().stream_info(TICKS_STREAM)).state.last_seq
            ):
                break
            assert time.monotonic() < deadline, "snapshots did not resume after S3 came back"
            await asyncio.sleep(0.3)
    assert await _table(own_stack, table) == await _truth(nc)
    events = [e.get("event") for e in proc.events()]
    assert "snapshot_failed" in events, (proc.log_path, events[-30:])
    assert any(e.get("event") == "ddb_write_retry" for e in proc.events())
    assert await proc.terminate() == 0


async def test_started_before_dynamodb_and_s3_it_waits_then_catches_up(
    own_stack: DevStack, nc: NATS, service_logs: Path, spawn: list[ServiceProcess]
) -> None:
    """Started while DynamoDB and S3 are down (compose bringing them up after it, or a
    restart): the snapshotter waits for them, saying so, instead of exiting; once they are
    up it starts, and the table and snapshots hold every tick published meanwhile."""
    table, bucket = f"t-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    own_stack.dynamodb.stop()
    own_stack.s3.stop()
    try:
        proc = ServiceProcess("snapshotter", _env(own_stack, table, bucket), service_logs)
        spawn.append(proc.start())
        await proc.wait_for_event("ddb_not_ready", timeout=60)
        await _publish(
            nc, own_stack.nats.url, [_tick(p, s) for s in range(1, 30) for p in PRODUCTS]
        )
        await proc.wait_for_event("ddb_not_ready", timeout=30)
        assert proc.proc is not None and proc.proc.poll() is None, proc.tail()
    finally:
        own_stack.dynamodb.start()
        own_stack.s3.start()
    await proc.wait_for_event("snapshotter_started", timeout=60)
    await wait_consumer_idle(nc.jetstream(), TICKS_STREAM, "snapshotter", timeout=90)
    assert await _table(own_stack, table) == await _truth(nc)
    last_seq = (await nc.jetstream().stream_info(TICKS_STREAM)).state.last_seq
    deadline = time.monotonic() + 30
    async with _s3(own_stack) as s3:
        while True:
            with contextlib.suppress(s3.exceptions.NoSuchKey, s3.exceptions.NoSuchBucket):
                body = await (await s3.get_object(Bucket=bucket, Key="snapshots/latest.json"))[
                    "Body"
                ].read()
                if json.loads(body)["stream_seq"] == last_seq:
                    break
            assert time.monotonic() < deadline, "no snapshot after S3 came up"
            await asyncio.sleep(0.3)
    assert await proc.terminate() == 0


@pytest.mark.parametrize("items_per_call", [1, 3, 100])
async def test_writer_settles_stale_items_and_writes_the_rest(
    own_stack: DevStack, items_per_call: int
) -> None:
    """A transaction with some not-newer items is cancelled as a whole: the writer settles
    those (``not_newer``) and writes the others in a retry, whatever the call size."""
    from services.snapshotter import metrics
    from services.snapshotter.ddb import LatestTick, LatestWriter, ensure_table

    table = f"writer-{items_per_call}-{uuid.uuid4().hex[:6]}"

    def item(product: str, seq: int) -> LatestTick:
        return LatestTick(product, seq, json.dumps({"seq": seq}), "1.5", "t", seq)

    async with _ddb(own_stack) as ddb:
        await ensure_table(ddb, table, create=True)
        writer = LatestWriter(ddb, table, max_concurrency=4, items_per_call=items_per_call)
        stop = asyncio.Event()
        assert await writer.write_all([item("A", 10), item("B", 10)], stop)
        not_newer = metrics.DDB_WRITES.labels(outcome="not_newer")
        before = not_newer._value.get()
        # A older, B equal (both must not overwrite), C..F new
        batch = [item("A", 5), item("C", 1), item("B", 10), *(item(p, 2) for p in "DEF")]
        assert await writer.write_all(batch, stop)
        assert not_newer._value.get() - before == 2
    stored = await _table(own_stack, table)
    assert {p: t["seq"] for p, t in stored.items()} == {
        "A": 10, "B": 10, "C": 1, "D": 2, "E": 2, "F": 2,
    }  # fmt: skip


async def test_stored_data_it_did_not_write_is_skipped_or_one_line_never_a_crash(
    own_stack: DevStack, nc: NATS
) -> None:
    """Data in the stores that this code did not write, met where it crashed or spread:
    - DynamoDB items without a tick, with a tick that is not JSON, or whose seq is not their
      tick's: skipped and counted by read_latest (the snapshotter crash-looped at start, or
      copied the text verbatim into every snapshot, which then broke restore);
    - a message on MD_TICKS that is not a tick: restore skips and reports it (it had wiped
      the table first, then died, and every rerun died the same way);
    - a snapshot pointer or object that is garbage: restore says so in one line, exit 1
      (a traceback)."""
    from services.snapshotter.ddb import ensure_table, read_latest

    table, bucket = f"t-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    good = _tick("GOOD-USD", 7)
    async with _ddb(own_stack) as ddb:
        await ensure_table(ddb, table, create=True)
        good_json = {"S": encode_tick(good).decode()}
        items = [
            {"product": {"S": "GOOD-USD"}, "seq": {"N": "7"}, "tick": good_json},
            {"product": {"S": "NOTICK-USD"}, "seq": {"N": "3"}},
            {"product": {"S": "TEXT-USD"}, "seq": {"N": "3"}, "tick": {"S": "not json"}},
            {"product": {"S": "OTHER-USD"}, "seq": {"N": "99"}, "tick": good_json},
        ]
        for item in items:
            await ddb.put_item(TableName=table, Item=item)
        before = local_value("ledgerflux_snapshotter_errors_total", kind="bad_ddb_item")
        latest = await read_latest(ddb, table)
    assert list(latest) == ["GOOD-USD"] and latest["GOOD-USD"].seq == 7
    assert local_value("ledgerflux_snapshotter_errors_total", kind="bad_ddb_item") - before == 3

    await _publish(nc, own_stack.nats.url, [_tick(p, s) for p in PRODUCTS for s in (1, 2)])
    await nc.jetstream().publish(tick_subject("BAD-USD", 4), b"this is not a tick")
    async with _s3(own_stack) as s3:
        await s3.create_bucket(Bucket=bucket)
    restored = _tool("restore", _env(own_stack, f"r-{table}", bucket))
    assert restored.returncode == 0, restored.stderr
    assert "skipped 1 message(s) on MD_TICKS that are not canonical ticks" in restored.stderr
    truth = await _truth(nc)
    assert await _table(own_stack, f"r-{table}") == truth

    async with _s3(own_stack) as s3:
        await s3.put_object(Bucket=bucket, Key="snapshots/latest.json", Body=b"<html>")
        await s3.put_object(Bucket=bucket, Key="snapshots/x.json.gz", Body=b"\x1f\x8bnot gzip")
    for args, says in (
        ((), "snapshots/latest.json is not a valid snapshot object"),
        (("--snapshot", "snapshots/x.json.gz"), "snapshots/x.json.gz is not a valid snapshot"),
    ):
        done = _tool("restore", _env(own_stack, table, bucket), *args)
        assert done.returncode == 1 and says in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
