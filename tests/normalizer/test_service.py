"""The normalizer as a real process against a real nats-server: crash recovery and shards."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from pathlib import Path

import nats
import orjson
import pytest
from nats.aio.client import Client as NATS

from services.common import broker
from services.common.settings import CommonSettings
from services.common.subjects import RAW_STREAM, TICKS_STREAM, raw_subject
from services.devstack.servers import NatsServer
from tests.support.frames import ticker
from tests.support.procs import ServiceProcess
from tests.support.streams import read_all, wait_consumer_idle

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PRODUCTS = ["BTC-USD", "ETH-USD", "SOL-USD", "DOGE-USD", "ADA-USD", "XRP-EUR", "LTC-GBP"]


async def _publish_raw(nc: NATS, url: str, frames: list[tuple[str, int]]) -> None:
    settings = CommonSettings(nats_urls=[url])
    publisher = broker.Publisher(nc, settings)
    await broker.ensure_streams(publisher.js, settings)
    pending = [
        await publisher.publish(
            RAW_STREAM, raw_subject(p), ticker(p, s), headers={"Ledgerflux-Recv-Ns": str(s)}
        )
        for p, s in frames
    ]
    await publisher.wait(pending)


def _frames(n: int, seed: int) -> list[tuple[str, int]]:
    """Per-product increasing sequences with gaps, interleaved, with some repeats."""
    rng = random.Random(seed)
    seqs = {p: rng.randint(1_000, 9_000) for p in PRODUCTS}
    frames = []
    for _ in range(n):
        product = rng.choice(PRODUCTS)
        seqs[product] += rng.randint(1, 40)
        frames.append((product, seqs[product]))
        if rng.random() < 0.05:
            frames.append((product, seqs[product]))  # a duplicate, as a replay would send
    return frames


def _by_product(messages: list[tuple[str, bytes]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for _subject, data in messages:
        tick = orjson.loads(data)
        out[tick["product"]].append(tick["seq"])
    return dict(out)


async def test_kill_9_mid_stream_then_restart_emits_every_tick_once_in_order(
    nats_server: NatsServer, service_logs: Path, spawn: list[ServiceProcess]
) -> None:
    """SIGKILL while frames flow, restart: MD_TICKS holds every expected tick exactly once,
    per product in order (state recovered from the stream, acks only after publish)."""
    nc = await nats.connect(nats_server.url)
    frames = _frames(6000, seed=3)
    env = {"NATS_URLS": nats_server.url, "METRICS_PORT": "0", "FETCH_BATCH": "200"}
    first = ServiceProcess("normalizer", env, service_logs)
    spawn.append(first.start())
    await first.wait_for_event("normalizer_started")
    feeder = asyncio.create_task(_publish_raw(nc, nats_server.url, frames))
    js = nc.jetstream()
    while (await js.stream_info(TICKS_STREAM)).state.messages < 300:
        await asyncio.sleep(0.02)
    first.kill()
    await feeder
    second = ServiceProcess("normalizer", env, service_logs)
    spawn.append(second.start())
    await wait_consumer_idle(js, RAW_STREAM, "normalizer", timeout=60)

    expected: dict[str, list[int]] = defaultdict(list)
    for product, seq in frames:
        if not expected[product] or seq > expected[product][-1]:
            expected[product].append(seq)
    got = _by_product(await read_all(js, TICKS_STREAM))
    problems = {
        p: {
            "missing": sorted(set(expected[p]) - set(got.get(p, []))),
            "extra": sorted(set(got.get(p, [])) - set(expected[p])),
            "in_order_once": got.get(p) == sorted(set(got.get(p, []))),
        }
        for p in expected
        if got.get(p) != expected[p]
    }
    assert not problems, problems
    recovered = await second.wait_for_event("sequence_state_recovered")
    assert recovered["products"] > 0, "the restart did not start from the stream's state"
    assert await second.terminate() == 0
    await nc.close()


async def test_two_replicas_with_split_shards_produce_what_one_replica_does(
    tmp_path: Path, service_logs: Path, spawn: list[ServiceProcess]
) -> None:
    """Shards 0,1 + shards 2,3 on one server give the same ticks (bytes) as one replica
    owning all shards on another, each product in order, nothing twice."""
    frames = _frames(3000, seed=8)
    results: list[dict[str, list[bytes]]] = []
    for layout in (["0,1", "2,3"], [None]):
        server = NatsServer.on_free_ports(tmp_path / f"nats-{len(results)}")
        server.start()
        try:
            nc = await nats.connect(server.url)
            await _publish_raw(nc, server.url, frames)
            durables = []
            for shards in layout:
                env = {"NATS_URLS": server.url, "METRICS_PORT": "0"}
                if shards:
                    env["NORMALIZER_SHARDS"] = shards
                proc = ServiceProcess("normalizer", env, service_logs)
                spawn.append(proc.start())
                started = await proc.wait_for_event("normalizer_started")
                durables.append(started["durable"])
            js = nc.jetstream()
            for durable in durables:
                await wait_consumer_idle(js, RAW_STREAM, durable, timeout=60)
            per_product: dict[str, list[bytes]] = defaultdict(list)
            for _subject, data in await read_all(js, TICKS_STREAM):
                per_product[orjson.loads(data)["product"]].append(data)
            results.append(dict(per_product))
            await nc.close()
        finally:
            for proc in spawn:
                proc.kill()
            spawn.clear()
            server.stop()
    split, single = results
    assert split == single
    assert set(single) == set(PRODUCTS)
    for ticks in single.values():
        seqs = [orjson.loads(t)["seq"] for t in ticks]
        assert seqs == sorted(set(seqs))
