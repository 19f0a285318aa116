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
