"""Token buckets: lazily refilled, no timers."""

from __future__ import annotations

import time


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; starts full.

    ``take`` accepts the caller's clock reading: the hub reads the clock once per tick and
    offers it to every subscriber, instead of once per subscriber.
    """

    __slots__ = ("_stamp", "burst", "rate", "tokens")

    def __init__(self, rate: float, burst: int, now: float | None = None) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self._stamp = time.monotonic() if now is None else now

    def take(self, now: float | None = None, n: float = 1.0) -> bool:
        """``n`` tokens (a batch window is sent whole or tick by tick), or none."""
        if now is None:
            now = time.monotonic()
        # the hot path of the fan-out: plain arithmetic, no min() call
        tokens = self.tokens + (now - self._stamp) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self._stamp = now
        if tokens >= n:
            self.tokens = tokens - n
            return True
        self.tokens = tokens
        return False

    def seconds_until_token(self) -> float:
        now = time.monotonic()
        tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
