"""--replay: recorded Coinbase messages in both line formats, paced or as fast as possible."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from services.feedsim import FeedSim, FeedSimSettings, ReplayFileError

from .helpers import client, drain_until_heartbeats, recv, running, subscribe, wait_for

T0_NS = 1_700_000_000_000_000_000


def _iso(ns: int) -> str:
    sec, rem = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{rem // 1000:06d}Z"


def _ticker(product: str, seq: int, ns: int) -> dict[str, Any]:
    return {
        "type": "ticker",
        "sequence": seq,
        "product_id": product,
        "price": f"{100 + seq % 7}.5",
        "open_24h": "100",
        "volume_24h": "10.00000000",
        "low_24h": "90",
        "high_24h": "110",
        "volume_30d": "300.00000000",
        "best_bid": "100",
        "best_bid_size": "1.00000000",
        "best_ask": "111",
        "best_ask_size": "1.00000000",
        "side": "buy",
        "time": _iso(ns),
        "trade_id": seq,
        "last_size": "0.10000000",
    }


def _write_recording(path: Path, n: int, span_s: float) -> list[dict[str, Any]]:
    """n messages over span_s seconds, alternating raw and wrapped lines, plus noise."""
    msgs: list[dict[str, Any]] = []
    lines = [json.dumps({"type": "subscriptions", "channels": []})]  # not replayable: skipped
    for i in range(n):
        ns = T0_NS + int(i * span_s * 1e9 / max(1, n - 1))
        product = ("BTC-USD", "ETH-USD")[i % 2]
        if i % 5 == 4:
            msg: dict[str, Any] = {
                "type": "heartbeat",
                "last_trade_id": i,
                "product_id": product,
                "sequence": 1000 + i,
                "time": _iso(ns),
            }
        else:
            msg = _ticker(product, 1000 + i, ns)
        msgs.append(msg)
        if i % 2:
            lines.append(json.dumps({"recv_ns": ns, "msg": msg}))
        else:
            lines.append(json.dumps(msg, separators=(",", ":")))
    path.write_text("\n".join(lines) + "\n\n")
    return msgs


async def _receive(ws: Any, n: int, timeout: float = 5.0) -> list[str]:
    out: list[str] = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            out.append(str(await ws.recv()))
    return out


async def test_replay_max_speed_in_order(tmp_path: Path) -> None:
    """Both line formats replay in file order; raw lines go out byte for byte."""
    path = tmp_path / "rec.jsonl"
    msgs = _write_recording(path, 200, span_s=60.0)
    async with running(replay=path, speed="max") as sim, client(sim) as ws:
        subs = await subscribe(ws, ["BTC-USD", "ETH-USD"], ["ticker", "heartbeat"])
        assert len(subs["channels"]) == 2
        frames = await _receive(ws, len(msgs))
        await asyncio.wait_for(sim.replay_done.wait(), 5)
        assert [json.loads(f) for f in frames] == msgs
        raw_lines = path.read_text().splitlines()[1::2]  # the raw (unwrapped) lines
        assert frames[0::2] == raw_lines[: len(frames[0::2])]
        stats = sim.stats()
        assert stats["replay"]["done"] is True
        assert stats["replay"]["skipped_lines"] == 1
        assert stats["products"]["BTC-USD"]["ticks"] == sum(
            1 for m in msgs if m["type"] == "ticker" and m["product_id"] == "BTC-USD"
        )


async def test_replay_paced_by_time(tmp_path: Path) -> None:
    """speed=X paces by recv_ns/time: 0.6 s of recording at speed 2 takes ~0.3 s."""
    path = tmp_path / "rec.jsonl"
    msgs = _write_recording(path, 30, span_s=0.6)
    async with running(replay=path, speed=2, replay_end="exit") as sim, client(sim) as ws:
        await subscribe(ws, ["BTC-USD", "ETH-USD"], ["ticker", "heartbeat"])
        start = time.monotonic()
        await _receive(ws, len(msgs))
        elapsed = time.monotonic() - start
        await asyncio.wait_for(sim.finished.wait(), 5)
    assert 0.25 <= elapsed <= 1.5


async def test_replay_waits_for_subscribers(tmp_path: Path) -> None:
    """Nothing is replayed before the wanted number of clients subscribed."""
    path = tmp_path / "rec.jsonl"
    msgs = _write_recording(path, 10, span_s=0.0)
    async with (
        running(replay=path, speed="max", wait_subscribers=2) as sim,
        client(sim) as a,
        client(sim) as b,
    ):
        await subscribe(a, ["BTC-USD", "ETH-USD"], ["ticker", "heartbeat"])
        await asyncio.sleep(0.1)
        assert sim.stats()["replay"]["sent"] == 0
        await subscribe(b, ["BTC-USD"], ["ticker"])
        assert len(await _receive(a, len(msgs))) == len(msgs)
        first_b = await recv(b)
        assert first_b["product_id"] == "BTC-USD"
        assert first_b["type"] == "ticker"


async def test_emit_log_replays_what_clients_saw(tmp_path: Path) -> None:
    """An --emit-log file replays to exactly the ticker frames the live client received."""
    log_path = tmp_path / "emit.jsonl"
    products = ["BTC-USD", "ETH-USD"]
    async with (
        running(
            products=products,
            rate=20_000,
            max_ticks=500,
            wait_subscribers=1,
            faults="gap=0.05,dup=0.05,reorder=0.05,malformed=0.05",
            emit_log=log_path,
            heartbeat_interval_s=0.05,
        ) as sim,
        client(sim) as ws,
    ):
        await subscribe(ws, products, ["ticker", "heartbeat"])
        await wait_for(lambda: sim.ticks_total >= 500)
        final = {p: s["trade_id"] for p, s in sim.stats()["products"].items()}
        live = [
            f
            for f in await drain_until_heartbeats(ws, final)
            if isinstance(f, dict) and f.get("type") == "ticker" and "product_id" in f
        ]
        live = [t for t in live[len(products) :] if _numeric(t["price"])]
    async with running(replay=log_path, speed="max") as sim, client(sim) as ws:
        await subscribe(ws, products, ["ticker"])
        replayed = [json.loads(f) for f in await _receive(ws, len(live))]
    assert replayed == live


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


async def test_bad_replay_files(tmp_path: Path) -> None:
    """Missing, non-JSON or empty recordings fail the start with a clear error."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type":"ticker","product_id":"BTC-USD"}\nnot json\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"type":"subscriptions","channels":[]}\n')
    for path, needle in [
        (tmp_path / "missing.jsonl", "missing.jsonl"),
        (bad, "bad.jsonl:2"),
        (empty, "no replayable message"),
    ]:
        with pytest.raises(ReplayFileError, match=needle):
            async with FeedSim(FeedSimSettings(port=0, replay=path)):
                pass
