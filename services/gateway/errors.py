"""Gateway errors."""

from __future__ import annotations

from services.common.errors import LedgerFluxError


class GatewayError(LedgerFluxError):
    """Base of gateway errors."""


class BackfillUnavailableError(GatewayError):
    """JetStream could not serve a backfill (stream missing, timeout, NATS away)."""

    def __init__(self, product: str, reason: str) -> None:
        self.product = product
        self.reason = reason
        super().__init__(f"backfill of {product} unavailable: {reason}")
