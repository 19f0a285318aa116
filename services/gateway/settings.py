"""Gateway settings."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from services.common.settings import CommonSettings, normalize_products, split_csv


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
    ws_flood_strikes: int = Field(
        default=50, ge=1, description="Rate-limited commands within WS_FLOOD_WINDOW_S → 1008"
    )
    ws_flood_window_s: float = Field(
        default=10.0, gt=0, description="Window in which WS_FLOOD_STRIKES count as flooding"
    )
    metrics_port: int = Field(default=0, ge=0, le=65535, description="/metrics is on the HTTP port")

    # keepalive: uvicorn pings every interval; no pong within the timeout closes with 1011
    ws_ping_interval_s: float = Field(default=20.0, gt=0)
    ws_ping_timeout_s: float = Field(default=20.0, gt=0)
    ws_handshake_timeout_s: float = Field(
        default=10.0, gt=0, description="A TCP connection must complete its HTTP request within"
    )
    ws_handshakes_per_sec: float = Field(
        default=300.0,
        gt=0,
        le=1_000_000,
        description="WebSocket upgrades admitted per second; the rest wait (pacing.py)",
    )
    ws_handshake_burst: int = Field(
        default=20, ge=1, description="WebSocket upgrades admitted back to back before pacing"
    )
    ws_per_message_deflate: bool = Field(
        default=False, description="Offer permessage-deflate (zlib per client per frame)"
    )
    ws_batch_flush_ms: float = Field(
        default=3.0, gt=0, le=1000, description="?batch=true: coalescing window"
    )

    # who may connect
    gateway_api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default=[], description="Comma separated; empty = open"
    )
    ws_allowed_origins: Annotated[list[str], NoDecode] = Field(
        default=[], description="Browser Origins allowed on /ws; empty = any"
    )
    ws_max_connections_per_key: int = Field(default=100, ge=1)
    redis_url: str | None = Field(default=None, description="Shared limits across replicas")
    redis_key_prefix: str = "ledgerflux:gateway:"
    redis_lease_s: float = Field(
        default=30.0, ge=3.0, description="A replica's counts expire this long after it dies"
    )
    redis_timeout_s: float = Field(default=0.5, gt=0)

    # the live tail of MD_TICKS: an ordered JetStream consumer, recreated where it left off
    live_heartbeat_s: float = Field(
        default=1.0, ge=0.1, le=30, description="Two missed heartbeats recreate the consumer"
    )

    # backfill from MD_TICKS
    backfill_max: int = Field(default=10_000, ge=1, le=1_000_000)
    backfill_timeout_s: float = Field(default=5.0, gt=0)
    backfill_concurrency: int = Field(default=8, ge=1)

    @field_validator("coinbase_products", "gateway_api_keys", "ws_allowed_origins", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return split_csv(value)

    @field_validator("coinbase_products")
    @classmethod
    def _check_products(cls, products: list[str]) -> list[str]:
        return normalize_products(products)

    @field_validator("ws_allowed_origins")
    @classmethod
    def _check_origins(cls, origins: list[str]) -> list[str]:
        out = []
        for origin in origins:
            parts = urlsplit(origin)
            if parts.scheme not in {"http", "https"} or not parts.netloc or parts.path.strip("/"):
                raise ValueError(f"{origin!r} is not an origin (expected https://host[:port])")
            out.append(normalize_origin(origin))
        return out

    @field_validator("redis_url")
    @classmethod
    def _check_redis(cls, url: str | None) -> str | None:
        if url and urlsplit(url).scheme not in {"redis", "rediss", "unix"}:
            # the URL may hold a password: name the problem, never echo the value
            raise ValueError("not a Redis URL (expected redis://[:password@]host:port/db)")
        return url or None


def normalize_origin(origin: str) -> str:
    """``HTTPS://Example.com:443/`` → ``https://example.com:443``: compare origins by value."""
    return origin.strip().rstrip("/").lower()
