"""Rate limits for log lines that an outsider can trigger at any rate.

A bad API key, a connection opened and dropped, a malformed frame from the exchange: each
is worth a line, but a client or feed repeating it thousands of times a second must not
turn logging into the bottleneck (every line is a JSON render and a write on the event
loop). Per event name, a token bucket lets ``burst`` lines through at once and ``per_s``
after that; lines over it are counted in ``ledgerflux_log_lines_suppressed_total{event}``,
and the next line of that event that passes says how many were left out (``suppressed``).
The metrics of the events themselves still count every occurrence.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from services.common import metrics
from services.common.tokenbucket import TokenBucket

# a screenful of lines per second per event is enough to see what is happening
DEFAULT_PER_S = 20.0
DEFAULT_BURST = 100


class LogThrottle:
    def __init__(
        self,
        per_s: float = DEFAULT_PER_S,
        burst: int = DEFAULT_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_s = per_s
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._suppressed: dict[str, int] = {}

    def emit(self, method: Callable[..., Any], event: str, **fields: Any) -> bool:
        """``method(event, **fields)`` (a bound logger's ``info``, ``warning``…) unless
        ``event`` is over its rate; True if the line was written."""
        now = self.clock()
        bucket = self._buckets.get(event)
        if bucket is None:
            bucket = self._buckets[event] = TokenBucket(self.per_s, self.burst, now)
        if not bucket.take(now):
            self._suppressed[event] = self._suppressed.get(event, 0) + 1
            metrics.LOG_LINES_SUPPRESSED.labels(event=event).inc()
            return False
        suppressed = self._suppressed.pop(event, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        method(event, **fields)
        return True


# Every event logged through the throttle: its suppressed-lines series exists from the start
# (at 0), so dashboards and alerts can query it before anything was left out.
# tests/common/test_logthrottle.py checks every emit() in services/ names one of these.
THROTTLED_EVENTS = (
    "auth_failed", "origin_rejected", "connection_refused", "client_connected",
    "client_disconnected", "command_flood", "slow_consumer", "ping_flood",
    "bad_tick_on_stream", "unreadable_tick_in_stream", "frame_dead_lettered", "bad_ddb_item",
    "handshakes_shed", "invalid_http_request",
)  # fmt: skip
for _event in THROTTLED_EVENTS:
    metrics.LOG_LINES_SUPPRESSED.labels(event=_event)

# one per process: the budget is per event, whichever module or connection logs it
throttle = LogThrottle()
