"""The ingestor's parts on their own: sequence bookkeeping, the per-product watchdog, the
resync frame, the REST client against feedsim's rate-limited REST ticker, and the
resyncer (coalescing, superseding, retries) feeding a real outbound buffer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import nats
import orjson
import pytest
from structlog.testing import capture_logs

from services.common.publisher import Publisher
from services.common.settings import CommonSettings
from services.common.subjects import HDR_RECV_NS, HDR_RESYNC
from services.devstack.ports import free_port
from services.devstack.servers import NatsServer
from services.feedsim import FeedSim
from services.ingestor.errors import (
    RestBadResponseError,
    RestRateLimitedError,
    RestStatusError,
    RestUnavailableError,
)
from services.ingestor.frames import parse_frame
from services.ingestor.publish import OutboundBuffer, Outgoing, publish_loop
from services.ingestor.rest import RestClient, RestTicker
from services.ingestor.resync import HDR_RESYNC_REASON, Resyncer, resync_frame
from services.ingestor.sequences import Gap, SequenceTracker
from services.ingestor.staleness import StalenessWatch
from services.normalizer.decode import CoinbaseTicker, decode_frame, ticker_to_tick
from tests.support import frames
from tests.support.metrics import local_value

from .helpers import feedsim

# -- frames -------------------------------------------------------------------------------


def test_envelope_carries_trade_ids() -> None:
    """The envelope decode keeps a ticker's trade_id and a heartbeat's last_trade_id."""
    assert parse_frame(frames.ticker("BTC-USD", 10, trade_id=7), 1).trade_id == 7
    assert parse_frame(frames.heartbeat("BTC-USD", 12, 9), 1).trade_id == 9
    assert parse_frame(b'{"type":"ticker","trade_id":true}', 1).trade_id is None


# -- sequences ----------------------------------------------------------------------------


def test_ticker_regressions_are_duplicate_or_stale_but_jumps_are_not() -> None:
    """Sequences skip numbers legitimately; only a repeat or a step back is a regression."""
    tracker = SequenceTracker()
    assert tracker.on_ticker("BTC-USD", 100, 1) is None
    assert tracker.on_ticker("BTC-USD", 500, 2) is None  # a jump: normal on Coinbase
    assert tracker.on_ticker("BTC-USD", 500, 2) == "duplicate"
    assert tracker.on_ticker("BTC-USD", 300, 1) == "stale"
    assert tracker.on_ticker("ETH-USD", 1, 1) is None  # per product


def test_snapshot_after_resubscribe_is_not_a_regression() -> None:
    """The first ticker after a (re)subscribe repeats the last trade: expected."""
    tracker = SequenceTracker()
    tracker.on_ticker("BTC-USD", 100, 1)
    tracker.new_session()
    assert tracker.on_ticker("BTC-USD", 100, 1) is None
    assert tracker.on_ticker("BTC-USD", 100, 1) == "duplicate"


def test_heartbeat_ahead_of_the_last_ticker_is_a_gap_reported_once() -> None:
    """heartbeat.last_trade_id above the newest ticker's trade id is a gap, once per trade
    id; a late heartbeat and one covered by the tickers are not."""
    tracker = SequenceTracker()
    assert tracker.on_heartbeat("BTC-USD", 90, 5) is None  # nothing to compare with yet
    tracker.on_ticker("BTC-USD", 100, 10)
    assert tracker.on_heartbeat("BTC-USD", 100, 10) is None
    assert tracker.on_heartbeat("BTC-USD", 130, 12) == Gap("BTC-USD", "gap", 130, 12, 10)
    assert tracker.on_heartbeat("BTC-USD", 130, 12) is None  # same missing trade: once
    assert tracker.on_heartbeat("BTC-USD", 120, 14) is None  # late heartbeat
    assert tracker.on_heartbeat("BTC-USD", 150, 14) == Gap("BTC-USD", "gap", 150, 14, 10)
    tracker.on_put("BTC-USD", 150, 14)  # the resync covered it
    assert tracker.on_heartbeat("BTC-USD", 160, 14) is None


def test_first_heartbeat_after_reconnect_reports_reason_reconnect() -> None:
    """A gap found by the first heartbeat after a reconnect is the reconnect's."""
    tracker = SequenceTracker()
    tracker.on_ticker("BTC-USD", 100, 10)
    tracker.new_session()
    assert tracker.on_heartbeat("BTC-USD", 200, 15) == Gap("BTC-USD", "reconnect", 200, 15, 10)
    tracker.new_session()
    tracker.on_ticker("BTC-USD", 300, 20)  # the snapshot closes it: no gap
    assert tracker.on_heartbeat("BTC-USD", 300, 20) is None


