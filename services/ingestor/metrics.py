"""Ingestor metrics."""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.common.metrics import LATENCY_BUCKETS

FRAMES_RECEIVED = Counter(
    "ledgerflux_ingestor_frames_received_total",
    "Frames received from the feed",
    ["product", "type"],
)
FRAMES_PUBLISHED = Counter(
    "ledgerflux_ingestor_frames_published_total",
    "Frames acked by MD_RAW (duplicates included)",
    ["product", "type"],
)
FRAMES_DROPPED = Counter(
    "ledgerflux_ingestor_frames_dropped_total",
    "Oldest frames dropped from the full outbound buffer (NATS away, or slower than the feed)",
    ["product"],
)
DEAD_LETTERS = Counter(
    "ledgerflux_ingestor_dead_letters_total", "Frames sent to the dead-letter stream", ["reason"]
)
RECONNECTS = Counter(
    "ledgerflux_ingestor_reconnects_total", "Feed reconnections by cause", ["reason"]
)
CONTROL_FRAMES = Counter(
    "ledgerflux_ingestor_control_frames_total",
    "Feed messages that are not market data (subscriptions, error, status): not published",
    ["type"],
)
FEED_ERRORS = Counter(
    "ledgerflux_ingestor_feed_errors_total",
    "error messages from the feed (rejected products/channels)",
    ["reason"],
)
CONNECTED = Gauge("ledgerflux_ingestor_feed_connected", "1 while subscribed to the feed")
BUFFER_DEPTH = Gauge(
    "ledgerflux_ingestor_buffer_depth", "Frames received and not yet acked by MD_RAW"
)
READ_AHEAD = Gauge(
    "ledgerflux_ingestor_feed_read_ahead_frames",
    "Frames read from the feed's socket that the reader has not taken yet; at FEED_MAX_QUEUE "
    "reading pauses, the feed's own send buffer grows and it may close us as a slow consumer",
)


class _LastMessage(Collector):
    """Wall-clock time of the last frame per product, read from the feed's own record at
    scrape time: setting a labelled gauge per frame (a lock each) was ~4 % of the CPU."""

    name = "ledgerflux_ingestor_last_message_timestamp_seconds"
    doc = "Wall-clock time of the last frame per product (staleness = time() - this)"

    def __init__(self) -> None:
        self.last_seen: dict[str, float] = {}

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily(self.name, self.doc, labels=["product"])]

    def collect(self) -> list[Metric]:
        family = GaugeMetricFamily(self.name, self.doc, labels=["product"])
        for product, seen in list(self.last_seen.items()):
            family.add_metric([product], seen)
        return [family]


LAST_MESSAGE = _LastMessage()
REGISTRY.register(LAST_MESSAGE)
REGRESSIONS = Counter(
    "ledgerflux_ingestor_regressions_total",
    "Tickers whose sequence is not above the product's last one (published anyway; "
    "kind: duplicate = same sequence, stale = older)",
    ["product", "kind"],
)
GAPS = Counter(
    "ledgerflux_ingestor_gaps_total",
    "Heartbeats announcing a trade whose ticker never arrived (each starts a resync)",
    ["product"],
)
RESYNCS = Counter(
    "ledgerflux_ingestor_resyncs_total",
    "Resync ticks built from the REST ticker and published (reason: gap, reconnect, "
    "buffer_drop, stale)",
    ["reason"],
)
RESYNCS_SKIPPED = Counter(
    "ledgerflux_ingestor_resyncs_skipped_total",
    "Resync requests that published nothing (cause: superseded = the feed delivered a "
    "newer ticker first, coalesced = merged into a newer request, failed = gave up)",
    ["reason", "cause"],
)
RESYNCS_PENDING = Gauge(
    "ledgerflux_ingestor_resyncs_pending", "Products waiting for (or in) a REST resync"
)
REST_REQUESTS = Counter(
    "ledgerflux_ingestor_rest_requests_total",
    "REST ticker requests by outcome (ok, rate_limited, http_error, unavailable, bad_response)",
    ["outcome"],
)
REST_SECONDS = Histogram(
    "ledgerflux_ingestor_rest_request_seconds",
    "Duration of successful REST ticker requests",
    buckets=LATENCY_BUCKETS,
)
PRODUCTS_STALE = Gauge(
    "ledgerflux_ingestor_products_stale",
    "Subscribed products silent (no ticker, no heartbeat) for WATCHDOG_TIMEOUT_S while others flow",
)

RESYNC_REASONS = ("gap", "reconnect", "buffer_drop", "stale")
RESYNC_SKIP_CAUSES = ("superseded", "coalesced", "failed", "no_sequence")

# Every label value known in advance exists from the start at 0, so dashboards and alerts
# see a series (and a rate of 0) before the first event rather than no data at all.
for _reason in ("unparseable", "unexpected_product", "oversized"):
    DEAD_LETTERS.labels(reason=_reason)
for _reason in ("stall", "closed", "connect"):
    RECONNECTS.labels(reason=_reason)
for _reason in ("invalid_product", "auth_required", "missing_product", "other"):
    FEED_ERRORS.labels(reason=_reason)
for _reason in RESYNC_REASONS:
    RESYNCS.labels(reason=_reason)
    for _cause in RESYNC_SKIP_CAUSES:
        RESYNCS_SKIPPED.labels(reason=_reason, cause=_cause)
for _outcome in ("ok", "rate_limited", "http_error", "unavailable", "bad_response"):
    REST_REQUESTS.labels(outcome=_outcome)


def init_products(products: list[str]) -> None:
    """Create the per-product series of the configured products at 0.

    Not the last-message gauge: a 0 timestamp would read as "silent since 1970" and fire
    the staleness alert before the first frame.
    """
    for product in products:
        FRAMES_DROPPED.labels(product=product)
        GAPS.labels(product=product)
        for kind in ("ticker", "heartbeat"):
            FRAMES_RECEIVED.labels(product=product, type=kind)
            FRAMES_PUBLISHED.labels(product=product, type=kind)
        for regression in ("duplicate", "stale"):
            REGRESSIONS.labels(product=product, kind=regression)


for _control in ("subscriptions", "error", "status"):  # every series exists from the start
    CONTROL_FRAMES.labels(type=_control)
