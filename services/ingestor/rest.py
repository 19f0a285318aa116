"""Coinbase Exchange REST ``GET /products/{id}/ticker``, within the public rate limit.

Public endpoints allow 10 requests/s per IP with bursts to 15 (a lazy-fill token bucket,
coinbase-protocol.md §3) and answer 429 beyond; every request waits for a token here, and
a 429 pauses the bucket for everyone (``Retry-After`` when sent, else a doubling pause).
The blocking urllib call runs in a daemon thread of its own, so the event loop (and the
feed reader on it) never waits on the network, and the request as a whole has a deadline
(``timeout_s``): urllib's timeout is per socket read, so a server trickling a byte at a
time held a request (and, through asyncio's default executor, the process's exit) for
minutes. A request past its deadline is abandoned to its thread, which ends at the next
socket timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import quote

import msgspec

from services.common.models import DECIMAL_PATTERN
from services.ingestor import metrics
from services.ingestor.errors import (
    RestBadResponseError,
    RestRateLimitedError,
    RestStatusError,
    RestUnavailableError,
)

USER_AGENT = "ledgerflux-ingestor/0.1"  # Coinbase rejects requests without a User-Agent
_MAX_BODY = 64 * 1024
_DEFAULT_429_PAUSE_S = 1.0
_MAX_429_PAUSE_S = 30.0
_MAX_ABANDONED = 16


# What a REST ticker must look like to become a resync tick; anything else is a
# bad_response, retried. Checked here, not only by the normalizer: a ticker it dead-letters
# is a resync spent, and a trade_id far past the feed's (2**62 was taken) switched the
# product's gap detection off until a restart. Coinbase trade ids are ~1e9; 2**53 keeps
# them exact in any JSON reader.
_Decimal = Annotated[str, msgspec.Meta(pattern=f"^{DECIMAL_PATTERN}$")]
_Time = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})$"
    ),
]


class RestTicker(msgspec.Struct):
    """The fields of the REST ticker a resync tick is built from (strings stay strings)."""

    trade_id: Annotated[int, msgspec.Meta(ge=0, lt=2**53)]
    price: _Decimal
    time: _Time
    size: _Decimal | None = None
    bid: _Decimal | None = None
    ask: _Decimal | None = None
    volume: _Decimal | None = None


_decoder = msgspec.json.Decoder(RestTicker)


class TokenBucket:
    """``rate`` tokens/s up to ``burst``; :meth:`acquire` waits for one, in order.

    The server counts requests as they *arrive*, from the first arrival of a burst; we
    take tokens as we *send*. When the first request of a burst is slower than the
    later ones (a new connection, a worker thread starting: ~190 ms measured here), the
    later ones reach the server bunched, and feedsim's bucket of the same size answered
    the 16th request of a burst with a 429. So refilling after a full bucket starts only
    once the burst's first request has been answered (:meth:`settle`; the server saw it
    by then), and one token of the burst is kept in reserve for the jitter that is left.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(max(1, burst - 1))
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._anchoring = False  # refill waits for the first answer of a new burst
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    def _refill(self, now: float) -> None:
        if not self._anchoring:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def acquire(self) -> None:
        async with self._lock:  # one waiter at a time: the others queue behind it in order
            while True:
                now = time.monotonic()
                if now < self._paused_until:
                    await asyncio.sleep(self._paused_until - now)
                    continue
                self._refill(now)
                if self._tokens >= 1.0:
                    if self._tokens >= self.burst:
                        self._anchoring = True
                    self._tokens -= 1.0
                    return
                wait = (1.0 - self._tokens) / self.rate
                # while anchoring, poll: the refill starts when the first answer comes
                await asyncio.sleep(min(wait, 0.05) if self._anchoring else wait)

    def settle(self) -> None:
        """A request was answered (or failed): the server has counted it by now."""
        if self._anchoring:
            self._anchoring = False
            self._stamp = time.monotonic()

    def paused_for(self) -> float:
        return max(0.0, self._paused_until - time.monotonic())

    def give_back(self) -> None:
        """A token taken but not spent."""
        self._tokens = min(self.burst, self._tokens + 1.0)
        self.settle()

    def pause(self, seconds: float) -> None:
        """The server said we are over the limit: no request for ``seconds``, bucket empty."""
        now = time.monotonic()
        self._paused_until = max(self._paused_until, now + seconds)
        self._tokens = 0.0
        self._anchoring = False
        self._stamp = max(now, self._paused_until)


