"""Per-product sequence bookkeeping: regressions, gaps, and what a resync must cover.

Ticker sequences skip numbers legitimately (the product's sequence space is shared with
order events the ticker channel does not show, coinbase-protocol.md §1 "Sequence
semantics"), so a jump is not a gap. What is checkable with ticker + heartbeat:

- a ticker whose ``sequence`` is not above the last one is a duplicate or a late frame
  (a *regression*; it is still published: JetStream dedups it, the normalizer drops it);
- a heartbeat whose ``last_trade_id`` is above the newest ``trade_id`` we have (from a
  ticker or a resync) says a trade happened whose ticker never arrived: a *gap*, closed
  by a REST resync labelled with the heartbeat's ``sequence``. That label is at least the
  missed ticker's sequence and below any later ticker's, so per-product order holds
  downstream.

Pure bookkeeping, no I/O: the feed session feeds it, the resyncer reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RegressionKind = Literal["duplicate", "stale"]
GapReason = Literal["gap", "reconnect"]


@dataclass(slots=True)
class ProductState:
    feed_seq: int | None = None  # highest ticker sequence received from the feed
    put_seq: int | None = None  # highest sequence put into the outbound buffer (tickers, resyncs)
    trade_id: int | None = None  # newest trade covered by a ticker or a resync
    heartbeat_seq: int | None = None
    flagged_trade_id: int | None = None  # the heartbeat trade id last reported as a gap
    after_subscribe: bool = True  # no ticker yet since the last (re)subscribe
    awaiting_heartbeat: bool = False  # first heartbeat since a reconnect not seen yet


@dataclass(frozen=True, slots=True)
class Gap:
    product: str
    reason: GapReason
    sequence: int  # the heartbeat's: the label of the resync tick
    trade_id: int  # the heartbeat's last_trade_id: the REST ticker must be at least this new
    known_trade_id: int  # the newest trade we had


class SequenceTracker:
    """Sequence state of every product seen (a bounded set: the subscribed products)."""

    def __init__(self) -> None:
        self.products: dict[str, ProductState] = {}

    def state(self, product: str) -> ProductState:
        state = self.products.get(product)
        if state is None:
            state = self.products[product] = ProductState()
        return state

    def new_session(self) -> None:
        """A new connection subscribed: expect snapshot tickers, compare the next heartbeats."""
        for state in self.products.values():
            state.after_subscribe = True
            state.awaiting_heartbeat = state.trade_id is not None

    def on_ticker(self, product: str, sequence: int, trade_id: int | None) -> RegressionKind | None:
        """Record a ticker from the feed; return its regression kind, if it is one.

        The first ticker after a (re)subscribe is Coinbase's snapshot of the last trade,
        which we usually have already: expected, so not reported as a regression.
        """
        state = self.state(product)
        after_subscribe, state.after_subscribe = state.after_subscribe, False
        kind: RegressionKind | None = None
        if state.feed_seq is None or sequence > state.feed_seq:
            state.feed_seq = sequence
        elif not after_subscribe:
            kind = "duplicate" if sequence == state.feed_seq else "stale"
        self.on_put(product, sequence, trade_id)
        return kind

    def on_put(self, product: str, sequence: int, trade_id: int | None) -> None:
        """A ticker-shaped frame (feed ticker or resync) went into the outbound buffer."""
        state = self.state(product)
        if state.put_seq is None or sequence > state.put_seq:
            state.put_seq = sequence
        if trade_id is not None and (state.trade_id is None or trade_id > state.trade_id):
            state.trade_id = trade_id

    def on_heartbeat(self, product: str, sequence: int, last_trade_id: int | None) -> Gap | None:
        """Record a heartbeat; return the gap it reveals, once per missing trade id."""
        state = self.state(product)
        if state.heartbeat_seq is not None and sequence < state.heartbeat_seq:
            return None  # a late heartbeat says nothing new
        state.heartbeat_seq = sequence
        reason: GapReason = "reconnect" if state.awaiting_heartbeat else "gap"
        state.awaiting_heartbeat = False
        known = state.trade_id
        if last_trade_id is None or known is None:
            return None  # nothing to compare with yet (no ticker since start)
        flagged = state.flagged_trade_id
        if last_trade_id <= known or (flagged is not None and last_trade_id <= flagged):
            return None
        state.flagged_trade_id = last_trade_id
        return Gap(product, reason, sequence, last_trade_id, known)

    def label(self, product: str) -> int | None:
        """The sequence a resync not driven by a heartbeat carries: the newest we know of."""
        state = self.products.get(product)
        if state is None:
            return None
        known = [s for s in (state.put_seq, state.heartbeat_seq, state.feed_seq) if s is not None]
        return max(known) if known else None
