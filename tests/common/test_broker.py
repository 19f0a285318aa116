"""The broker abstraction against a real nats-server with JetStream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS
from structlog.testing import capture_logs

from services.common import broker
from services.common.errors import BrokerError, ShardCountMismatchError
from services.common.settings import CommonSettings
from services.common.subjects import DLQ_STREAM, RAW_STREAM, TICKS_STREAM
from services.devstack.ports import free_port
from services.devstack.servers import NatsServer
from tests.support.metrics import local_value
from tests.support.procs import run_to_exit

pytestmark = pytest.mark.integration


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


def settings_for(server: NatsServer, **overrides: object) -> CommonSettings:
    return CommonSettings(nats_urls=[server.url], **overrides)  # type: ignore[arg-type]


async def test_stream_creation_is_idempotent(nats_server: NatsServer, nc: NATS) -> None:
    """ensure_streams twice leaves the three streams as configured, and applies a change."""
    js = nc.jetstream()
    settings = settings_for(nats_server)
    await broker.ensure_streams(js, settings)
    await broker.ensure_streams(js, settings)
    names = {info.config.name for info in await js.streams_info()}
    assert names == {RAW_STREAM, TICKS_STREAM, DLQ_STREAM}
    raw = await js.stream_info(RAW_STREAM)
    assert raw.config.subjects == ["md.raw.>"]
    assert raw.config.duplicate_window == pytest.approx(120)

    changed = settings_for(nats_server, raw_max_age_s=3600)
    await broker.ensure_streams(js, changed)
    assert (await js.stream_info(RAW_STREAM)).config.max_age == pytest.approx(3600)


async def test_repeated_msg_id_is_stored_once(nats_server: NatsServer, nc: NATS) -> None:
    """Two publishes with one Nats-Msg-Id: one stored message, the second ack is a duplicate."""
    settings = settings_for(nats_server)
    publisher = broker.Publisher(nc, settings)
    await broker.ensure_streams(publisher.js, settings)
    first = await publisher.publish(RAW_STREAM, "md.raw.coinbase.BTC-USD", b"{}", msg_id="m-1")
    second = await publisher.publish(RAW_STREAM, "md.raw.coinbase.BTC-USD", b"{}", msg_id="m-1")
    third = await publisher.publish(RAW_STREAM, "md.raw.coinbase.BTC-USD", b"{}", msg_id="m-2")
    acks = await publisher.wait([first, second, third])
    assert [bool(ack.duplicate) for ack in acks] == [False, True, False]
    assert (await publisher.js.stream_info(RAW_STREAM)).state.messages == 2


async def test_publisher_pipelines_a_window(nats_server: NatsServer, nc: NATS) -> None:
    """Thousands of publishes in flight resolve together, all stored, in order."""
    settings = settings_for(nats_server, publish_max_in_flight=256)
    publisher = broker.Publisher(nc, settings)
    await broker.ensure_streams(publisher.js, settings)
    pending = [
        await publisher.publish(
            RAW_STREAM, "md.raw.coinbase.ETH-USD", str(i).encode(), msg_id=f"e{i}"
        )
        for i in range(2000)
    ]
    acks = await publisher.wait(pending)
    assert [ack.seq for ack in acks] == list(range(1, 2001))
    await broker.ensure_durable(
        publisher.js, stream=RAW_STREAM, durable="check", filter_subjects=["md.raw.>"]
    )
    sub = await publisher.js.pull_subscribe_bind(durable="check", stream=RAW_STREAM)
    msgs = await broker.fetch_batch(sub, 2000, 2.0)
    assert [int(m.data) for m in msgs] == list(range(len(msgs)))
    # the ack-subject shortcut agrees with nats-py's full metadata parse
    shortcut = [broker.ack_subject_sequences(m.reply) for m in msgs]
    assert [stream for stream, _ in shortcut] == [m.metadata.sequence.stream for m in msgs]
    assert [consumer for _, consumer in shortcut] == [m.metadata.sequence.consumer for m in msgs]
    assert shortcut[-1][0] == len(msgs)


async def test_publish_to_a_missing_stream_fails_loudly(nats_server: NatsServer, nc: NATS) -> None:
    """A publish nobody stores raises instead of being counted as durable."""
    publisher = broker.Publisher(nc, settings_for(nats_server, publish_ack_timeout_s=1.0))
    pending = await publisher.publish(RAW_STREAM, "nowhere.at.all", b"x")
    with pytest.raises(BrokerError):
        await publisher.wait([pending])


async def test_publisher_headers_duplicates_and_rejections(
    nats_server: NatsServer, nc: NATS
) -> None:
    """Headers arrive as sent (a CR/LF in a value cannot end the header block), a repeated
    Nats-Msg-Id is acked as a duplicate, and a publish the stream rejects raises."""
    settings = settings_for(nats_server)
    publisher = broker.Publisher(nc, settings)
    await broker.ensure_streams(publisher.js, settings)
    subject = "md.raw.coinbase.XRP-USD"
    error_text = "line 1\nline 2\r\nPUB injected 1"
    first = await publisher.publish(
        RAW_STREAM, subject, b"1", msg_id="m1", headers={"Ledgerflux-Dlq-Error": error_text}
    )
    (ack,) = await publisher.wait([first])
    assert (ack.stream, ack.duplicate) == (RAW_STREAM, False)
    stored = await publisher.js.get_msg(RAW_STREAM, ack.seq)
    assert stored.data == b"1"
    assert stored.headers is not None
    assert stored.headers["Nats-Msg-Id"] == "m1"
    assert stored.headers["Ledgerflux-Dlq-Error"] == "line 1 line 2  PUB injected 1"
    again = await publisher.publish(RAW_STREAM, subject, b"1", msg_id="m1")
    assert (await publisher.wait([again]))[0].duplicate
    rejected = await publisher.publish(
        RAW_STREAM, subject, b"2", headers={"Nats-Expected-Stream": "ANOTHER"}
    )
    with pytest.raises(BrokerError, match=r"BadRequestError.*expected stream does not match"):
        await publisher.wait([rejected])
    assert publisher.in_flight() == 0


async def test_close_with_the_server_gone_and_data_buffered(nats_server: NatsServer) -> None:
    """A service stopping while nats-server is gone, with publishes buffered for the
    reconnect, closes without raising (nats-py flushed its buffer into the lost transport,
    and every service stopped that way ended with exit 1 and an error traceback)."""
    settings = settings_for(nats_server)
    client = await broker.connect(settings, name="close-test")
    nats_server.kill()
    while not client.is_reconnecting:
        await asyncio.sleep(0.01)
    await client.publish("md.raw.coinbase.BTC-USD", b"{}")  # buffered for the reconnect
    with capture_logs() as logs:
        await broker.close(client, timeout_s=1.0)
    assert client.is_closed
    events = [entry["event"] for entry in logs]
    assert events == ["nats_drain_incomplete", "nats_closed_unreachable"], logs


async def test_consumer_lag_that_cannot_be_read_is_counted_and_logged_once(
    nats_server: NatsServer, nc: NATS
) -> None:
    """A consumer whose state cannot be read (here: it does not exist): every failed read
    is counted, the first logged, and the lag's update time stands still. (Failures were
    debug lines only while the lag gauge kept its last value.)"""
    settings = settings_for(nats_server)
    js = nc.jetstream()
    await broker.ensure_streams(js, settings)
    labels = {"stream": RAW_STREAM, "consumer": "nobody"}
    errors = "ledgerflux_consumer_info_errors_total"
    before = local_value(errors, **labels)
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(
            broker.report_consumer_lag(js, RAW_STREAM, "nobody", stop, period_s=0.05)
        )
        while local_value(errors, **labels) < before + 3:
            await asyncio.sleep(0.02)
        stop.set()
        await task
    assert [e["event"] for e in logs].count("consumer_info_failed") == 1
    assert local_value("ledgerflux_consumer_lag_updated_timestamp_seconds", **labels) == 0


async def test_another_num_shards_than_md_ticks_was_sharded_with_is_refused(
    nats_server: NatsServer, nc: NATS
) -> None:
    """MD_TICKS records its NUM_SHARDS: a service with another one is an operator error,
    one line and exit 2. (A gateway with NUM_SHARDS=8 against ticks sharded by 4 backfilled
    nothing for some products, and a sharded snapshotter missed them, without a word.)"""
    js = nc.jetstream()
    await broker.ensure_streams(js, settings_for(nats_server, num_shards=4))
    with pytest.raises(ShardCountMismatchError, match="NUM_SHARDS=8, but MD_TICKS is sharded by 4"):
        await broker.ensure_streams(js, settings_for(nats_server, num_shards=8))
    await broker.ensure_streams(js, settings_for(nats_server, num_shards=4))  # agreeing: fine

    done = run_to_exit(
        "gateway", {"NATS_URLS": nats_server.url, "NUM_SHARDS": "8", "METRICS_PORT": "0",
                    "GATEWAY_PORT": str(free_port())},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert '"event": "config_mismatch"' in done.stderr and "Traceback" not in done.stderr
