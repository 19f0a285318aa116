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
    "Ingest (recv_ns) to hand-off to the client socket",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
)
BUFFER_DEPTH = Histogram(
    "ledgerflux_gateway_buffer_depth",
    "Frames waiting in a client's send buffer, sampled per write",
    buckets=(0, 1, 4, 16, 64, 256, 1024, 4096),
)

# every series exists from the start (a rate of 0, not no data)
for _code in (
    "bad_request", "unknown_product", "rate_limited", "too_many_subscriptions",
    "unauthorized", "backfill_unavailable",
):  # fmt: skip
    ERRORS_SENT.labels(code=_code)
