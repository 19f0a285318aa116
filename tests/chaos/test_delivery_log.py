"""feedsim's ``--delivery-log``, the chaos ledger's source of truth: exactly the ticker
frames written to each client socket, in order — snapshots, duplicates, reordered and
malformed frames included; nothing generated while nobody could receive it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from services.feedsim.__main__ import parse_settings
from services.feedsim.deliverylog import ticker_ids
from tests.feedsim.helpers import client, drain_until_heartbeats, running, subscribe, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.chaos_fast]

PRODUCTS = ["BTC-USD", "ETH-USD"]
_SEQUENCE = re.compile(r'"sequence":(\d+)')


def _lines(path: Path) -> list[tuple[int, str, int, int, str]]:
    out = []
    for line in path.read_text().splitlines():
        _ns, conn, product, seq, trade_id, kind = line.split(",")
        out.append((int(conn), product, int(seq), int(trade_id), kind))
    return out


def _ticker_frames(frames: list[Any]) -> list[tuple[int, str]]:
    """(sequence, what) of every frame on the ticker channel, malformed ones included."""
    out = []
    for frame in frames:
        if isinstance(frame, str):  # not JSON: a frame cut in half
            match = _SEQUENCE.search(frame)
            assert match, frame
            out.append((int(match.group(1)), "malformed:non_json"))
        elif frame.get("type") == "ticker":
            if "product_id" not in frame:
                out.append((frame["sequence"], "malformed:no_product_id"))
            elif frame["price"] == "not-a-number":
                out.append((frame["sequence"], "malformed:bad_price"))
            else:
                out.append((frame["sequence"], "ticker"))
    return out


async def _collect(ws: ClientConnection, final: dict[str, int]) -> list[Any]:
    return await drain_until_heartbeats(ws, final, timeout=10)


async def test_delivery_log_is_what_the_client_received(tmp_path: Path) -> None:
    """With every per-ticker fault on, the log lists the client's ticker frames one for
    one, in order: the subscribe snapshots first, dup twice, the held ticker after the one
    that overtook it, a malformed frame with the sequence of the ticker it replaced."""
    path = tmp_path / "delivery.csv"
    async with running(
        products=PRODUCTS, rate=20_000, max_ticks=800, wait_subscribers=1,
        faults="gap=0.05,dup=0.05,reorder=0.05,malformed=0.05", delivery_log=path,
        heartbeat_interval_s=0.05, compression="none",
    ) as sim, client(sim) as ws:  # fmt: skip
        await subscribe(ws, PRODUCTS, ["ticker", "heartbeat"])
        await wait_for(lambda: sim.ticks_total >= 800)
        final = {p: s["trade_id"] for p, s in sim.stats()["products"].items()}
        frames = await _collect(ws, final)
        await sim.flush_emit_log()
        by_kind = sim.stats()["faults"]["by_kind"]
    lines = _lines(path)
    received = _ticker_frames(frames)
    assert [(seq, kind.replace("dup", "ticker").replace("reorder", "ticker"))
            for _c, _p, seq, _t, kind in lines
            if kind != "snapshot"] == received[len(PRODUCTS):]  # fmt: skip
    assert [kind for *_, kind in lines[: len(PRODUCTS)]] == ["snapshot"] * len(PRODUCTS)
    assert len(lines) == len(received)
    assert {conn for conn, *_ in lines} == {1}
    kinds = [kind for *_, kind in lines]
    assert kinds.count("dup") == by_kind["dup"] > 0
    assert kinds.count("reorder") == by_kind["reorder"] > 0
    assert sum(k.startswith("malformed:") for k in kinds) == by_kind["malformed"] > 0
    # gap-faulted tickers were never written, so they are not in the log
    assert len(lines) == 800 - by_kind["gap"] + by_kind["dup"] + len(PRODUCTS)


async def test_frames_nobody_could_receive_are_not_logged(tmp_path: Path) -> None:
    """Tickers generated before the client subscribed, or while it was stalled, never went
    out on a socket: the log has exactly the frames the client got."""
    path = tmp_path / "delivery.csv"
    async with running(
        products=PRODUCTS, rate=4_000, max_ticks=6_000, faults="stall=0.3s@0.5s",
        delivery_log=path, heartbeat_interval_s=0.05, compression="none",
    ) as sim:  # fmt: skip
        await wait_for(lambda: sim.ticks_total >= 500)  # nobody listening yet
        async with client(sim) as ws:
            await subscribe(ws, PRODUCTS, ["ticker", "heartbeat"])
            await wait_for(lambda: sim.ticks_total >= 6_000, timeout=15)
            final = {p: s["trade_id"] for p, s in sim.stats()["products"].items()}
            frames = await _collect(ws, final)
        await sim.flush_emit_log()
        stats = sim.stats()
    lines = _lines(path)
    received = _ticker_frames(frames)
    assert stats["stall_dropped_frames"] > 0
    assert stats["faults"]["by_kind"]["stall"] > 0
    assert [seq for _c, _p, seq, _t, _k in lines] == [seq for seq, _ in received]
    assert len(lines) < 6_000


def test_ticker_ids_and_the_flag() -> None:
    """The log's sequence/trade id come from the frame; ``--delivery-log`` sets the path."""
    frame = json.dumps({"type": "ticker", "sequence": 7, "product_id": "A-B", "trade_id": 3})
    assert ticker_ids(frame.encode()) == (7, 3)
    assert ticker_ids(b'{"type":"ticker"}') == (-1, -1)
    assert parse_settings(["--delivery-log", "/tmp/x.csv"]).delivery_log == Path("/tmp/x.csv")
    assert parse_settings([]).delivery_log is None
