"""Scenario 3: DynamoDB Local and the S3 server each stopped mid-stream and restarted;
nothing may be acked early or lost, DynamoDB and the snapshots catch up (issue #10).

Both servers are this test's own (the session's stack serves the other tests)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from services.common.subjects import TICKS_STREAM
from services.devstack.ports import free_port
from services.devstack.servers import (
    DEFAULT_ACCESS_KEY,
    DEFAULT_SECRET_KEY,
    DynamoDBLocal,
    NatsServer,
    SeaweedPorts,
    SeaweedS3,
)
from services.devstack.stack import AWS_REGION
from tests.chaos.harness import FeedSpec, Pipeline, StoreEnv, log, outage, start_server
from tests.chaos.runner import assert_clean, run_scenario
from tests.support.procs import REPO

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

SEED = 3003


async def _outages(
    name: str, feed: FeedSpec, down_s: float, nats: NatsServer, workdir: Path
) -> None:
    ddb = DynamoDBLocal(
        workdir / "dynamodb", free_port(), tools_dir=REPO / ".devstack" / "tools" / "dynamodb"
    )
    s3 = SeaweedS3(workdir / "s3", SeaweedPorts.free())
    feed_s = feed.ticks / feed.rate
    try:
        await asyncio.gather(start_server(ddb), start_server(s3))
        store = StoreEnv(
            {
                "DDB_ENDPOINT_URL": ddb.endpoint_url,
                "S3_ENDPOINT_URL": s3.endpoint_url,
                "AWS_ACCESS_KEY_ID": DEFAULT_ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": DEFAULT_SECRET_KEY,
                "AWS_REGION": AWS_REGION,
            },
            "chaos-outages",
            "chaos-outages",
        )

        seen: list[Pipeline] = []

        async def inject(pipe: Pipeline) -> None:
            seen.append(pipe)

            async def unacked() -> int | None:
                # nothing may be acked while DynamoDB is away: the snapshotter holds the ticks
                return await pipe.consumer_lag(TICKS_STREAM, "snapshotter")

            await asyncio.sleep(max(0.0, pipe.feed_started_at + 0.15 * feed_s - time.monotonic()))
            held = await outage(ddb, down_s, kill=False, label=name, midway=unacked)
            pipe.notes.append(f"dynamodb {held}")
            if not held["midway"]:
                pipe.notes.append("NO TICK HELD while DynamoDB was down: acked early?")
            await asyncio.sleep(max(0.0, pipe.feed_started_at + 0.55 * feed_s - time.monotonic()))
            pipe.notes.append(f"s3 {await outage(s3, down_s, kill=False, label=name)}")

        log(f"{name}: seed {feed.seed}, each store down {down_s:g}s")
        ledger = await run_scenario(
            name, feed, nats_urls=[nats.url], store=store, workdir=workdir, inject=inject
        )
    finally:
        s3.terminate()
        ddb.terminate()
        s3.wait_stopped()
        ddb.wait_stopped()
    snapshotter = seen[0].services["snapshotter"]
    retries = len(snapshotter.events("ddb_write_retry"))
    failed = len(snapshotter.events("snapshot_failed"))
    log(f"{name}: the snapshotter logged {retries} ddb_write_retry, {failed} snapshot_failed")
    assert retries and failed, "the outages never reached the snapshotter"
    assert not any("NO TICK HELD" in note for note in ledger.context.get("notes", [])), (
        ledger.table()
    )
    assert_clean(ledger)


@pytest.mark.chaos_fast
@pytest.mark.timeout(240)
async def test_dynamodb_and_s3_outages_fast(nats_server: NatsServer, workdir: Path) -> None:
    """DynamoDB Local stopped for 4 s, later the S3 server for 4 s, during a 15k-tick feed:
    nothing lost, DynamoDB ends on the stream's last ticks, snapshots resume."""
    feed = FeedSpec(ticks=15_000, rate=1_000, seed=SEED)
    await _outages("outages_fast", feed, 4.0, nats_server, workdir)


@pytest.mark.timeout(480)
async def test_dynamodb_and_s3_outages_30s(nats_server: NatsServer, workdir: Path) -> None:
    """DynamoDB Local stopped for 30 s, later the S3 server for 30 s, during a 90k-tick feed."""
    feed = FeedSpec(ticks=90_000, rate=1_000, seed=SEED + 1)
    await _outages("outages_full", feed, 30.0, nats_server, workdir)