def test_label_is_the_newest_sequence_known() -> None:
    """A resync without a heartbeat target is labelled with the newest sequence seen."""
    tracker = SequenceTracker()
    assert tracker.label("BTC-USD") is None
    tracker.on_ticker("BTC-USD", 100, 10)
    tracker.on_heartbeat("BTC-USD", 140, 10)
    assert tracker.label("BTC-USD") == 140


# -- per-product watchdog -----------------------------------------------------------------


def test_product_stale_only_while_others_flow_once_per_episode() -> None:
    """Silent for the timeout while another product flows: stale once; its next frame
    ends the episode; when nothing flows at all it is the connection's problem."""
    watch = StalenessWatch(["A", "B"], timeout_s=1.0)
    watch.start_session(0.0)
    watch.seen("A", 0.5)
    watch.seen("B", 0.5)
    assert watch.check(1.2) == []
    watch.seen("A", 1.4)
    assert watch.check(1.6) == ["B"]
    watch.seen("A", 1.9)
    assert watch.check(2.0) == []  # reported once per episode
    assert watch.seen("B", 2.1) is True
    assert watch.stale == set()
    assert watch.check(5.0) == []  # everything silent: a stall, not a stale product
    watch.start_session(10.0)
    watch.seen("A", 10.5)
    assert watch.check(10.9) == []  # a new connection gets a full timeout
    watch.seen("A", 11.0)
    assert watch.check(11.1) == ["B"]


# -- the resync frame ---------------------------------------------------------------------


def test_resync_frame_is_a_ticker_the_normalizer_accepts() -> None:
    """The REST ticker becomes a Coinbase ticker frame (no side, µs time) that the
    normalizer turns into a tick marked resync."""
    rest = RestTicker(
        trade_id=77,
        price="91234.56",
        time="2026-11-28T15:00:00.123456789Z",
        size="0.0012",
        bid="91234.55",
        ask="91234.57",
        volume="12345.6789",
    )
    data = resync_frame("BTC-USD", 12345, rest)
    body = orjson.loads(data)
    assert "side" not in body
    assert body["time"] == "2026-11-28T15:00:00.123456Z"
    decoded = decode_frame(data)
    assert isinstance(decoded, CoinbaseTicker)
    tick = ticker_to_tick(decoded, "BTC-USD", 1, resync=True)
    assert (tick.seq, tick.trade_id, tick.price, tick.size) == (12345, 77, "91234.56", "0.0012")
    assert (tick.bid, tick.ask, tick.volume_24h, tick.side) == (
        "91234.55",
        "91234.57",
        "12345.6789",
        None,
    )
    assert tick.resync is True


# -- REST client --------------------------------------------------------------------------


@pytest.fixture
async def quiet_sim() -> AsyncIterator[FeedSim]:
    """A quiet market (no ticks): REST tickers are the subscribe snapshots."""
    async with feedsim(products=["BTC-USD", "ETH-USD"], rate=0) as sim:
        yield sim


async def test_rest_client_stays_within_coinbase_public_limit(quiet_sim: FeedSim) -> None:
    """25 requests through the 10/s burst-15 bucket: feedsim (same limits) refuses none."""
    client = RestClient(quiet_sim.http_url, timeout_s=5, rate=10, burst=15)
    results = await asyncio.gather(*(client.ticker("BTC-USD") for _ in range(25)))
    expected = quiet_sim.stats()["products"]["BTC-USD"]["trade_id"]
    assert all(r is not None and r.trade_id == expected for r in results)
    assert quiet_sim.stats()["rest"] == {"requests": 25, "rate_limited": 0}