class RestClient:
    """REST tickers under the server's limit of ``rate`` requests/s, bursts of ``burst``."""

    def __init__(self, base_url: str, *, timeout_s: float, rate: float, burst: int) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.bucket = TokenBucket(rate, burst)
        self._pause_s = _DEFAULT_429_PAUSE_S
        # at most ``burst`` requests are in flight; the threads of abandoned ones linger until
        # their server stops trickling: _MAX_ABANDONED more, then requests fail fast
        self._max_threads = burst + _MAX_ABANDONED
        self._threads = threading.BoundedSemaphore(self._max_threads)

    async def ticker(
        self, product: str, *, cancel_if: Callable[[], bool] | None = None
    ) -> RestTicker | None:
        """The product's REST ticker; raises a :class:`RestError` subclass on failure.

        ``cancel_if`` is asked once a rate-limit token is ours: waiting may take a while,
        and a request that became pointless meanwhile returns ``None`` and spends nothing.
        """
        await self.bucket.acquire()
        if cancel_if is not None and cancel_if():
            self.bucket.give_back()
            return None
        url = f"{self.base_url}/products/{quote(product, safe='')}/ticker"
        started = time.perf_counter()
        try:
            body = await self._fetch(url)
        except RestRateLimitedError as exc:
            metrics.REST_REQUESTS.labels(outcome="rate_limited").inc()
            remaining = self.bucket.paused_for()
            if remaining > 0:  # a request sent before the pause: the pause already covers it
                exc.retry_after_s = remaining
                raise
            pause = exc.retry_after_s if exc.retry_after_s is not None else self._pause_s
            self._pause_s = min(self._pause_s * 2, _MAX_429_PAUSE_S)
            exc.retry_after_s = pause
            self.bucket.pause(pause)
            raise
        except RestStatusError:
            metrics.REST_REQUESTS.labels(outcome="http_error").inc()
            raise
        except RestUnavailableError:
            metrics.REST_REQUESTS.labels(outcome="unavailable").inc()
            raise
        except RestBadResponseError:
            metrics.REST_REQUESTS.labels(outcome="bad_response").inc()
            raise
        finally:
            self.bucket.settle()  # answered, failed or cancelled: the server has seen it
        metrics.REST_SECONDS.observe(time.perf_counter() - started)
        self._pause_s = _DEFAULT_429_PAUSE_S
        try:
            ticker = _decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            metrics.REST_REQUESTS.labels(outcome="bad_response").inc()
            raise RestBadResponseError(url, str(exc)) from None
        metrics.REST_REQUESTS.labels(outcome="ok").inc()
        return ticker

    async def _fetch(self, url: str) -> bytes:
        """:meth:`_get` in a daemon thread, within ``timeout_s`` in all."""
        if not self._threads.acquire(blocking=False):
            raise RestUnavailableError(
                url, f"{self._max_threads} earlier requests still hang (past their deadline)"
            )
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bytes] = loop.create_future()

        def settle(body: bytes | None, error: BaseException | None) -> None:
            if done.done():
                return  # the caller gave up on it already
            if error is not None:
                done.set_exception(error)
            else:
                assert body is not None
                done.set_result(body)

        def run() -> None:
            try:
                body, error = self._get(url), None
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                body, error = None, exc
            finally:
                self._threads.release()
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(settle, body, error)

        threading.Thread(target=run, name="rest-get", daemon=True).start()
        try:
            async with asyncio.timeout(self.timeout_s):
                return await done
        except TimeoutError:
            raise RestUnavailableError(
                url, f"no complete answer within {self.timeout_s}s"
            ) from None

    def _get(self, url: str) -> bytes:
        request = urllib.request.Request(
            url, headers={"User-Agent": USER_AGENT, "Accept": "application/json"}
        )
        try:
            with _OPENER.open(request, timeout=self.timeout_s) as response:
                body: bytes = response.read(_MAX_BODY)
                return body
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 429:
                raise RestRateLimitedError(_retry_after(exc.headers.get("Retry-After"))) from None
            raise RestStatusError(url, exc.code) from None
        except http.client.HTTPException as exc:  # a broken status line, chunk or header
            raise RestBadResponseError(url, f"malformed HTTP: {exc!r}") from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise RestUnavailableError(url, str(exc)) from None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """The ticker endpoint does not redirect: a 3xx is an error (RestStatusError), not a
    request to another host, or from https to http, that urllib would follow silently."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def _retry_after(value: str | None) -> float | None:
    """Seconds of a numeric ``Retry-After`` (the HTTP-date form is not worth parsing here)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    if not math.isfinite(seconds):  # "nan" and "inf" parse; a NaN delay crashed the resyncer
        return None
    return min(max(seconds, 0.0), _MAX_429_PAUSE_S)
