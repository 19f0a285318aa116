"""Normalizer settings."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from services.common.settings import CommonSettings
from services.common.shards import check_shards, owned_shards, parse_shards, shard_tag


class NormalizerSettings(CommonSettings):
    normalizer_shards: Annotated[list[int] | None, NoDecode] = Field(
        default=None, description="Shards this replica owns (e.g. 0,1); all when unset"
    )
    fetch_batch: int = Field(default=1024, ge=1, le=100_000)
    fetch_timeout_s: float = Field(default=0.5, gt=0)
    ack_wait_s: float = Field(default=10.0, gt=0, description="Redelivery after this long")
    metrics_port: int = Field(default=9102, ge=0, le=65535)

    @field_validator("normalizer_shards", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return parse_shards(value)

    @model_validator(mode="after")
    def _shards_in_range(self) -> NormalizerSettings:
        self.normalizer_shards = check_shards(
            self.normalizer_shards, self.num_shards, "NORMALIZER_SHARDS"
        )
        return self

    @property
    def owned_shards(self) -> frozenset[int]:
        return owned_shards(self.normalizer_shards, self.num_shards)

    @property
    def durable_name(self) -> str:
        tag = shard_tag(self.normalizer_shards, self.num_shards)
        return f"normalizer-{tag}" if tag else "normalizer"
