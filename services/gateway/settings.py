"""Gateway settings."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from services.common.settings import CommonSettings, split_csv
from services.common.subjects import is_valid_product


class GatewaySettings(CommonSettings):
    gateway_host: str = "0.0.0.0"
    gateway_port: int = Field(default=8080, ge=0, le=65535)
    coinbase_products: Annotated[list[str], NoDecode] = Field(
        default=["BTC-USD", "ETH-USD"],
        description="Products served before they are seen on MD_TICKS",
    )
    ws_max_msgs_per_sec: float = Field(default=1000.0, gt=0, description="Outbound refill rate")
    ws_burst: int = Field(default=2000, ge=1, description="Outbound token bucket capacity")
    ws_max_frame_bytes: int = Field(default=64 * 1024, ge=256)
    ws_max_connections: int = Field(default=10_000, ge=1)
    ws_max_subscriptions: int = Field(default=100, ge=1)
    ws_send_queue: int = Field(default=1_000, ge=16, description="Frames buffered per client")
    ws_slow_consumer_s: float = Field(default=5.0, gt=0)
    ws_cmds_per_sec: float = Field(default=20.0, gt=0, description="Inbound command rate")
    ws_cmd_burst: int = Field(default=40, ge=1)
    ws_flood_strikes: int = Field(default=50, ge=1, description="Rate-limited commands → 1008")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="/metrics is on the HTTP port")

    @field_validator("coinbase_products", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return split_csv(value)

    @field_validator("coinbase_products")
    @classmethod
    def _check_products(cls, products: list[str]) -> list[str]:
        bad = [p for p in products if not is_valid_product(p)]
        if bad:
            raise ValueError(f"invalid product ids {bad}")
        return [p.upper() for p in products]
