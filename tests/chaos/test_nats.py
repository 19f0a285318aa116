"""Scenario 2: NATS goes away mid-stream. One nats-server (file storage) killed with
SIGKILL and restarted on its data; then a 3-node JetStream cluster, streams with three
replicas, losing a node and getting it back while every service is connected to the
cluster's URL list (issue #10)."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest

from services.common.subjects import TICKS_STREAM
from services.devstack.servers import NatsServer
from tests.chaos.harness import (
    ClusterNode,
    FeedSpec,
    Pipeline,
    StoreEnv,
    log,
    nats_cluster,
    node_serving,
    outage,
    wait_meta_leader,
)
from tests.chaos.runner import assert_clean, run_scenario

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

SEED = 2002


async def _at(pipe: Pipeline, seconds: float) -> None:
    """Sleep until ``seconds`` after the feed started."""
    await asyncio.sleep(max(0.0, pipe.feed_started_at + seconds - time.monotonic()))


async def _single(
    name: str, feed: FeedSpec, outages: list[tuple[float, float]], nats_server: NatsServer,
    store: StoreEnv, workdir: Path,
) -> None:  # fmt: skip
    async def inject(pipe: Pipeline) -> None:
        for at, seconds in outages:
            await _at(pipe, at)
            pipe.notes.append(str(await outage(nats_server, seconds, kill=True, label=name)))

    ledger = await run_scenario(
        name, feed, nats_urls=[nats_server.url], store=store, workdir=workdir, inject=inject
    )
    assert_clean(ledger)


@pytest.mark.chaos_fast
@pytest.mark.timeout(240)
async def test_nats_killed_and_restarted_fast(
    nats_server: NatsServer, chaos_store: StoreEnv, workdir: Path
) -> None:
    """nats-server killed with SIGKILL for 3 s mid-stream and restarted on its file store:
    every frame received meanwhile is stored once, nothing is lost downstream."""
    feed = FeedSpec(ticks=10_000, rate=1_000, seed=SEED)
    await _single("nats_restart_fast", feed, [(4.0, 3.0)], nats_server, chaos_store, workdir)


@pytest.mark.timeout(480)
async def test_nats_killed_and_restarted_twice(
    nats_server: NatsServer, chaos_store: StoreEnv, workdir: Path
) -> None:
    """nats-server killed with SIGKILL twice (8 s, then 5 s down) during a 40k-tick feed."""
    feed = FeedSpec(ticks=40_000, rate=1_000, seed=SEED + 1)
    await _single(
        "nats_restart_full", feed, [(8.0, 8.0), (24.0, 5.0)], nats_server, chaos_store, workdir
    )


async def _stream_leader(pipe: Pipeline, stream: str) -> str | None:
    try:
        info = await pipe.js.stream_info(stream)
    except Exception:  # noqa: BLE001 - mid-election
        return None
    return info.cluster.leader if info.cluster else None


async def _cluster(
    name: str, seed: int, feed: FeedSpec, losses: list[tuple[float, float]], store: StoreEnv,
    workdir: Path,
) -> None:  # fmt: skip
    nodes = nats_cluster(workdir / "nats")
    rng = random.Random(seed)
    try:
        for node in nodes:
            node.launch()
        await asyncio.gather(*(asyncio.to_thread(n.wait_ready) for n in nodes))
        log(f"{name}: cluster up, meta leader {await wait_meta_leader(nodes)}")

        async def inject(pipe: Pipeline) -> None:
            for index, (at, seconds) in enumerate(losses):
                await _at(pipe, at)
                # the first loss takes the MD_TICKS leader, the next the gateway's node (its
                # reconnect path), else a node picked by the seed
                leader = await _stream_leader(pipe, TICKS_STREAM)
                gateway_node = await node_serving(nodes, "ledgerflux-gateway")
                victim: ClusterNode = (
                    next((n for n in nodes if n.node_name == leader), None)
                    if index == 0
                    else gateway_node
                ) or rng.choice(nodes)
                served = gateway_node.node_name if gateway_node else None
                pipe.notes.append(
                    f"lost {victim.node_name} (MD_TICKS leader {leader}, gateway on {served}): "
                    + str(await outage(victim, seconds, kill=True, label=name))
                )
                await wait_meta_leader(nodes)

        ledger = await run_scenario(
            name, feed, nats_urls=[n.url for n in nodes], store=store, workdir=workdir,
            inject=inject, replicas=3,
        )  # fmt: skip
    finally:
        for node in nodes:
            node.stop()
    assert_clean(ledger)


@pytest.mark.chaos_fast
@pytest.mark.timeout(300)
async def test_cluster_loses_a_node_fast(chaos_store: StoreEnv, workdir: Path) -> None:
    """A 3-node JetStream cluster (replicas 3) loses the MD_TICKS leader for 5 s mid-stream
    and gets it back: nothing lost, every store converges."""
    feed = FeedSpec(ticks=10_000, rate=1_000, seed=SEED + 2)
    await _cluster("cluster_fast", SEED + 2, feed, [(4.0, 5.0)], chaos_store, workdir)


@pytest.mark.timeout(600)
async def test_cluster_loses_nodes(chaos_store: StoreEnv, workdir: Path) -> None:
    """The MD_TICKS leader killed for 10 s, later another node for 5 s, during a 40k-tick
    feed through a 3-node cluster with three replicas per stream."""
    feed = FeedSpec(ticks=40_000, rate=1_000, seed=SEED + 3)
    await _cluster("cluster_full", SEED + 3, feed, [(8.0, 10.0), (26.0, 5.0)], chaos_store, workdir)
