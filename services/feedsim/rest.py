"""Plain HTTP answers served on the WebSocket port: Coinbase's REST ticker and sim endpoints.

``websockets`` hands every request to ``process_request`` before the WebSocket upgrade;
requests without ``Upgrade: websocket`` are answered here (one response, then close).
"""

from __future__ import annotations

import email.utils
import http
import time
from collections.abc import Callable
from typing import Any

import msgspec
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

_encode = msgspec.json.Encoder().encode
RATE_LIMITED = {"message": "Public rate limit exceeded"}
NOT_FOUND = {"message": "NotFound"}
_MAX_BUCKETS = 10_000


class TokenBucket:
    """Lazy-fill token bucket: ``rate`` tokens/s up to ``burst`` (Coinbase public REST)."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class RateLimiter:
    """One bucket per client IP, like Coinbase's per-IP public limit."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= _MAX_BUCKETS:
                self._buckets.clear()  # a test/dev tool: bounded memory beats precision here
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(now)


def respond(status: int, body: bytes, content_type: str = "application/json") -> Response:
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
        ]
    )
    return Response(status, http.HTTPStatus(status).phrase, headers, body)


def respond_json(status: int, payload: Any) -> Response:
    return respond(status, _encode(payload))


class RestApi:
    """Routes of the HTTP side; data comes from callables so the API stays mode-agnostic."""

    def __init__(
        self,
        *,
        ticker: Callable[[str], dict[str, Any] | None],
        stats: Callable[[], dict[str, Any]],
        metrics: Callable[[], bytes],
        limiter: RateLimiter,
    ) -> None:
        self._ticker = ticker
        self._stats = stats
        self._metrics = metrics
        self._limiter = limiter
        self.requests = 0
        self.rate_limited = 0

    def handle(self, request: Request, client_ip: str) -> Response:
        self.requests += 1
        path = request.path.split("?", 1)[0].rstrip("/") or "/"
        if request.method != "GET":
            return respond_json(405, {"message": "method not allowed"})
        if path.startswith("/products/"):
            if not self._limiter.allow(client_ip):
                self.rate_limited += 1
                return respond_json(429, RATE_LIMITED)
            parts = path.split("/")  # "", "products", id, "ticker"
            if len(parts) == 4 and parts[3] == "ticker":
                body = self._ticker(parts[2])
                if body is not None:
                    return respond_json(200, body)
            return respond_json(404, NOT_FOUND)
        if path == "/healthz":
            return respond_json(200, {"status": "ok"})
        if path == "/sim/stats":
            return respond_json(200, self._stats())
        if path == "/metrics":
            return respond(200, self._metrics(), "text/plain; version=0.0.4; charset=utf-8")
        return respond_json(404, NOT_FOUND)
