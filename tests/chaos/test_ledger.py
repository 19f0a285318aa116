"""The audit itself, on hand-made evidence: each way a tick can go missing is caught, and
each legitimate fate (deduplicated, dead-lettered, conflated in flight) is told apart."""

from __future__ import annotations

from collections.abc import Iterable

import msgspec
import pytest

from services.common.models import Tick, encode_tick
from services.common.subjects import HDR_RESYNC
from services.ingestor.resync import HDR_RESYNC_REASON
from services.snapshotter.snapshots import Snapshot
from tests.chaos.ledger import ClientRecord, Delivery, Evidence, Ledger, Raw, Ticks, audit

pytestmark = [pytest.mark.chaos, pytest.mark.chaos_fast]

P = "BTC-USD"
SEC = 1_000_000_000


def _tick(seq: int, resync: bool = False) -> bytes:
    tick = Tick(
        product=P, seq=seq, trade_id=seq * 10, time="2026-11-28T15:00:00.000000Z", recv_ns=1,
        price="1", size="1", side="buy", bid="1", bid_size="1", ask="1", ask_size="1",
        open_24h=None, high_24h=None, low_24h=None, volume_24h=None,
    )  # fmt: skip
    if resync:
        tick.resync = True
    return encode_tick(tick)


def _evidence(
    sent: Iterable[tuple[int, int, str]],  # (conn, seq, kind), in emission order
    raw: Iterable[tuple[int, int]],  # (seq, conn it arrived on; 0: a REST resync), in order
    stored: Iterable[int],
    *,
    client: Iterable[tuple[int, int]] | None = None,  # (seq, skipped)
    table_seq: int | None = None,
) -> Evidence:
    """Connection c lives from c*100 s on; a frame it carried arrives 50 s into it."""
    deliveries: list[Delivery] = [
        (conn * 100 * SEC + n, conn, P, seq, seq * 10, kind)
        for n, (conn, seq, kind) in enumerate(sent)
    ]
    frames = Raw()
    resynced: set[int] = set()
    for n, (seq, conn) in enumerate(raw, 1):
        headers = {"Ledgerflux-Recv-Ns": str(conn * 100 * SEC + 50 * SEC + n)}
        if conn == 0:
            headers |= {HDR_RESYNC: "1", HDR_RESYNC_REASON: "gap"}
            resynced.add(seq)
        frames.add(n, f"md.raw.coinbase.{P}", headers,
                   b'{"type":"ticker","sequence":%d}' % seq)  # fmt: skip
    seqs = list(stored)
    ticks = Ticks(keep={P: seqs[-1]})
    for n, seq in enumerate(seqs, 1):
        ticks.add(n, f"md.ticks.1.{P}", None, _tick(seq, resync=seq in resynced))
    last = seqs[-1] if table_seq is None else table_seq
    newest = msgspec.json.decode(_tick(seqs[-1]), type=Tick)
    snapshot = Snapshot(1, "now", "MD_TICKS", len(seqs), 4, [0, 1, 2, 3], {P: newest})
    got = list(client) if client is not None else [(s, 0) for s in seqs]
    record = ClientRecord(baseline={P: -1}, ticks={P: [(s, k, "live") for s, k in got]})
    return Evidence(
        deliveries=deliveries,
        raw=frames,
        ticks=ticks,
        dlq=[],
        table={P: (last, _tick(last).decode())},
        snapshot=("k", snapshot),
        client=record,
        feed_stats={},
    )


def _run(ev: Evidence, allow_conflation: bool = False) -> Ledger:
    return audit(ev, "unit", 0, allow_conflation=allow_conflation)


def test_every_frame_stored_balances() -> None:
    """Five frames, five ticks, the client got them all: no problem, nothing lost."""
    led = _run(
        _evidence(
            [(1, s, "ticker") for s in range(1, 6)], [(s, 1) for s in range(1, 6)], range(1, 6)
        )
    )
    assert not led.problems, led.table()
    assert led.pipeline[P]["stored"] == 5 and led.pipeline[P]["lost"] == 0


