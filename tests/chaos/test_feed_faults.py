"""Scenario 4: the feed misbehaves — disconnect storms, stalls, gaps, duplicates,
reordering, malformed frames — and the ledger accounts for every injected fault (issue #10).

What each fault must become: a duplicate or a reordered (older) ticker is *deduplicated*;
a malformed frame is *dead-lettered* (``unparseable`` by the ingestor, ``bad_decimal`` by
the normalizer); a gap is a ticker feedsim never sent, so it is not emitted (the heartbeat
may reveal it and a REST resync fill it); a disconnect or a stall ends a connection, and
what was in flight then is *conflated* into the resubscribe snapshot."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from services.devstack.servers import NatsServer
from tests.chaos.harness import FeedSpec, StoreEnv
from tests.chaos.ledger import Ledger
from tests.chaos.runner import assert_clean, run_scenario

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

SEED = 4004
ALLOWED = {
    "dup": {"deduplicated", "conflated"},
    "reorder": {"deduplicated", "conflated"},
    "malformed": {"dead_lettered", "conflated"},
}


def _check_faults(ledger: Ledger) -> None:
    faults = ledger.faults
    for kind in ("gap", "dup", "malformed", "reorder", "disconnect", "stall"):
        assert faults.get(kind, 0) > 0, f"feedsim injected no {kind}: {faults}"
    for kind, allowed in ALLOWED.items():
        outcomes = ledger.outcome_by_kind.get(kind, Counter())
        assert outcomes, f"no {kind} frame reached the socket"
        assert set(outcomes) <= allowed, f"{kind} frames ended as {dict(outcomes)}"
    assert {"unparseable", "bad_decimal"} <= set(ledger.dead_letter_reasons), ledger.table()
    # disconnects and stalls ended the ingestor's connections; it came back each time (the
    # last connection's frames all arrived: the ledger would show them lost otherwise)
    assert ledger.context["feed_connections_seen"] > 2, ledger.table()


async def _feed_faults(
    name: str, feed: FeedSpec, nats_server: NatsServer, store: StoreEnv, workdir: Path
) -> None:
    ledger = await run_scenario(
        name, feed, nats_urls=[nats_server.url], store=store, workdir=workdir,
        allow_conflation=True,
    )  # fmt: skip
    assert_clean(ledger)
    _check_faults(ledger)


@pytest.mark.chaos_fast
@pytest.mark.timeout(240)
async def test_feed_faults_fast(
    nats_server: NatsServer, chaos_store: StoreEnv, workdir: Path
) -> None:
    """Every feed fault at once over a 12k-tick feed: each accounted in the ledger."""
    faults = "gap=0.01,dup=0.01,malformed=0.006,reorder=0.01,disconnect=4s,stall=3s@6s"
    feed = FeedSpec(ticks=12_000, rate=1_000, seed=SEED, faults=faults)
    await _feed_faults("feed_faults_fast", feed, nats_server, chaos_store, workdir)


@pytest.mark.timeout(480)
async def test_feed_faults_storm(
    nats_server: NatsServer, chaos_store: StoreEnv, workdir: Path
) -> None:
    """A disconnect storm (every 2 s), stalls, and 5 % of tickers faulted, over 60k ticks."""
    faults = "gap=0.015,dup=0.015,malformed=0.005,reorder=0.015,disconnect=2s,stall=3s@9s"
    feed = FeedSpec(ticks=60_000, rate=1_500, seed=SEED + 1, faults=faults)
    await _feed_faults("feed_faults_full", feed, nats_server, chaos_store, workdir)
