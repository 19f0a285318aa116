"""The window lane of ``?batch=true`` connections, without servers: grouping by subscription
set, one frame per product set and window, and the per-tick fallback whenever a connection
could not have taken every tick of the window unchanged."""

from __future__ import annotations

import json
from typing import Any

from services.common.models import encode_tick
from services.common.tokenbucket import TokenBucket
from services.gateway.connection import ClientConnection, Frame
from services.gateway.frames import text_frame
from services.gateway.hub import Hub
from services.gateway.settings import GatewaySettings
from services.gateway.ticks import LiveTick
from services.gateway.window import WindowBatch
from tests.gateway.helpers import make_tick

A, B, C, X = "A-USD", "B-USD", "C-USD", "X-USD"
UNLIMITED = GatewaySettings(ws_max_msgs_per_sec=1e6, ws_burst=10**6, ws_send_queue=100_000)


def live(product: str, seq: int) -> LiveTick:
    tick = make_tick(product, seq)
    return LiveTick(tick, encode_tick(tick))


def connect(
    hub: Hub, products: list[str], settings: GatewaySettings = UNLIMITED, *, batch: bool = True
) -> ClientConnection:
    """A connection subscribed as ``_subscribe`` does it without snapshot or backfill."""
    conn = ClientConnection(
        f"c{len(hub.connections)}",
        settings,
        batch=batch,
        schedule=hub.mark_dirty,
        catch_up=hub.catch_up,
    )
    hub.add(conn)
    for product in products:
        seen = hub.subscribe(conn, product)
        conn.start_after(product, seen.seq if seen else None)
    return conn


def feed(hub: Hub, *ticks: tuple[str, int]) -> None:
    for product, seq in ticks:
        hub.fan_out(live(product, seq))


def sent(conn: ClientConnection) -> list[Any]:
    """What the writer would send now, as (product, seq, skipped) per tick or a window's."""
    out: list[Any] = []
    for frame, _kind in conn.next_frames():
        out.extend(_decoded(frame))
    return out


def _decoded(frame: Frame) -> list[Any]:
    data = frame if isinstance(frame, bytes) else frame.data
    items = json.loads(data)
    ticks = items if isinstance(frame, WindowBatch) else [items]
    return [(t["product"], t["seq"], t.get("skipped", 0)) for t in ticks]


def windows(conn: ClientConnection) -> list[WindowBatch]:
    return [frame for frame, _ in conn.queue if isinstance(frame, WindowBatch)]


def test_take_of_n_takes_all_tokens_or_none() -> None:
    """``take(now, n)`` succeeds only when n tokens are there, and then takes exactly n; the refill
    is the same as ``take``'s, capped at the burst."""
    bucket = TokenBucket(rate=10, burst=5)
    start = bucket._stamp
    assert bucket.take(start, 3)
    assert not bucket.take(start, 3)  # 2 left: nothing taken
    assert bucket.take(start, 2)
    assert not bucket.take(start)
    assert bucket.take(start + 0.5, 5)  # 5 refilled
    assert not bucket.take(start + 3600, 6)  # never more than the burst
    assert bucket.take(start + 3600, 5)


def test_one_frame_per_product_set_shared_by_every_connection_of_the_group() -> None:
    """Each window is logged once; connections with the same subscriptions — or with
    subscriptions that ticked alike this window — queue the very same prebuilt frame: the
    stored tick bytes joined in arrival order. Plain connections keep per-tick frames."""
    hub = Hub([A, B, C, X])
    ab1, ab2, ac, a_only, ax = (
        connect(hub, [A, B]),
        connect(hub, [B, A]),
        connect(hub, [A, C]),
        connect(hub, [A]),
        connect(hub, [A, X]),
    )
    plain = connect(hub, [A, B], batch=False)
    assert set(hub.window.groups) == {
        frozenset({A, B}),
        frozenset({A, C}),
        frozenset({A}),
        frozenset({A, X}),
    }
    ticks = [live(A, 1), live(B, 1), live(C, 1), live(A, 2)]
    for item in ticks:
        hub.fan_out(item)
    assert [e[1] for e in hub.window.log] == ticks  # once each, not once per subscriber
    hub.flush()
    assert hub.window.log == []
    [shared] = windows(ab1)
    assert windows(ab2) == [shared]
    assert shared.data == b"[%b]" % b",".join(t.data for t in (ticks[0], ticks[1], ticks[3]))
    assert shared.frame == text_frame(shared.data)
    assert (shared.first, shared.last) == ({A: 1, B: 1}, {A: 2, B: 1})
    [a_window] = windows(a_only)
    assert windows(ax) == [a_window]  # X did not tick: same ticks as A alone
    assert _decoded(a_window) == [(A, 1, 0), (A, 2, 0)]
    assert _decoded(windows(ac)[0]) == [(A, 1, 0), (C, 1, 0), (A, 2, 0)]
    assert [f for f, _ in plain.queue] == [ticks[0], ticks[1], ticks[3]]
    assert ab1.last_seq == {A: 2, B: 1} and ab1.in_step
    assert all(conn.wakeup.is_set() for conn in (ab1, ab2, ac, a_only, ax))

    # a product nobody batch-watches is not logged; unsubscribing regroups
    feed(hub, (C, 2))
    hub.unsubscribe(ac, C)
    feed(hub, (C, 3))
    assert [(p, t.seq) for p, t in hub.window.log] == [(C, 2)]
    hub.unsubscribe(ab2, B)
    assert hub.window.groups[frozenset({A})] == {a_only, ab2, ac}
    assert C not in hub.window.watched and hub.window.watched[B] == 1


