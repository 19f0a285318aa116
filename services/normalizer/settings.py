"""Normalizer settings."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from services.common.settings import CommonSettings, split_csv


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
        if value in ("", "all", None):
            return None
        return split_csv(value)

    @model_validator(mode="after")
    def _shards_in_range(self) -> NormalizerSettings:
        if self.normalizer_shards is not None:
            bad = [s for s in self.normalizer_shards if not 0 <= s < self.num_shards]
            if bad or not self.normalizer_shards:
                raise ValueError(
                    f"NORMALIZER_SHARDS must be within 0..{self.num_shards - 1} (got {bad})"
                )
            self.normalizer_shards = sorted(set(self.normalizer_shards))
        return self

    @property
    def owned_shards(self) -> frozenset[int]:
        return frozenset(self.normalizer_shards or range(self.num_shards))

    @property
    def durable_name(self) -> str:
        if self.normalizer_shards is None or len(self.owned_shards) == self.num_shards:
            return "normalizer"
        return "normalizer-s" + "-".join(str(s) for s in sorted(self.owned_shards))
