"""Normalizer metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS
from services.normalizer.errors import DLQ_REASONS

FRAMES_IN = Counter(
    "ledgerflux_normalizer_frames_in_total", "Raw frames consumed from MD_RAW", ["type"]
)
TICKS_OUT = Counter("ledgerflux_normalizer_ticks_out_total", "Ticks acked by MD_TICKS")
DROPPED = Counter(
    "ledgerflux_normalizer_dropped_total",
    "Tickers not published because their seq is not newer (duplicate or stale)",
    ["reason"],
)
DEAD_LETTERS = Counter(
    "ledgerflux_normalizer_dead_letters_total", "Frames dead-lettered, by reason", ["reason"]
)
NOT_OWNED = Counter(
    "ledgerflux_normalizer_not_owned_total", "Frames of products owned by another replica"
)
BATCH_SECONDS = Histogram(
    "ledgerflux_normalizer_batch_seconds",
    "Time to decode, validate, publish and ack one fetched batch",
    buckets=LATENCY_BUCKETS,
)
FRAME_SECONDS = Histogram(
    "ledgerflux_normalizer_frame_seconds",
    "CPU time per frame (decode → validate → encode), batch average",
    buckets=(1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 1e-3),
)
LAST_SEEN = Gauge(
    "ledgerflux_normalizer_last_seen_timestamp_seconds",
    "Receive time of the newest frame (ticker or heartbeat) per product",
    ["product"],
)

for _reason in DLQ_REASONS:  # every series exists from the start (a rate of 0, not no data)
    DEAD_LETTERS.labels(reason=_reason)
for _reason in ("duplicate", "stale"):
    DROPPED.labels(reason=_reason)
