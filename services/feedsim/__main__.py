"""``python -m services.feedsim``: run the Coinbase-compatible feed simulator.

Flags override ``FEEDSIM_*`` environment variables. Bad input exits with code 2 and one
``feedsim: error: ...`` line; SIGTERM/SIGINT close every client with 1001 and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import uvloop
from pydantic import ValidationError

from services.common.logging import configure_logging, get_logger
from services.feedsim.errors import FeedSimError
from services.feedsim.server import WS_LOGGER
from services.feedsim.settings import FeedSimSettings
from services.feedsim.sim import FeedSim

log = get_logger(__name__)


class CliError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CliError(message)


# (flag, settings field, help); values are validated by FeedSimSettings, not argparse.
_FLAGS: list[tuple[tuple[str, ...], str, str]] = [
    (("--host",), "host", "interface to bind (default 127.0.0.1)"),
    (("--port",), "port", "ws + REST port (default 8765; 0 = any free port)"),
    (("--products",), "products", "comma-separated product ids (default BTC-USD,ETH-USD,...)"),
    (("--num-products",), "num_products", "add N synthetic products SIM0001-USD..."),
    (("--rate",), "rate", "tickers per second over all products (default 200)"),
    (("--rate-skew",), "rate_skew", "Zipf exponent splitting --rate (0 = even; default 0.5)"),
    (("--seed",), "seed", "market and fault RNG seed (default 1)"),
    (
        ("--sequence-base",),
        "sequence_base",
        "added to every product's first sequence (0; 'clock': above every earlier run's)",
    ),
    (("--max-ticks",), "max_ticks", "stop the market after N tickers (default 0 = never)"),
    (
        ("--wait-subscribers", "--replay-wait-subscribers"),
        "wait_subscribers",
        "start ticking/replaying once N clients subscribed (default 0; replay 1)",
    ),
    (("--channels-allowed",), "channels_allowed", "channels offered (ticker,heartbeat,...)"),
    (("--replay",), "replay", "replay a JSONL file of Coinbase messages instead of simulating"),
    (("--speed",), "speed", "replay speed factor, or 'max' (default 1 = real time)"),
    (("--replay-end",), "replay_end", "after the replay: idle (default), exit or loop"),
    (("--faults",), "faults", "e.g. gap=0.01,dup=0.01,malformed=0.001,disconnect=30s,stall=5s@30s"),
    (("--emit-log",), "emit_log", "append every emitted ticker (and its fault) to this JSONL"),
    (
        ("--delivery-log",),
        "delivery_log",
        "append a CSV line per ticker frame written to a client socket (auditing)",
    ),
    (("--metrics-port",), "metrics_port", "Prometheus /metrics port (default 0 = off)"),
    (("--log-level",), "log_level", "DEBUG, INFO (default), WARNING, ERROR"),
    (("--subscribe-timeout",), "subscribe_timeout_s", "seconds to wait for a subscribe (5)"),
    (("--heartbeat-interval",), "heartbeat_interval_s", "seconds between heartbeats (1)"),
    (("--compression",), "compression", "deflate (default, like Coinbase) or none"),
    (("--max-client-buffer",), "max_client_buffer_bytes", "bytes backlog before ErrSlowConsume"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m services.feedsim",
        description="Coinbase-Exchange-compatible ws feed + REST ticker simulator/replayer.",
        argument_default=argparse.SUPPRESS,
    )
    for flags, dest, help_text in _FLAGS:
        parser.add_argument(*flags, dest=dest, help=help_text, metavar="VALUE")
    return parser


def _flag_of(field: str) -> str:
    for flags, dest, _ in _FLAGS:
        if dest == field:
            return flags[0]
    return field


def parse_settings(argv: Sequence[str] | None = None) -> FeedSimSettings:
    """CLI flags over ``FEEDSIM_*`` env over defaults; raises CliError with one line."""
    values: dict[str, Any] = vars(build_parser().parse_args(argv))
    try:
        return FeedSimSettings(**values)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            msg = str(err["msg"]).removeprefix("Value error, ")
            parts.append(f"{_flag_of(field)}: {msg}" if field else msg)
        raise CliError("; ".join(parts)) from None


async def run(settings: FeedSimSettings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with FeedSim(settings) as sim, asyncio.TaskGroup() as tg:
        waiters = [tg.create_task(stop.wait()), tg.create_task(sim.finished.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        log.info("shutting_down", signal=stop.is_set())
    return 1 if sim.error is not None else 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_settings(argv)
    except CliError as exc:
        print(f"feedsim: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, service="feedsim")
    # websockets logs every handshake and HTTP answer at INFO: keep it for DEBUG runs.
    WS_LOGGER.setLevel(logging.DEBUG if settings.log_level == "DEBUG" else logging.WARNING)
    try:
        code = uvloop.run(run(settings))
    except FeedSimError as exc:
        print(f"feedsim: error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
