"""Snapshotter metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
STATE_LAG = Histogram(
    "ledgerflux_snapshotter_state_lag_seconds",
    "Per product written, how old its newest tick was (now - recv_ns) when the DynamoDB write "
    "that stores it succeeded: how far the latest state trails the exchange",
    buckets=(*LATENCY_BUCKETS, 10.0, 30.0, 60.0, 300.0),
)
ERRORS = Counter("ledgerflux_snapshotter_errors_total", "Errors by kind", ["kind"])
BAD_TICKS = Counter(
    "ledgerflux_snapshotter_bad_ticks_total", "Messages on MD_TICKS that are not canonical ticks"
)
COALESCE_RATIO = Gauge(
    "ledgerflux_snapshotter_coalesce_ratio", "Ticks per DynamoDB write in the last flush pass"
)
SNAPSHOTS = Counter("ledgerflux_snapshotter_snapshots_total", "Snapshots written to S3")
SNAPSHOT_SECONDS = Histogram(
    "ledgerflux_snapshotter_snapshot_seconds",
    "Time to build, compress and upload one snapshot (object + pointer)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
SNAPSHOT_BYTES = Gauge("ledgerflux_snapshotter_snapshot_bytes", "Size of the last snapshot object")
SNAPSHOT_PRODUCTS = Gauge(
    "ledgerflux_snapshotter_snapshot_products", "Products in the last snapshot"
)
LAST_SNAPSHOT = Gauge(
    "ledgerflux_snapshotter_last_snapshot_timestamp_seconds",
    "Wall-clock time of the last successful snapshot (age = time() - this)",
)
COVERED_STREAM_SEQ = Gauge(
    "ledgerflux_snapshotter_covered_stream_seq",
    "MD_TICKS sequence up to which every owned tick is written to DynamoDB",
)

# every series exists from the start (a rate of 0, not no data)
for _kind in ("ddb_unreachable", "ddb_throttled", "ddb_error", "s3_unavailable", "bad_ddb_item"):
    ERRORS.labels(kind=_kind)
for _outcome in ("written", "not_newer"):
    DDB_WRITES.labels(outcome=_outcome)
