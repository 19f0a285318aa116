"""Typed settings of the feed simulator, read once (CLI flags override ``FEEDSIM_*`` env)."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.feedsim.faults import FaultSpec, parse_faults

DEFAULT_PRODUCTS = ("BTC-USD", "ETH-USD", "SOL-USD", "ADA-USD", "DOGE-USD")
KNOWN_CHANNELS = ("ticker", "heartbeat", "matches", "status")
_PRODUCT_RE = re.compile(r"^[A-Z0-9]{1,16}-[A-Z0-9]{1,16}$")


def synthetic_products(n: int) -> list[str]:
    """``SIM0001-USD`` ... for benchmarks with many products."""
    width = max(4, len(str(n)))
    return [f"SIM{i:0{width}d}-USD" for i in range(1, n + 1)]


def clock_sequence_base(now_s: float | None = None) -> int:
    """``--sequence-base clock``: above every earlier run's sequences, as Coinbase's only grow.

    A stack keeps MD_TICKS between runs and the normalizer drops a sequence not above the
    last it stored, so with the same seed a second run showed a frozen board. One million
    per second since 2024 outgrows the feed (a product advances by tens of thousands a
    second at most) and stays under the 10^15 bound.
    """
    now_s = time.time() if now_s is None else now_s
    return int((now_s - _EPOCH_2024) * 1_000_000)


_EPOCH_2024 = 1_704_067_200.0


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    return value


class FeedSimSettings(BaseSettings):
    """Everything ``python -m services.feedsim`` can be told; see services/feedsim/README.md."""

    model_config = SettingsConfigDict(env_prefix="FEEDSIM_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)  # 0 = any free port (see FeedSim.port)
    products: Annotated[list[str], NoDecode] = Field(default_factory=list)
    num_products: int = Field(default=0, ge=0, le=100_000)
    rate: float = Field(default=200.0, ge=0, allow_inf_nan=False)  # ticks/s over all products
    # Zipf-like split of --rate: product i (in --products order) gets weight 1/(i+1)**skew.
    rate_skew: float = Field(default=0.5, ge=0, le=5)
    seed: int = 1
    # Added to every product's first sequence: a restarted simulator that must continue
    # above the sequences a consumer has already seen (benchmarks run several feeds).
    sequence_base: int = Field(default=0, ge=0, le=10**15)
    max_ticks: int = Field(default=0, ge=0)  # stop the market after this many ticks (0 = never)
    # Market mode: hold ticks until this many clients hold a subscription (0 = start at once).
    # Replay mode: default 1.
    wait_subscribers: int | None = Field(default=None, ge=0)
    channels_allowed: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(KNOWN_CHANNELS)
    )

    replay: Path | None = None
    speed: float = Field(default=1.0, gt=0)  # replay speed; inf (CLI "max") = no pacing
    replay_end: Literal["idle", "exit", "loop"] = "idle"

    faults: Annotated[FaultSpec, NoDecode] = Field(default_factory=FaultSpec)
    emit_log: Path | None = None
    # every ticker frame written to a client socket, as CSV lines (see deliverylog.py)
    delivery_log: Path | None = None
    metrics_port: int = Field(default=0, ge=0, le=65535)
    log_level: str = "INFO"

    subscribe_timeout_s: float = Field(default=5.0, gt=0)  # Coinbase: subscribe within 5 s
    heartbeat_interval_s: float = Field(default=1.0, gt=0)  # Coinbase: 1 heartbeat/s/product
    status_interval_s: float = Field(default=10.0, gt=0)
    batch_interval_ms: float = Field(default=2.0, gt=0, le=1000)
    max_batch_ticks: int = Field(default=2_000, gt=0)
    max_client_buffer_bytes: int = Field(default=8 * 2**20, gt=0)  # then: slow consumer, close
    close_timeout_s: float = Field(default=2.0, gt=0)
    compression: Literal["deflate", "none"] = "deflate"  # Coinbase offers permessage-deflate
    rest_rate_per_s: float = Field(default=10.0, gt=0)  # Coinbase public REST: 10 req/s
    rest_burst: int = Field(default=15, gt=0)  # ... bursts to 15

    @field_validator("products", "channels_allowed", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("products")
    @classmethod
    def _product_names(cls, value: list[str]) -> list[str]:
        for p in value:
            if not _PRODUCT_RE.match(p):
                raise ValueError(f"invalid product id {p!r} (expected BASE-QUOTE, e.g. BTC-USD)")
        return list(dict.fromkeys(value))

    @field_validator("channels_allowed")
    @classmethod
    def _channels(cls, value: list[str]) -> list[str]:
        for c in value:
            if c not in KNOWN_CHANNELS:
                raise ValueError(f"unknown channel {c!r} (known: {', '.join(KNOWN_CHANNELS)})")
        return value

    @field_validator("speed", mode="before")
    @classmethod
    def _speed(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip().lower()
            if text == "max":
                return math.inf
            try:
                return float(text)
            except ValueError:
                raise ValueError(f"{value!r} is neither a number nor 'max'") from None
        return value

    @field_validator("sequence_base", mode="before")
    @classmethod
    def _sequence_base(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "clock":
            return clock_sequence_base()
        return value

    @field_validator("faults", mode="before")
    @classmethod
    def _faults(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_faults(value)  # FaultSpecError is a ValueError: reported per field
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"unknown log level {value!r}")
        return level

    @model_validator(mode="after")
    def _replay_speed(self) -> FeedSimSettings:
        if self.speed != math.inf and not math.isfinite(self.speed):
            raise ValueError("speed must be a positive number or 'max'")
        return self

    @property
    def product_ids(self) -> list[str]:
        """--products, then --num-products synthetic names; the default set if neither."""
        if not self.products and not self.num_products:
            return list(DEFAULT_PRODUCTS)
        return list(dict.fromkeys([*self.products, *synthetic_products(self.num_products)]))

    @property
    def effective_wait_subscribers(self) -> int:
        if self.wait_subscribers is not None:
            return self.wait_subscribers
        return 1 if self.replay is not None else 0
