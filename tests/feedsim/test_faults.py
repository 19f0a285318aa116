"""Fault injection: what a client observes equals what the counters (and emit log) say."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from services.feedsim import FeedSim

from .helpers import client, drain_until_heartbeats, http_get, running, subscribe, wait_for

PRODUCTS = ["BTC-USD", "ETH-USD", "SOL-USD"]
TICKS = 1_500


async def _run_faulty(faults: str, emit_log: Path | None = None) -> tuple[list[Any], FeedSim]:
    """Run TICKS tickers with ``faults`` to one client; return all frames it got."""
    async with (
        running(
            products=PRODUCTS,
            rate=30_000,
            max_ticks=TICKS,
            wait_subscribers=1,
            faults=faults,
            emit_log=emit_log,
            heartbeat_interval_s=0.05,
            seed=3,
        ) as sim,
        client(sim) as ws,
    ):
        await subscribe(ws, PRODUCTS, ["ticker", "heartbeat"])
        await wait_for(lambda: sim.ticks_total >= TICKS)
        final = {p: s["trade_id"] for p, s in sim.stats()["products"].items()}
        frames = await drain_until_heartbeats(ws, final)
    return frames, sim


def _tickers(frames: list[Any]) -> list[dict[str, Any]]:
    return [f for f in frames if isinstance(f, dict) and f.get("type") == "ticker"]


def _malformed(frame: Any) -> str | None:
    if not isinstance(frame, dict):
        return "non_json"
    if frame.get("type") != "ticker":
        return None
    if "product_id" not in frame:
        return "no_product_id"
    try:
        float(frame["price"])
    except ValueError:
        return "bad_price"
    return None


async def test_gap_is_visible_through_heartbeats(tmp_path: Path) -> None:
    """gap drops tickers: received + gaps = generated, exactly the emit log's unsent
    trade ids are missing, and heartbeats still report the latest trade id."""
    log_path = tmp_path / "emit.jsonl"
    frames, sim = await _run_faulty("gap=0.2", emit_log=log_path)
    by_kind = sim.counters.by_kind
    tickers = _tickers(frames)[len(PRODUCTS) :]  # skip the subscribe snapshots
    assert by_kind["gap"] > 0
    assert len(tickers) + by_kind["gap"] == TICKS
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(lines) == TICKS
    gapped = {(x["msg"]["product_id"], x["msg"]["trade_id"]) for x in lines if x["fault"] == "gap"}
    assert len(gapped) == by_kind["gap"]
    seen = {(t["product_id"], t["trade_id"]) for t in tickers}
    assert not gapped & seen
    assert [x["msg"] for x in lines if x["sent"]] == tickers
    # A heartbeat newer than the last ticker received is how a client detects the gap.
    last_seen: dict[str, int] = {}
    detected = 0
    for f in frames:
        if f["type"] == "ticker":
            last_seen[f["product_id"]] = f["trade_id"]
        elif f["type"] == "heartbeat" and f["last_trade_id"] > last_seen[f["product_id"]]:
            detected += 1
    per_product = sim.stats()["products"]
    if any((p, per_product[p]["trade_id"]) in gapped for p in PRODUCTS):
        assert detected > 0


async def test_dup_frames_counted() -> None:
    """dup sends the same ticker bytes twice in a row; the client sees exactly ``dup``."""
    frames, sim = await _run_faulty("dup=0.1")
    tickers = _tickers(frames)
    dups = sum(1 for a, b in itertools.pairwise(tickers) if a == b)
    assert dups == sim.counters.by_kind["dup"] > 0
    assert len(tickers) == TICKS + len(PRODUCTS) + dups
    assert sum(p.get("dup", 0) for p in sim.counters.by_product.values()) == dups


async def test_malformed_frames_counted() -> None:
    """malformed replaces tickers with broken frames of three kinds, each counted."""
    frames, sim = await _run_faulty("malformed=0.1")
    seen: dict[str, int] = {"non_json": 0, "no_product_id": 0, "bad_price": 0}
    for f in frames:
        kind = _malformed(f)
        if kind is not None:
            seen[kind] += 1
    assert seen == sim.counters.malformed_variants
    assert sum(seen.values()) == sim.counters.by_kind["malformed"] > 0
    assert all(n > 0 for n in seen.values())


async def test_reorder_swaps_neighbours() -> None:
    """reorder delivers a ticker after the next one of its product: one inversion each."""
    frames, sim = await _run_faulty("reorder=0.1")
    inversions = 0
    high: dict[str, int] = {}
    tickers = _tickers(frames)
    for t in tickers:
        pid = t["product_id"]
        if t["trade_id"] < high.get(pid, 0):
            inversions += 1
        high[pid] = max(high.get(pid, 0), t["trade_id"])
    assert inversions == sim.counters.by_kind["reorder"] > 0
    assert len(tickers) == TICKS + len(PRODUCTS)


async def test_all_tick_faults_together_match_counters() -> None:
    """With every per-ticker fault on, stats and Prometheus agree with the counters."""
    frames, sim = await _run_faulty("gap=0.05,dup=0.05,malformed=0.05,reorder=0.05")
    stats = sim.stats()
    by_kind = stats["faults"]["by_kind"]
    for kind in ("gap", "dup", "malformed", "reorder"):
        assert by_kind[kind] == sum(p["faults"].get(kind, 0) for p in stats["products"].values())
        assert by_kind[kind] > 0
    broken = sum(1 for f in frames if _malformed(f))
    assert broken == by_kind["malformed"]


@pytest.mark.parametrize("compression", ["deflate", "none"])
async def test_disconnect_on_schedule(compression: str) -> None:
    """disconnect=Ns drops every client abruptly (1006) every N seconds."""
    async with running(
        products=["BTC-USD"], rate=200, faults="disconnect=0.4s", compression=compression
    ) as sim:
        async with client(sim) as ws:
            start = time.monotonic()
            await subscribe(ws, ["BTC-USD"], ["ticker"])
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(3):
                    while True:
                        await ws.recv()
            elapsed = time.monotonic() - start
            assert ws.close_code == 1006
            assert 0.2 < elapsed < 1.5
        faults = sim.stats()["faults"]
        assert faults["by_kind"]["disconnect"] >= 1
        assert faults["clients_disconnected"] == 1
        async with client(sim) as again:  # reconnect + resubscribe works
            await subscribe(again, ["BTC-USD"], ["ticker"])


async def test_stall_on_schedule() -> None:
    """stall=LEN@EVERY silences current clients (heartbeats too) but keeps them open."""
    async with (
        running(
            products=["BTC-USD"], rate=300, heartbeat_interval_s=0.05, faults="stall=0.5s@0.6s"
        ) as sim,
        client(sim) as ws,
    ):
        await subscribe(ws, ["BTC-USD"], ["ticker", "heartbeat"])
        arrivals: list[float] = []
        deadline = time.monotonic() + 1.5  # stall from ~0.6 s to ~1.1 s
        while (left := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(ws.recv(), left)
            except TimeoutError:
                break
            arrivals.append(time.monotonic())
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        longest = max(gaps)
        assert longest >= 0.4
        assert gaps.index(longest) < len(gaps) - 1, "the feed must resume after the stall"
        stats = sim.stats()
        assert stats["faults"]["by_kind"]["stall"] >= 1
        assert stats["faults"]["clients_stalled"] >= 1
        assert stats["stall_dropped_frames"] > 0
        status, body = await http_get(sim, "/sim/stats")  # the server itself kept serving
        assert status == 200
        assert body["clients"]["connected"] == 1


async def test_gap_everything_heartbeat_shows_newer_trade() -> None:
    """With gap=1 only the subscribe snapshots arrive; heartbeats reveal the newer trades."""
    frames, sim = await _run_faulty("gap=1")
    tickers = _tickers(frames)
    assert len(tickers) == len(PRODUCTS)
    snapshot_trade = {t["product_id"]: t["trade_id"] for t in tickers}
    final = [f for f in frames if f["type"] == "heartbeat"][-len(PRODUCTS) :]
    for hb in final:
        assert hb["last_trade_id"] > snapshot_trade[hb["product_id"]]
    assert sim.counters.by_kind["gap"] == TICKS