def test_a_frame_missing_mid_connection_is_lost() -> None:
    """Seq 3 never reached MD_RAW although 4 and 5 (written after it) did: lost."""
    led = _run(
        _evidence(
            [(1, s, "ticker") for s in range(1, 6)], [(1, 1), (2, 1), (4, 1), (5, 1)], [1, 2, 4, 5]
        )
    )
    assert led.pipeline[P]["lost"] == 1
    assert "nothing_lost" in led.problems


def test_frames_in_flight_when_the_connection_ended_are_conflated() -> None:
    """4 and 5 were in flight when connection 1 ended; connection 2's snapshot (6)
    superseded them: conflated — but only where the scenario breaks the feed connection."""
    sent = [*((1, s, "ticker") for s in range(1, 6)), (2, 6, "snapshot")]
    ev = _evidence(sent, [(1, 1), (2, 1), (3, 1), (6, 2)], [1, 2, 3, 6])
    led = _run(ev, allow_conflation=True)
    assert not led.problems, led.table()
    assert led.pipeline[P]["conflated"] == 2
    assert "no_conflation_expected" in _run(ev).problems


def test_a_frame_the_normalizer_dropped_is_lost() -> None:
    """In MD_RAW, newer than everything before it, but never a tick: lost."""
    led = _run(
        _evidence(
            [(1, s, "ticker") for s in range(1, 6)], [(s, 1) for s in range(1, 6)], [1, 2, 4, 5]
        )
    )
    assert led.pipeline[P]["lost"] == 1
    assert "normalizer_complete" in led.problems


def test_duplicates_and_reordered_frames_are_deduplicated() -> None:
    """A dup's second copy and a held ticker arriving after a newer one are deduplicated."""
    sent = [(1, 1, "ticker"), (1, 1, "dup"), (1, 3, "ticker"), (1, 2, "reorder"), (1, 4, "ticker")]
    led = _run(_evidence(sent, [(1, 1), (3, 1), (2, 1), (4, 1)], [1, 3, 4]))
    assert not led.problems, led.table()
    assert led.outcome_by_kind["dup"]["deduplicated"] == 1
    assert led.outcome_by_kind["reorder"]["deduplicated"] == 1


def test_a_reordered_frame_a_resync_stored_first_is_deduplicated() -> None:
    """A heartbeat announces 2 while feedsim holds it back: the gap resync stores 2 from
    REST, then 3 and the held 2 arrive. The held frame repeats the resync's tick."""
    sent = [(1, 1, "ticker"), (1, 3, "ticker"), (1, 2, "reorder"), (1, 4, "ticker")]
    led = _run(_evidence(sent, [(1, 1), (2, 0), (3, 1), (2, 1), (4, 1)], [1, 2, 3, 4]))
    assert not led.problems, led.table()
    assert led.outcome_by_kind["reorder"] == {"deduplicated": 1}
    assert led.resync_ticks[P] == 1
    # without the resync the held frame would be the one that was stored
    led = _run(_evidence(sent, [(1, 1), (2, 1), (3, 1), (4, 1)], [1, 2, 3, 4]))
    assert led.outcome_by_kind["reorder"] == {"stored": 1}


def test_the_client_must_get_every_tick_or_hear_of_it() -> None:
    """A gap in what the client got is lost unless the next tick's ``skipped`` covers it."""
    sent = [(1, s, "ticker") for s in range(1, 6)]
    raw = [(s, 1) for s in range(1, 6)]
    silent = _run(_evidence(sent, raw, range(1, 6), client=[(1, 0), (2, 0), (5, 0)]))
    assert silent.client[P]["lost"] == 2 and "client_nothing_lost" in silent.problems
    told = _run(_evidence(sent, raw, range(1, 6), client=[(1, 0), (2, 0), (5, 2)]))
    assert told.client[P]["conflated"] == 2 and not told.problems, told.table()


def test_dynamodb_behind_the_stream_fails() -> None:
    """The table must hold exactly MD_TICKS' last tick."""
    ev = _evidence(
        [(1, s, "ticker") for s in range(1, 4)],
        [(s, 1) for s in range(1, 4)],
        range(1, 4),
        table_seq=2,
    )
    assert "dynamodb_equals_stream" in _run(ev).problems
