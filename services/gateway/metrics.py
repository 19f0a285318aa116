"""Gateway metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS = Gauge("ledgerflux_gateway_connections", "Open WebSocket connections")
SUBSCRIPTIONS = Gauge("ledgerflux_gateway_subscriptions", "Product subscriptions over all clients")
MESSAGES_OUT = Counter(
    "ledgerflux_gateway_messages_out_total", "Messages sent to clients", ["type"]
)
BYTES_OUT = Counter("ledgerflux_gateway_bytes_out_total", "Bytes sent to clients")
CONFLATED = Counter(
    "ledgerflux_gateway_conflated_total", "Ticks replaced by a newer one (rate limit)"
)
DISCONNECTS = Counter(
    "ledgerflux_gateway_disconnects_total", "Connections closed, by close code", ["code"]
)
ERRORS_SENT = Counter("ledgerflux_gateway_errors_sent_total", "error replies by code", ["code"])
TICKS_IN = Counter("ledgerflux_gateway_ticks_in_total", "Ticks received from MD_TICKS")
E2E_LATENCY = Histogram(
    "ledgerflux_gateway_e2e_latency_seconds",
    "Ingest (recv_ns) to the gateway's fan-out of the tick to its connections (before each "
    "connection's queue, rate limit and batch window)",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
)
BUFFER_DEPTH = Histogram(
    "ledgerflux_gateway_buffer_depth",
    "Frames waiting in a client's send buffer, sampled per writer flush",
    buckets=(0, 1, 4, 16, 64, 256, 1024, 4096),
)

# every series exists from the start (a rate of 0, not no data)
for _code in (
    "bad_request", "unknown_product", "rate_limited", "too_many_subscriptions",
    "unauthorized", "backfill_unavailable",
):  # fmt: skip
    ERRORS_SENT.labels(code=_code)

# -- backfill -------------------------------------------------------------------------------
BACKFILL_REQUESTS = Counter(
    "ledgerflux_gateway_backfill_requests_total",
    "Backfills per product, by form (last, since_seq, since_time) and outcome",
    ["form", "outcome"],
)
BACKFILL_TICKS = Histogram(
    "ledgerflux_gateway_backfill_ticks",
    "Ticks sent per product backfill",
    buckets=(0, 1, 10, 100, 500, 1000, 5000, 10_000, 50_000),
)
BACKFILL_SECONDS = Histogram(
    "ledgerflux_gateway_backfill_seconds",
    "Time to read one product's backfill from MD_TICKS",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
BACKFILLS_IN_PROGRESS = Gauge(
    "ledgerflux_gateway_backfills_in_progress", "Backfills reading MD_TICKS right now"
)

# -- admission ------------------------------------------------------------------------------
AUTH_FAILURES = Counter(
    "ledgerflux_gateway_auth_failures_total",
    "WebSocket upgrades refused with 403 for a missing or invalid API key",
    ["reason"],
)
ORIGIN_REJECTED = Counter(
    "ledgerflux_gateway_origin_rejected_total",
    "WebSocket upgrades refused with 403: Origin not in WS_ALLOWED_ORIGINS",
)
KEY_LIMIT_REJECTED = Counter(
    "ledgerflux_gateway_key_limit_rejected_total",
    "Connections closed with 1013: WS_MAX_CONNECTIONS_PER_KEY reached (process or shared)",
    ["scope"],
)
REDIS_ERRORS = Counter(
    "ledgerflux_gateway_redis_errors_total",
    "Redis calls that failed (the gateway then fails open)",
    ["op"],
)
REDIS_UP = Gauge("ledgerflux_gateway_redis_up", "1 while the shared-limit Redis answers")

# -- output ---------------------------------------------------------------------------------
BATCH_FRAMES = Counter(
    "ledgerflux_gateway_batch_frames_total", "JSON-array frames sent to ?batch=true clients"
)
BATCH_MESSAGES = Histogram(
    "ledgerflux_gateway_batch_messages",
    "Messages per JSON-array frame (?batch=true)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024),
)
REFUSED = Counter(
    "ledgerflux_gateway_connections_refused_total",
    "Connections closed with 1013 at once, by cause: max_connections (WS_MAX_CONNECTIONS), "
    "key_limit (WS_MAX_CONNECTIONS_PER_KEY), shutting_down",
    ["cause"],
)
for _cause in ("max_connections", "key_limit", "shutting_down"):
    REFUSED.labels(cause=_cause)
INVALID_HTTP_REQUESTS = Counter(
    "ledgerflux_gateway_invalid_http_requests_total",
    "Requests that were not HTTP (answered 400 by uvicorn and closed)",
)
# handshake pacing (pacing.py): WebSocket upgrades past WS_HANDSHAKES_PER_SEC wait their turn
HANDSHAKES_PACED = Counter(
    "ledgerflux_gateway_handshakes_paced_total",
    "WebSocket upgrades that found no handshake token and waited for one",
)
HANDSHAKES_SHED = Counter(
    "ledgerflux_gateway_handshakes_shed_total",
    "WebSocket upgrades answered 503 at once: as many were waiting as the handshake timeout "
    "lets through",
)
HANDSHAKE_QUEUE = Gauge(
    "ledgerflux_gateway_handshake_queue", "WebSocket upgrades waiting for a handshake token"
)
HANDSHAKE_WAIT = Histogram(
    "ledgerflux_gateway_handshake_wait_seconds",
    "How long a paced WebSocket upgrade waited for its handshake token",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
BAD_TICKS = Counter(
    "ledgerflux_gateway_bad_ticks_total",
    "Messages on MD_TICKS that are not canonical ticks, skipped (live tail and backfill)",
    ["path"],
)
for _path in ("live", "backfill"):
    BAD_TICKS.labels(path=_path)
PING_FLOODS = Counter(
    "ledgerflux_gateway_ping_floods_total",
    "Clients closed with 1008 for sending WebSocket pings faster than the ping limit",
)
SLOW_CONSUMERS = Counter(
    "ledgerflux_gateway_slow_consumers_total", "Clients closed with 4008 (could not drain)"
)
LIVE_STREAM_SEQ = Gauge(
    "ledgerflux_gateway_live_stream_seq",
    "MD_TICKS sequence of the last tick the live tail delivered (lag: last_seq - this)",
)
LIVE_RESUMES = Counter(
    "ledgerflux_gateway_live_resumes_total",
    "Times the live tail's consumer was recreated where it left off (reconnect, missed heartbeats)",
)


INLINE_WRITES = Counter(
    "ledgerflux_gateway_inline_writes_total",
    "Messages written without waking the connection's writer task: plain connections' "
    "right after the NATS read that brought them, batch ones' at the flush tick (not "
    "sampled in the buffer depth)",
)


class FlushCounts:
    """Per-flush counters kept as plain ints and added to Prometheus when ``/metrics`` is
    read: a locked ``Counter.inc`` per flush per connection was ~5 % of the fan-out's CPU."""

    __slots__ = ("batch_frames", "bytes", "inline", "ticks")

    def __init__(self) -> None:
        self.ticks = 0
        self.bytes = 0
        self.batch_frames = 0
        self.inline = 0

    def export(self) -> None:
        ticks, sent, frames, inline = self.ticks, self.bytes, self.batch_frames, self.inline
        self.ticks = self.bytes = self.batch_frames = self.inline = 0
        if ticks:
            _TICKS_OUT.inc(ticks)
        if sent:
            BYTES_OUT.inc(sent)
        if frames:
            BATCH_FRAMES.inc(frames)
        if inline:
            INLINE_WRITES.inc(inline)


_TICKS_OUT = MESSAGES_OUT.labels(type="tick")
FLUSHED = FlushCounts()
