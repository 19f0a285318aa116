"""Typed settings read once at start-up: environment (and `.env`), overridden by CLI flags.

Each service subclasses :class:`CommonSettings`. Every field maps to an env var of the
same name in upper case (``nats_urls`` ← ``NATS_URLS``) and to a CLI flag in kebab case
(``--nats-urls``). Bad values fail at boot with one clear line, never at first use.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Self, cast
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.common.subjects import is_valid_product

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
_NATS_SCHEMES = {"nats", "tls", "ws", "wss"}


def split_csv(value: object) -> object:
    """Env lists are comma separated (``BTC-USD,ETH-USD``), not JSON."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def redact_url(url: str) -> str:
    """The URL without its user:password part."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


def normalize_products(products: list[str]) -> list[str]:
    """Upper-cased, de-duplicated product ids, each usable as one subject token."""
    bad = [p for p in products if not is_valid_product(p)]
    if bad:
        raise ValueError(f"invalid product ids {bad}")
    return list(dict.fromkeys(p.upper() for p in products))


class ConfigError(Exception):
    """Settings that cannot run; the message is the one line shown to the operator."""


class CommonSettings(BaseSettings):
    """Settings every service shares."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        env_ignore_empty=True,
        extra="ignore",
        validate_default=True,
        # "inf" passed every gt=0 and overflowed later (a socket timeout, a sleep)
        allow_inf_nan=False,
    )

    log_level: LogLevel = "INFO"
    nats_urls: Annotated[list[str], NoDecode] = Field(default=["nats://localhost:4222"])
    nats_connect_timeout_s: float = Field(default=5.0, gt=0)
    num_shards: int = Field(default=4, ge=1, le=1024)
    stream_replicas: int = Field(default=1, ge=1, le=5)
    raw_max_age_s: float = Field(default=24 * 3600, gt=0)
    ticks_max_age_s: float = Field(default=7 * 24 * 3600, gt=0)
    dlq_max_age_s: float = Field(default=7 * 24 * 3600, gt=0)
    stream_max_bytes: int = Field(default=8 * 1024**3, gt=0)
    dedup_window_s: float = Field(default=120.0, ge=120.0)
    publish_max_in_flight: int = Field(default=4096, ge=1)
    publish_ack_timeout_s: float = Field(default=10.0, gt=0)
    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(default=0, ge=0, le=65535)
    drain_timeout_s: float = Field(default=10.0, gt=0)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("nats_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        return split_csv(value)

    @field_validator("nats_urls")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        if not urls:
            raise ValueError("at least one NATS URL is required")
        for url in urls:
            parts = urlsplit(url)
            shown = repr(redact_url(url))
            try:
                port = parts.port
            except ValueError as exc:
                raise ValueError(f"{shown}: {exc}") from None
            if parts.scheme not in _NATS_SCHEMES or not parts.hostname:
                raise ValueError(
                    f"{shown} is not a NATS URL (expected nats://host:port, comma separated)"
                )
            if port == 0:
                raise ValueError(f"{shown}: port 0 is not a server port")
        return urls

    @classmethod
    def load(cls, argv: Sequence[str] | None = None, *, prog: str | None = None) -> Self:
        """Read env, then CLI flags; raise :class:`ConfigError` with one readable line."""
        overrides = _parse_flags(cls, list(sys.argv[1:] if argv is None else argv), prog)
        try:
            return cls(**cast(dict[str, Any], overrides))
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_flags(model: type[BaseSettings], argv: list[str], prog: str | None) -> dict[str, object]:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Every flag mirrors the env var of the same name in upper snake case.",
        argument_default=argparse.SUPPRESS,
    )
    for name, field in model.model_fields.items():
        parser.add_argument(_flag(name), dest=name, metavar=name.upper(), help=field.description)
    try:
        namespace = parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0:  # --help
            raise
        raise ConfigError("invalid command line (see --help)") from None
    return dict(vars(namespace))


_SECRET_HINTS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "URL")


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "settings"
        env = field.split(".")[0].upper()
        # URLs may carry credentials and keys are secrets: never echo those values. An
        # error of the model as a whole (a check across fields) has no field, and its input
        # is every setting, secrets included
        secret = not error["loc"] or any(h in env for h in _SECRET_HINTS)
        shown = "" if secret else f" (got {error.get('input')!r})"
        problems.append(f"{env}: {error['msg']}{shown}")
    return "; ".join(problems)
