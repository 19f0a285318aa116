"""Normalizer errors: why a raw frame cannot become a tick (each maps to a DLQ reason)."""

from __future__ import annotations

from services.common.errors import LedgerFluxError


class NormalizerError(LedgerFluxError):
    """Base of normalizer errors."""


class RejectedFrameError(NormalizerError):
    """A frame that will never become a tick; ``reason`` names its dead-letter subject."""

    reason = "invalid"

    def __init__(self, message: str) -> None:
        super().__init__(message)


class UnparseableError(RejectedFrameError):
    reason = "unparseable"


class SchemaError(RejectedFrameError):
    reason = "schema"


class BadDecimalError(RejectedFrameError):
    reason = "bad_decimal"


class BadValueError(RejectedFrameError):
    reason = "bad_value"


class BadTimeError(RejectedFrameError):
    reason = "bad_time"


class ProductMismatchError(RejectedFrameError):
    reason = "product_mismatch"


class UnsupportedTypeError(RejectedFrameError):
    reason = "unsupported_type"


DLQ_REASONS = tuple(
    cls.reason
    for cls in (
        UnparseableError,
        SchemaError,
        BadDecimalError,
        BadValueError,
        BadTimeError,
        ProductMismatchError,
        UnsupportedTypeError,
    )
)
