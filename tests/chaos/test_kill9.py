"""Scenario 1: ``kill -9`` of each service at random moments during a long feed, each
restarted; then the audit (issue #10)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from services.devstack.servers import NatsServer
from tests.chaos.harness import (
    SERVICES,
    FeedSpec,
    Pipeline,
    StoreEnv,
    kill_schedule,
    log,
    run_kills,
)
from tests.chaos.runner import assert_clean, run_scenario

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

SEED = 1001


async def _kill9(
    name: str,
    seed: int,
    feed: FeedSpec,
    rounds: int,
    nats_server: NatsServer,
    store: StoreEnv,
    workdir: Path,
) -> None:
    rng = random.Random(seed)
    feed_s = feed.ticks / feed.rate
    schedule = kill_schedule(
        rng,
        list(SERVICES),
        rounds,
        window=(0.1 * feed_s, 0.8 * feed_s),
        down=(0.2, 2.0),
        spacing=2.0,
    )
    log(f"{name}: seed {seed}, kill schedule (s after feed start, victim, down s): {schedule}")

    async def inject(pipe: Pipeline) -> None:
        await run_kills(pipe, schedule)

    ledger = await run_scenario(
        name,
        feed,
        nats_urls=[nats_server.url],
        store=store,
        workdir=workdir,
        inject=inject,
        allow_conflation=True,
    )
    assert_clean(ledger)


@pytest.mark.chaos_fast
@pytest.mark.timeout(240)
async def test_kill9_each_service_once_fast(
    nats_server: NatsServer, chaos_store: StoreEnv, workdir: Path
) -> None:
    """Each of the four services killed with SIGKILL once at a random moment of a 12k-tick
    feed and restarted: nothing emitted is lost, every store ends on the stream's last tick."""
    feed = FeedSpec(ticks=12_000, rate=1_000, seed=SEED)
    await _kill9("kill9_fast", SEED, feed, 1, nats_server, chaos_store, workdir)


@pytest.mark.timeout(600)
async def test_kill9_each_service_three_times(
    nats_server: NatsServer, chaos_store: StoreEnv, workdir: Path
) -> None:
    """Each service killed with SIGKILL three times at random moments of a 100k-tick feed,
    each restarted after a random pause: nothing lost, every store converges."""
    feed = FeedSpec(ticks=100_000, rate=2_000, seed=SEED + 1)
    await _kill9("kill9_full", SEED + 1, feed, 3, nats_server, chaos_store, workdir)
