"""Errors raised by the feed simulator; all derive from :class:`FeedSimError`."""

from __future__ import annotations

from pathlib import Path


class FeedSimError(Exception):
    """Base of every feedsim error; the CLI turns these into one line and exit code 2."""


class FaultSpecError(FeedSimError, ValueError):
    def __init__(self, spec: str, reason: str) -> None:
        self.spec = spec
        self.reason = reason
        super().__init__(f"{spec!r}: {reason}")


class ReplayFileError(FeedSimError):
    def __init__(self, path: Path, reason: str, line: int | None = None) -> None:
        self.path = path
        self.reason = reason
        self.line = line
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"replay file {where}: {reason}")


class ProductNameError(FeedSimError, ValueError):
    def __init__(self, product_id: str) -> None:
        self.product_id = product_id
        super().__init__(f"invalid product id {product_id!r} (expected BASE-QUOTE, e.g. BTC-USD)")
