"""Snapshotter settings."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from services.common.settings import CommonSettings
from services.common.shards import check_shards, owned_shards, parse_shards, shard_tag


class SnapshotterSettings(CommonSettings):
    ddb_table: str = Field(default="ledgerflux-latest", min_length=3, max_length=255)
    ddb_endpoint_url: str | None = Field(
        default=None, description="DynamoDB Local URL; unset = AWS endpoint of AWS_REGION"
    )
    ddb_create_table: bool = True
    ddb_max_concurrency: int = Field(default=32, ge=1, le=1024)
    ddb_items_per_call: int = Field(
        default=100,
        ge=1,
        le=100,
        description="Conditional updates per TransactWriteItems call (1 = one UpdateItem each)",
    )
    ddb_flush_interval_ms: int = Field(
        default=1000,
        ge=0,
        le=60_000,
        description="Minimum time between flush passes (0 = back to back)",
    )
    s3_bucket: str = Field(default="ledgerflux-snapshots", min_length=3, max_length=63)
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible URL (MinIO, SeaweedFS); unset = AWS S3"
    )
    aws_region: str = "us-east-1"
    # Read here (not only by boto from the process environment) so that a ``.env`` file
    # works too; unset, boto's standard chain applies (instance role, profile, ...).
    aws_access_key_id: str | None = Field(
        default=None, description="Key id for local servers; unset = AWS's credential chain"
    )
    aws_secret_access_key: SecretStr | None = Field(
        default=None, description="Secret for local servers; never logged"
    )
    snapshot_period_ms: int = Field(default=5_000, gt=0)
    snapshot_retention: int = Field(default=100, ge=1, description="Snapshots kept in S3")
    snapshotter_durable: str | None = Field(
        default=None, description="Consumer name override (default derives from the shards)"
    )
    snapshotter_shards: Annotated[list[int] | None, NoDecode] = Field(
        default=None, description="Shards this replica owns (e.g. 0,1); all when unset"
    )
    fetch_batch: int = Field(default=5_000, ge=1, le=100_000)
    fetch_timeout_s: float = Field(default=0.5, gt=0)
    max_ack_pending: int = Field(default=200_000, ge=1)
    metrics_port: int = Field(default=9103, ge=0, le=65535)

    @field_validator("snapshotter_shards", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return parse_shards(value)

    @model_validator(mode="after")
    def _shards_in_range(self) -> SnapshotterSettings:
        self.snapshotter_shards = check_shards(
            self.snapshotter_shards, self.num_shards, "SNAPSHOTTER_SHARDS"
        )
        return self

    @property
    def owned_shards(self) -> frozenset[int]:
        return owned_shards(self.snapshotter_shards, self.num_shards)

    @property
    def shard_tag(self) -> str:
        """``""`` for a replica owning every shard, else ``s0-1``."""
        return shard_tag(self.snapshotter_shards, self.num_shards)

    @property
    def durable_name(self) -> str:
        if self.snapshotter_durable:
            return self.snapshotter_durable
        return f"snapshotter-{self.shard_tag}" if self.shard_tag else "snapshotter"

    @property
    def snapshot_prefix(self) -> str:
        """``snapshots/`` (DESIGN §7), or ``snapshots/s0-1/`` for a replica owning a subset."""
        return "snapshots/" + (f"{self.shard_tag}/" if self.shard_tag else "")
