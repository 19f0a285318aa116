"""Snapshotter metrics."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from services.common.metrics import LATENCY_BUCKETS

TICKS_IN = Counter("ledgerflux_snapshotter_ticks_in_total", "Ticks consumed from MD_TICKS")
DDB_WRITES = Counter(
    "ledgerflux_snapshotter_ddb_writes_total", "Conditional DynamoDB writes by outcome", ["outcome"]
)
DDB_WRITE_SECONDS = Histogram(
    "ledgerflux_snapshotter_ddb_write_seconds",
    "Latency of one conditional DynamoDB write",
    buckets=LATENCY_BUCKETS,
)
ERRORS = Counter("ledgerflux_snapshotter_errors_total", "Errors by kind", ["kind"])
BAD_TICKS = Counter(
    "ledgerflux_snapshotter_bad_ticks_total", "Messages on MD_TICKS that are not canonical ticks"
)
