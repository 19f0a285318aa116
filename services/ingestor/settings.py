"""Ingestor settings (env vars of DESIGN §10, CLI flags mirror them)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from services.common.settings import CommonSettings, normalize_products, split_csv

KNOWN_CHANNELS = ("ticker", "heartbeat", "matches", "status")


class IngestorSettings(CommonSettings):
    coinbase_ws_url: str = "wss://ws-feed.exchange.coinbase.com"
    coinbase_rest_url: str = "https://api.exchange.coinbase.com"
    coinbase_products: Annotated[list[str], NoDecode] = Field(default=["BTC-USD", "ETH-USD"])
    coinbase_channels: Annotated[list[str], NoDecode] = Field(default=["ticker", "heartbeat"])
    # Coinbase's public REST limit is 10 req/s per IP, bursts to 15 (coinbase-protocol.md §3)
    coinbase_rest_rate_per_s: float = Field(default=10.0, gt=0)
    coinbase_rest_burst: int = Field(default=15, ge=1)
    coinbase_rest_timeout_s: float = Field(default=5.0, gt=0, le=300)
    resync_max_attempts: int = Field(default=5, ge=1)
    watchdog_timeout_s: float = Field(default=15.0, gt=0, le=3600)
    # a floor, or a failing feed is reconnected thousands of times a second (a ban risk)
    reconnect_initial_s: float = Field(default=0.5, ge=0.05, le=60)
    reconnect_max_s: float = Field(default=30.0, ge=0.05, le=3600)
    ingest_buffer_max: int = Field(default=100_000, ge=100)
    publish_batch_max: int = Field(default=1024, ge=1)
    feed_max_frame_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    # Frames websockets may read ahead of the reader (it stops reading past this); see
    # ARCHITECTURE "Ingestor" for why it is far above websockets' default of 16.
    feed_max_queue: int = Field(default=4096, ge=16)
    record: str | None = None
    record_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    metrics_port: int = Field(default=9101, ge=0, le=65535)

    @field_validator("coinbase_products", "coinbase_channels", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return split_csv(value)

    @field_validator("coinbase_products")
    @classmethod
    def _check_products(cls, products: list[str]) -> list[str]:
        if not products:
            raise ValueError("at least one product is required")
        return normalize_products(products)

    @field_validator("coinbase_ws_url")
    @classmethod
    def _check_ws_url(cls, url: str) -> str:
        if not url.startswith(("ws://", "wss://")):
            raise ValueError("must be a ws:// or wss:// URL")
        return url

    @field_validator("coinbase_rest_url")
    @classmethod
    def _check_rest_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return url

    @model_validator(mode="after")
    def _check_backoff(self) -> IngestorSettings:
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("RECONNECT_MAX_S must be at least RECONNECT_INITIAL_S")
        return self

    @field_validator("coinbase_channels")
    @classmethod
    def _check_channels(cls, channels: list[str]) -> list[str]:
        unknown = [c for c in channels if c not in KNOWN_CHANNELS]
        if unknown:
            raise ValueError(f"unknown channels {unknown}; known: {', '.join(KNOWN_CHANNELS)}")
        if not channels:
            raise ValueError("at least one channel is required")
        return list(dict.fromkeys(channels))