async def test_rest_client_backs_off_on_429(quiet_sim: FeedSim) -> None:
    """Past the server's limit a 429 raises RestRateLimitedError and pauses the bucket."""
    client = RestClient(quiet_sim.http_url, timeout_s=5, rate=1000, burst=1000)
    before = local_value("ledgerflux_ingestor_rest_requests_total", outcome="rate_limited")
    outcomes = await asyncio.gather(
        *(client.ticker("BTC-USD") for _ in range(20)), return_exceptions=True
    )
    limited = [o for o in outcomes if isinstance(o, RestRateLimitedError)]
    assert limited and len(limited) == quiet_sim.stats()["rest"]["rate_limited"]
    assert local_value(
        "ledgerflux_ingestor_rest_requests_total", outcome="rate_limited"
    ) - before == (len(limited))
    started = time.monotonic()
    await client.bucket.acquire()
    assert time.monotonic() - started >= 0.5  # paused ~1 s (no Retry-After sent)


@contextlib.asynccontextmanager
async def _misbehaving_rest(answer: bytes, trickle_s: float = 0.0) -> AsyncIterator[str]:
    """An HTTP server that sends ``answer`` to every request (a byte every ``trickle_s``)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            if trickle_s:
                for byte in answer:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(trickle_s)
            else:
                writer.write(answer)
                await writer.drain()
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_rest_answers_that_broke_the_resyncer_are_typed_errors() -> None:
    """REST answers the resyncer could not survive: ``Retry-After: nan`` (a NaN delay
    crashed the service under uvloop), a broken status line (a traceback, never retried),
    a redirect (followed to any host, https to http included), and a server trickling its
    answer a byte at a time (urllib's timeout is per read: it
    held the request, and the process's exit, for minutes). Each is now an error the
    resyncer retries, within the client's timeout."""
    nan_429 = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: nan\r\nContent-Length: 0\r\n\r\n"
    async with _misbehaving_rest(nan_429) as url:
        with pytest.raises(RestRateLimitedError) as limited:
            await RestClient(url, timeout_s=2, rate=100, burst=100).ticker("BTC-USD")
    assert limited.value.retry_after_s == 1.0  # the default pause, not NaN

    before = local_value("ledgerflux_ingestor_rest_requests_total", outcome="bad_response")
    async with _misbehaving_rest(b"HTTP/1.1 OK-ish\r\n\r\n{}") as url:
        with pytest.raises(RestBadResponseError):
            await RestClient(url, timeout_s=2, rate=100, burst=100).ticker("BTC-USD")
    assert local_value("ledgerflux_ingestor_rest_requests_total", outcome="bad_response") == (
        before + 1
    )

    moved = (
        b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere.invalid/t\r\nContent-Length: 0\r\n\r\n"
    )
    async with _misbehaving_rest(moved) as url:  # followed silently, to any host
        with pytest.raises(RestStatusError) as status:
            await RestClient(url, timeout_s=2, rate=100, burst=100).ticker("BTC-USD")
    assert status.value.status == 302

    body = b'{"trade_id": 1, "price": "1.0", "time": "2026-11-29T10:00:00Z"}'.ljust(400)
    slow = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    async with _misbehaving_rest(slow, trickle_s=0.05) as url:
        started = time.monotonic()
        with pytest.raises(RestUnavailableError, match=r"no complete answer within 0\.5s"):
            await RestClient(url, timeout_s=0.5, rate=100, burst=100).ticker("BTC-USD")
        assert time.monotonic() - started < 5  # the whole answer takes 20 s to trickle


@pytest.mark.parametrize(
    "ticker",
    [
        {"trade_id": 2**62, "price": "1.0", "time": "2026-11-29T10:00:00Z"},
        {"trade_id": 2**70, "price": "1.0", "time": "2026-11-29T10:00:00Z"},
        {"trade_id": 5, "price": "1e5", "time": "2026-11-29T10:00:00Z"},
        {"trade_id": 5, "price": "1.0", "time": "yesterday"},
        {"trade_id": 5, "price": "1.0", "time": "2026-11-29T10:00:00Z", "bid": "-1"},
    ],
    ids=["trade-id-far-ahead", "trade-id-past-int64", "exponent", "time", "negative-bid"],
)
async def test_a_rest_ticker_that_cannot_become_a_tick_is_a_bad_response(
    ticker: dict[str, object],
) -> None:
    """Retried as bad_response instead of trusted: a huge trade_id switched the product's
    gap detection off (2**62) or crashed the resync (past 64 bits); a price or time the
    normalizer dead-letters spent the resync."""
    body = json.dumps(ticker).encode()  # orjson refuses 2**70 itself
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    async with _misbehaving_rest(answer) as url:
        with pytest.raises(RestBadResponseError):
            await RestClient(url, timeout_s=2, rate=100, burst=100).ticker("BTC-USD")


async def test_rest_client_errors_are_typed(quiet_sim: FeedSim) -> None:
    """An unknown product is an HTTP error; an unreachable host is 'unavailable'."""
    client = RestClient(quiet_sim.http_url, timeout_s=5, rate=10, burst=15)
    with pytest.raises(RestStatusError) as status:
        await client.ticker("NOPE-USD")
    assert status.value.status == 404
    dead = RestClient(f"http://127.0.0.1:{free_port()}", timeout_s=1, rate=10, burst=15)
    with pytest.raises(RestUnavailableError):
        await dead.ticker("BTC-USD")


# -- resyncer -----------------------------------------------------------------------------


class _Rig:
    def __init__(self, sim: FeedSim, max_attempts: int = 3) -> None:
        self.tracker = SequenceTracker()
        self.buffer = OutboundBuffer(maxlen=1000)
        rest = RestClient(sim.http_url, timeout_s=5, rate=10, burst=15)
        self.resyncer = Resyncer(
            self.tracker, self.buffer, rest, max_attempts=max_attempts, clock_ns=lambda: 42
        )
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _Rig:
        self.task = asyncio.create_task(self.resyncer.run(self.stop))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await self.task

    async def settled(self, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while self.resyncer.pending:
                await asyncio.sleep(0.01)

    def items(self) -> list[Outgoing]:
        return self.buffer.peek(len(self.buffer))


async def test_resync_publishes_rest_ticker_with_the_gap_label(quiet_sim: FeedSim) -> None:
    """A gap resync puts one ticker frame on the raw subject: labelled with the heartbeat's
    sequence, Nats-Msg-Id coinbase:<p>:resync:<seq>, Ledgerflux-Resync headers."""
    trade_id = quiet_sim.stats()["products"]["ETH-USD"]["trade_id"]
    before = local_value("ledgerflux_ingestor_resyncs_total", reason="gap")
    async with _Rig(quiet_sim) as rig:
        rig.tracker.on_ticker("ETH-USD", 10, trade_id - 3)
        rig.resyncer.request("ETH-USD", "gap", sequence=20, trade_id=trade_id)
        await rig.settled()
    [item] = rig.items()
    assert (item.subject, item.msg_id, item.type) == (
        "md.raw.coinbase.ETH-USD",
        "coinbase:ETH-USD:resync:20",
        "resync",
    )
    assert item.headers == {HDR_RECV_NS: "42", HDR_RESYNC: "1", HDR_RESYNC_REASON: "gap"}
    body = orjson.loads(item.payload)
    assert (body["sequence"], body["trade_id"]) == (20, trade_id)
    assert rig.tracker.state("ETH-USD").put_seq == 20
    assert local_value("ledgerflux_ingestor_resyncs_total", reason="gap") - before == 1


async def test_requests_for_one_product_are_coalesced(quiet_sim: FeedSim) -> None:
    """Two requests for a product before it is fetched: one REST call, one frame with the
    newer target, the older request counted as coalesced."""
    before = local_value(
        "ledgerflux_ingestor_resyncs_skipped_total", reason="gap", cause="coalesced"
    )
    async with _Rig(quiet_sim) as rig:
        rig.tracker.on_ticker("BTC-USD", 10, 1)
        rig.resyncer.request("BTC-USD", "gap", sequence=20, trade_id=2)
        rig.resyncer.request("BTC-USD", "reconnect", sequence=30, trade_id=3)
        await rig.settled()
    [item] = rig.items()
    assert orjson.loads(item.payload)["sequence"] == 30
    assert item.headers[HDR_RESYNC_REASON] == "reconnect"
    assert quiet_sim.stats()["rest"]["requests"] == 1
    after = local_value(
        "ledgerflux_ingestor_resyncs_skipped_total", reason="gap", cause="coalesced"
    )
    assert after - before == 1


async def test_resync_superseded_by_a_newer_feed_ticker_publishes_nothing(
    quiet_sim: FeedSim,
) -> None:
    """When the feed delivers a ticker at or past the label first, the resync would be
    older than it downstream: skipped as superseded, without spending a REST call."""
    key = {"reason": "gap", "cause": "superseded"}
    before = local_value("ledgerflux_ingestor_resyncs_skipped_total", **key)
    async with _Rig(quiet_sim) as rig:
        rig.tracker.on_ticker("BTC-USD", 10, 1)
        rig.resyncer.request("BTC-USD", "gap", sequence=20, trade_id=2)
        rig.tracker.on_ticker("BTC-USD", 25, 3)  # arrives before the worker runs
        await rig.settled()
    assert rig.items() == []
    assert quiet_sim.stats()["rest"]["requests"] == 0
    assert local_value("ledgerflux_ingestor_resyncs_skipped_total", **key) - before == 1


async def test_rest_view_older_than_the_feed_is_retried_then_given_up(
    quiet_sim: FeedSim,
) -> None:
    """A REST ticker older than the trade the heartbeat announced is never published:
    retried with backoff up to RESYNC_MAX_ATTEMPTS, then counted as failed."""
    key = {"reason": "gap", "cause": "failed"}
    before = local_value("ledgerflux_ingestor_resyncs_skipped_total", **key)
    async with _Rig(quiet_sim, max_attempts=2) as rig:
        rig.tracker.on_ticker("BTC-USD", 10, 1)
        rig.resyncer.request("BTC-USD", "gap", sequence=20, trade_id=10**12)
        await rig.settled()
    assert rig.items() == []
    assert quiet_sim.stats()["rest"]["requests"] == 2
    assert local_value("ledgerflux_ingestor_resyncs_skipped_total", **key) - before == 1


# -- outbound buffer ----------------------------------------------------------------------


def test_buffer_remembers_products_that_lost_state_frames() -> None:
    """Dropping a ticker or resync marks its product for a resync; a heartbeat or a dead
    letter does not; take_dropped hands the set over once."""
    buffer = OutboundBuffer(maxlen=100)

    def item(product: str, kind: str) -> Outgoing:
        return Outgoing("MD_RAW", f"md.raw.coinbase.{product}", b"{}", None, {}, product, kind)

    for kind, product in [("heartbeat", "A"), ("dead_letter", "-"), ("ticker", "B")]:
        buffer.put(item(product, kind))
    for _ in range(100):
        buffer.put(item("C", "heartbeat"))
    assert len(buffer) == 100
    assert buffer.take_dropped() == {"B"}
    assert buffer.take_dropped() == set()


async def test_frames_left_at_the_drain_deadline_are_logged_per_product(
    nats_server: NatsServer,
) -> None:
    """Stopped while nothing stores its frames (no MD_RAW stream: every publish fails and
    is retried): at DRAIN_TIMEOUT_S the loop gives up and says how many frames of which
    products were never published (a counter would die with the process unscraped)."""
    nc = await nats.connect(nats_server.url)
    settings = CommonSettings(nats_urls=[nats_server.url], publish_ack_timeout_s=0.2)
    buffer = OutboundBuffer(maxlen=100)
    for product, n in (("BTC-USD", 3), ("ETH-USD", 2)):
        for _ in range(n):
            buffer.put(Outgoing("MD_RAW", f"md.raw.{product}", b"{}", None, {}, product, "ticker"))
    stop = asyncio.Event()
    stop.set()
    try:
        with capture_logs() as logs:
            await asyncio.wait_for(
                publish_loop(
                    Publisher(nc, settings), buffer, batch_max=10, stop=stop, drain_timeout_s=0.5
                ),
                10,
            )
    finally:
        await nc.close()
    (given_up,) = [e for e in logs if e["event"] == "drain_timeout_frames_unpublished"]
    assert given_up["frames"] == 5
    assert given_up["products"] == {"BTC-USD": 3, "ETH-USD": 2}


def test_metric_label_values_match_the_code() -> None:
    """The label values created at start (series exist at 0) are exactly the ones used."""
    from typing import get_args

    from services.ingestor import metrics
    from services.ingestor.resync import ResyncReason, SkipCause

    assert get_args(ResyncReason) == metrics.RESYNC_REASONS
    assert get_args(SkipCause) == metrics.RESYNC_SKIP_CAUSES
