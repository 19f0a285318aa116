"""Ingestor metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

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
    "Frames dropped because the buffer was full while NATS was unreachable",
    ["product"],
)
DEAD_LETTERS = Counter(
    "ledgerflux_ingestor_dead_letters_total", "Frames sent to the dead-letter stream", ["reason"]
)
RECONNECTS = Counter(
    "ledgerflux_ingestor_reconnects_total", "Feed reconnections by cause", ["reason"]
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
LAST_MESSAGE = Gauge(
    "ledgerflux_ingestor_last_message_timestamp_seconds",
    "Wall-clock time of the last frame per product (staleness = time() - this)",
    ["product"],
)
