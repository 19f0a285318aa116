"""Ingestor errors."""

from __future__ import annotations

from services.common.errors import LedgerFluxError


class IngestorError(LedgerFluxError):
    """Base of ingestor errors."""


class FeedStalledError(IngestorError):
    def __init__(self, silent_s: float) -> None:
        self.silent_s = silent_s
        super().__init__(f"no frame from the feed for {silent_s:.1f}s")


class FeedClosedError(IngestorError):
    def __init__(self, code: int | None, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"feed closed the connection (code={code}, reason={reason!r})")


class RestError(IngestorError):
    """The REST ticker could not be fetched; the resync is retried later."""


class RestRateLimitedError(RestError):
    def __init__(self, retry_after_s: float | None) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"REST rate limited (429), retry after {retry_after_s}s")


class RestStatusError(RestError):
    def __init__(self, url: str, status: int) -> None:
        self.url = url
        self.status = status
        super().__init__(f"GET {url} answered HTTP {status}")


class RestUnavailableError(RestError):
    def __init__(self, url: str, error: str) -> None:
        self.url = url
        super().__init__(f"GET {url} failed: {error}")


class RestBadResponseError(RestError):
    def __init__(self, url: str, error: str) -> None:
        self.url = url
        super().__init__(f"GET {url}: unexpected body: {error}")