def test_a_connection_that_saw_ticks_of_the_window_gets_the_rest_one_by_one() -> None:
    """Subscribing with a snapshot mid-window: the ticks up to the snapshot are not sent
    again; the connection takes whole windows again from the next one on."""
    hub = Hub([A, B])
    steady = connect(hub, [A])
    feed(hub, (A, 1), (A, 2))
    late = connect(hub, [A])  # its snapshot is A 2, already in the open window
    feed(hub, (A, 3))
    hub.flush()
    assert sent(steady) == [(A, 1, 0), (A, 2, 0), (A, 3, 0)]
    assert sent(late) == [(A, 3, 0)]
    assert not late.in_step
    feed(hub, (A, 4))
    hub.flush()
    assert windows(late) and late.in_step
    assert sent(late) == sent(steady) == [(A, 4, 0)]


def test_a_backfill_hand_over_and_a_backfill_ahead_of_the_live_tail() -> None:
    """While a product's backfill is read its window ticks wait in the hand-over buffer;
    released after a backfill that read past the hub's live tail, nothing up to the
    backfill's last tick comes twice — also in later windows of other products."""
    hub = Hub([A, B])
    conn = ClientConnection("c", UNLIMITED, batch=True, schedule=hub.mark_dirty)
    hub.subscribe(conn, B)
    conn.start_after(B, None)
    hub.subscribe(conn, A)
    conn.hold_live(A)
    feed(hub, (A, 5), (B, 1), (A, 6))
    hub.flush()
    assert sent(conn) == [(B, 1, 0)]
    assert [t.seq for t in conn.handover[A].ticks] == [5, 6]
    conn.release_live(A, 9)  # the stream held A 9; the live tail has only reached A 6
    feed(hub, (B, 2))
    hub.flush()
    assert sent(conn) == [(B, 2, 0)]
    assert not conn.in_step  # A 7..9 are still to come from the tail
    feed(hub, (A, 7), (A, 8), (A, 9), (A, 10), (B, 3))
    hub.flush()
    assert sent(conn) == [(A, 10, 0), (B, 3, 0)]
    feed(hub, (A, 11))
    hub.flush()
    assert windows(conn) and sent(conn) == [(A, 11, 0)]


def test_a_rate_limited_connection_gets_conflation_exactly_as_per_tick() -> None:
    """When the token bucket cannot pay for the whole window, its ticks go through the
    per-tick path: as many as there are tokens, then the newest per product with
    ``skipped``; windows are taken whole again once nothing is pending."""
    limited = GatewaySettings(ws_max_msgs_per_sec=0.001, ws_burst=3)
    hub = Hub([A, B])
    conn = connect(hub, [A, B], limited)
    feed(hub, (A, 1), (A, 2), (A, 3), (A, 4), (B, 1), (A, 5))
    hub.flush()
    assert not windows(conn)
    assert [(f.seq if isinstance(f, LiveTick) else f) for f, _ in conn.queue] == [1, 2, 3]
    assert {p: (c.live.seq, c.skipped) for p, c in conn.conflated.items()} == {
        A: (5, 1),
        B: (1, 0),
    }
    feed(hub, (A, 6))  # still conflating: the pending tick is replaced
    hub.flush()
    assert conn.conflated[A].live.seq == 6 and conn.conflated[A].skipped == 2
    conn.bucket.tokens = 3.0  # refilled (at 0.001/s the test would wait too long)
    assert sent(conn) == [(A, 1, 0), (A, 2, 0), (A, 3, 0), (A, 6, 2), (B, 1, 0)]
    conn.bucket.tokens = 3.0
    feed(hub, (A, 7), (B, 2))
    hub.flush()
    assert windows(conn) and sent(conn) == [(A, 7, 0), (B, 2, 0)]


def test_the_send_queue_limit_counts_the_ticks_of_queued_windows() -> None:
    """A window is queued whole only if its ticks fit under WS_SEND_QUEUE with everything
    already queued (windows count their ticks); past it the per-tick path conflates."""
    hub = Hub([A, B])
    conn = connect(hub, [A, B], GatewaySettings(ws_send_queue=16))
    feed(hub, *[(A, s) for s in range(1, 11)])
    hub.flush()
    assert len(windows(conn)) == 1
    feed(hub, *[(A, s) for s in range(11, 19)], (B, 1), (B, 2))
    hub.flush()
    assert len(windows(conn)) == 1  # 10 queued + 10 more > 16
    assert [f.seq for f, _ in conn.queue[1:] if isinstance(f, LiveTick)] == [11, 12, 13, 14, 15, 16]
    assert {p: (c.live.seq, c.skipped) for p, c in conn.conflated.items()} == {
        A: (18, 1),
        B: (2, 1),
    }


def test_a_closing_connection_gets_the_open_window_before_its_close() -> None:
    """``request_close`` hands the connection the ticks the hub still holds for it (the
    writer flushes them before the close frame); the next flush skips it."""
    hub = Hub([A, B])
    conn = connect(hub, [A])
    other = connect(hub, [A, B])
    feed(hub, (A, 1), (B, 1), (A, 2))
    conn.request_close(1001, "server shutting down")
    assert sent(conn) == [(A, 1, 0), (A, 2, 0)]
    hub.flush()
    assert not conn.queue
    assert sent(other) == [(A, 1, 0), (B, 1, 0), (A, 2, 0)]
