"""Structured JSON logging with context bound once per unit of work.

Every service calls :func:`configure_logging` once at start-up. Code below binds
context (``service``, ``subject``, ``conn_id`` ...) with
``structlog.contextvars.bound_contextvars`` so every line it logs carries it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


def configure_logging(
    level: str = "INFO", *, service: str | None = None, json: bool | None = None
) -> None:
    """Route structlog (and stdlib logging of our dependencies) to stderr.

    JSON unless stderr is a terminal (or ``json`` forces a choice); ``service`` is
    bound into every line.
    """
    level = level.upper()
    if level not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}")
    use_json = (not sys.stderr.isatty()) if json is None else json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries (nats, botocore, uvicorn) log through stdlib: render them the same way.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(logging.getLevelNamesMapping()[level], logging.INFO))
    for noisy in ("botocore", "aiobotocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.contextvars.clear_contextvars()
    if service:
        structlog.contextvars.bind_contextvars(service=service)


def get_logger(name: str | None = None, **initial: Any) -> structlog.typing.FilteringBoundLogger:
    """A structlog logger; ``initial`` key/values are bound to every line it logs."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name, **initial)
    return logger
