"""Snapshotter errors."""

from __future__ import annotations

from services.common.errors import LedgerFluxError


class SnapshotterError(LedgerFluxError):
    """Base of snapshotter errors."""


class TableSchemaError(SnapshotterError):
    def __init__(self, table: str, key_schema: object) -> None:
        self.table = table
        super().__init__(
            f"table {table!r} exists with key schema {key_schema}; expected partition key "
            "'product' (S) only"
        )


class StoreUnavailableError(SnapshotterError):
    def __init__(self, store: str, error: str) -> None:
        self.store = store
        super().__init__(f"{store} unavailable: {error}")


class SnapshotReadError(SnapshotterError):
    """An object in S3 that is not a snapshot (or pointer) this code wrote."""

    def __init__(self, key: str, error: str) -> None:
        self.key = key
        super().__init__(f"{key} is not a valid snapshot object: {error}")
