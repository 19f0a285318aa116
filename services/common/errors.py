"""Errors shared by every service."""

from __future__ import annotations


class LedgerFluxError(Exception):
    """Base of every error raised by LedgerFlux code."""


class StoppedError(LedgerFluxError):
    """A stop was requested while the service was still waiting for a dependency: it exits
    0 (nothing was taken, so nothing is left to finish)."""


class PortUnavailableError(LedgerFluxError):
    """A port the service must listen on is taken: an operator error (exit 2, one line)."""


class BrokerError(LedgerFluxError):
    """NATS/JetStream failed in a way the caller must handle (retry, nak, stop)."""


class PublishTimeoutError(BrokerError):
    def __init__(self, pending: int, timeout_s: float) -> None:
        self.pending = pending
        self.timeout_s = timeout_s
        super().__init__(f"{pending} publishes not acked within {timeout_s:.1f}s")


class StreamConfigError(BrokerError):
    def __init__(self, stream: str, reason: str) -> None:
        self.stream = stream
        super().__init__(f"stream {stream}: {reason}")


class ShardCountMismatchError(BrokerError):
    """NUM_SHARDS differs from the one MD_TICKS was sharded with: an operator error."""

    def __init__(self, stored: str, ours: int) -> None:
        self.stored = stored
        self.ours = ours
        super().__init__(
            f"NUM_SHARDS={ours}, but MD_TICKS is sharded by {stored} (its metadata "
            f"{NUM_SHARDS_METADATA!r}): every service must use the same NUM_SHARDS; to "
            "re-shard, recreate the stream"
        )


NUM_SHARDS_METADATA = "ledgerflux.num_shards"
