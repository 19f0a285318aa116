r"""cryptofeed baseline: cost of Coinbase (Advanced Trade) ``market_trades`` message handling.

Runs INSIDE bench/.venvs/cryptofeed (Python >= 3.13, made by setup.sh):

    bench/.venvs/cryptofeed/bin/python bench/cryptofeed/run.py TICKERS.jsonl \
        [--trades-per-frame 1 5] [--repeats 10] [--warmup 1] [--limit N]

Each Coinbase Exchange ``ticker`` line becomes one trade of an Advanced Trade ``market_trades``
frame (K consecutive trades per frame). A real ``cryptofeed.exchanges.Coinbase`` feed, with its
symbol table preset through its own ``_parse_symbol_data`` so that it never touches the network,
hands each raw frame string to the handler that ``Feed.connect()`` wires to the websocket
connection (``Coinbase.message_handler``), exactly as ``ConnectionHandler`` does:
``await handler(message, conn, conn.last_message)``. That covers JSON decoding (cryptofeed's
msgspec backend, Decimal floats), the per-connection sequence check, symbol mapping, Decimal
size/price, ISO timestamp parsing, the ``Trade`` object, and dispatch to the Trades callback,
which only counts.

Prints one JSON line per K to stdout (a human summary goes to stderr). Exits non-zero when the
callback count differs from the trade count, when a decoded trade differs from its ticker, or
when cryptofeed logged a warning (a skipped trade), so it cannot silently time a no-op path.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import json
import logging
import platform
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

if sys.version_info < (3, 13):  # before importing cryptofeed, which needs 3.13
    raise SystemExit(
        "run this with the cryptofeed venv's Python (>= 3.13): bench/.venvs/cryptofeed/bin/python"
    )

from cryptofeed import _json as cf_json
from cryptofeed.connection import AsyncConnection
from cryptofeed.defines import BUY, SELL, TRADES
from cryptofeed.exchanges.coinbase import Coinbase
from cryptofeed.symbols import Symbols
from cryptofeed.types import Trade

Handler = Callable[[str, AsyncConnection, float], Awaitable[None]]

TICKER_FIELDS = ("product_id", "price", "side", "time", "trade_id", "last_size")


# --------------------------------------------------------------------------- input


def load_tickers(path: Path, limit: int | None) -> tuple[list[dict[str, Any]], int]:
    """Ticker messages that carry a trade, in file order, and how many lines were skipped."""
    tickers: list[dict[str, Any]] = []
    skipped = 0
    with path.open("rb") as fp:
        for raw in fp:
            if not raw.strip():
                continue
            msg = json.loads(raw)
            if msg.get("type") != "ticker" or any(msg.get(f) is None for f in TICKER_FIELDS):
                skipped += 1
                continue
            tickers.append(msg)
            if limit is not None and len(tickers) >= limit:
                break
    return tickers, skipped


def maker_side(ticker_side: str) -> str:
    """Exchange ``ticker.side`` is the taker side; cryptofeed reads Advanced Trade's as maker side.

    So a taker buy travels as ``"SELL"`` and cryptofeed reports it back as ``buy``: the same trade.
    """
    if ticker_side == "buy":
        return "SELL"
    if ticker_side == "sell":
        return "BUY"
    raise ValueError(f"unexpected ticker side {ticker_side!r}")


def to_market_trade(ticker: dict[str, Any]) -> dict[str, str]:
    return {
        "trade_id": str(ticker["trade_id"]),
        "product_id": ticker["product_id"],
        "price": ticker["price"],
        "size": ticker["last_size"],
        "side": maker_side(ticker["side"]),
        "time": ticker["time"],
    }


def build_frames(tickers: Sequence[dict[str, Any]], per_frame: int) -> list[str]:
    """``market_trades`` frames of ``per_frame`` consecutive trades each (the last may be short)."""
    frames: list[str] = []
    for seq, start in enumerate(range(0, len(tickers), per_frame)):
        group = tickers[start : start + per_frame]
        frame = {
            "channel": "market_trades",
            "client_id": "",
            "timestamp": group[-1]["time"],
            "sequence_num": seq,
            "events": [{"type": "update", "trades": [to_market_trade(t) for t in group]}],
        }
        frames.append(json.dumps(frame, separators=(",", ":")))
    return frames


# --------------------------------------------------------------------------- cryptofeed setup


class NetworkUsed(RuntimeError):
    pass


def forbid_network() -> None:
    """Make any attempt to reach the network fail loudly (the bench must need none)."""

    def refuse(*_args: object, **_kwargs: object) -> Any:
        raise NetworkUsed("the cryptofeed baseline tried to use the network")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.socket.connect_ex = refuse  # type: ignore[method-assign]
    socket.getaddrinfo = refuse
    Coinbase._fetch_symbol_data = classmethod(lambda cls, conn: refuse())  # type: ignore[method-assign,assignment]


def preset_symbols(product_ids: Sequence[str]) -> list[str]:
    """Fill cryptofeed's symbol table for Coinbase from a synthetic ``/market/products`` reply.

    Goes through ``Coinbase._parse_symbol_data`` so the mapping is the one a live fetch would give.
    Returns the normalized symbols.
    """
    products = []
    for pid in sorted(set(product_ids)):
        base, quote = pid.split("-", 1)
        products.append(
            {
                "product_id": pid,
                "base_currency_id": base,
                "quote_currency_id": quote,
                "quote_increment": "0.01",
            }
        )
    # annotated as taking a list, but the REST reply it parses is {"products": [...]}
    syms, info = Coinbase._parse_symbol_data({"products": products})  # type: ignore[arg-type]
    Symbols.set(Coinbase.id, syms, info)
    return list(syms)


def make_feed(
    symbols: list[str], on_trade: Callable[[Trade, float], Awaitable[None]]
) -> tuple[Coinbase, AsyncConnection, Handler]:
    feed = Coinbase(  # type: ignore[no-untyped-call]
        symbols=symbols, channels=[TRADES], callbacks={TRADES: on_trade}
    )
    if feed.normalized_symbol_mapping is None:
        raise RuntimeError("symbols were not preset: the feed would fetch them over the network")
    # Feed.connect() builds the (unopened) WSAsyncConn and names the handler that ConnectionHandler
    # calls for every websocket message; use exactly that pair.
    connections = feed.connect()
    if len(connections) != 1:
        raise RuntimeError(f"expected one websocket connection, got {len(connections)}")
    conn, _subscribe, handler = connections[0]
    if getattr(handler, "__func__", None) is not Coinbase.message_handler:
        raise RuntimeError(f"unexpected handler {handler!r}")
    # connect() annotates the handler as Callable[[str, float], None]; it is message_handler
    return feed, conn, handler  # type: ignore[return-value]


class WarningCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# --------------------------------------------------------------------------- checks and timing


def iso_to_epoch(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp()


def verify(trades: Sequence[Trade], tickers: Sequence[dict[str, Any]]) -> None:
    """Every ticker came out as one Trade with the same fields, in order."""
    if len(trades) != len(tickers):
        raise SystemExit(f"verification: {len(trades)} trades delivered for {len(tickers)} tickers")
    for trade, ticker in zip(trades, tickers, strict=True):
        expected = {
            "symbol": ticker["product_id"],
            "side": BUY if ticker["side"] == "buy" else SELL,
            "amount": Decimal(ticker["last_size"]),
            "price": Decimal(ticker["price"]),
            "id": str(ticker["trade_id"]),
            "timestamp": iso_to_epoch(ticker["time"]),
        }
        got = {key: getattr(trade, key) for key in expected}
        if got != expected:
            raise SystemExit(f"verification: trade {got} does not match ticker {expected}")


@dataclass
class Timing:
    best: float  # fastest whole pass
    median: float  # median whole pass
    floor: float  # sum over chunks of each chunk's fastest time across passes


CHUNK_TRADES = 500  # chunk size for the floor estimate, in trades


async def time_handler(
    handler: Handler,
    conn: AsyncConnection,
    frames: Sequence[str],
    per_frame: int,
    repeats: int,
    warmup: int,
    before_run: Callable[[], None],
) -> Timing:
    """Seconds per pass of ``await handler(frame, conn, ts)`` over all frames.

    Each pass is also timed in chunks of ~CHUNK_TRADES trades; the sum of every chunk's fastest
    time across passes is a floor that filters out bursts of CPU steal on a shared VM.
    """
    receipt = time.time()
    step = max(1, CHUNK_TRADES // per_frame)
    chunks = [frames[i : i + step] for i in range(0, len(frames), step)]
    passes: list[float] = []
    chunk_best = [float("inf")] * len(chunks)
    for i in range(warmup + repeats):
        before_run()
        gc.collect()
        total = 0.0
        for c, chunk in enumerate(chunks):
            start = time.perf_counter()
            for frame in chunk:
                await handler(frame, conn, receipt)
            elapsed = time.perf_counter() - start
            total += elapsed
            if i >= warmup:
                chunk_best[c] = min(chunk_best[c], elapsed)
        if i >= warmup:
            passes.append(total)
    return Timing(best=min(passes), median=statistics.median(passes), floor=sum(chunk_best))


async def _noop_handler(_msg: str, _conn: AsyncConnection, _ts: float) -> None:
    return None


def time_decode(frames: Sequence[str], repeats: int) -> float:
    """Best seconds to decode all frames as cryptofeed's message_handler does (its _json.loads)."""
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        for frame in frames:
            cf_json.loads(frame, parse_float=Decimal)  # type: ignore[no-untyped-call]
        best = min(best, time.perf_counter() - start)
    return best


async def verification_pass(
    frames: Sequence[str], tickers: Sequence[dict[str, Any]], symbols: list[str]
) -> int:
    """Run every frame through a separate feed whose callback keeps each Trade, and check them."""
    delivered: list[Trade] = []

    async def keep(trade: Trade, _receipt: float) -> None:
        delivered.append(trade)

    _feed, conn, handler = make_feed(symbols, keep)
    for frame in frames:
        await handler(frame, conn, time.time())
    verify(delivered, tickers)
    return len(delivered)


async def bench_one(
    per_frame: int,
    tickers: Sequence[dict[str, Any]],
    symbols: list[str],
    args: argparse.Namespace,
    warnings: WarningCounter,
) -> dict[str, Any]:
    frames = build_frames(tickers, per_frame)
    n_frames, n_trades = len(frames), len(tickers)

    # 1. correctness pass (its Trades are freed before timing)
    verified = await verification_pass(frames, tickers, symbols)

    # 2. timed passes; the callback only counts
    count = 0

    async def on_trade(_trade: Trade, _receipt: float) -> None:
        nonlocal count
        count += 1

    feed, conn, handler = make_feed(symbols, on_trade)

    def reset_sequence() -> None:
        # frames carry sequence_num 0..N-1; forget the last one seen so every pass is in order
        feed._sequence_num.clear()

    timing = await time_handler(
        handler, conn, frames, per_frame, args.repeats, args.warmup, reset_sequence
    )
    expected = n_trades * (args.repeats + args.warmup)
    if feed._sequence_num.get(conn.uuid) != n_frames - 1:
        raise SystemExit(
            f"sequence check did not run: last sequence {feed._sequence_num.get(conn.uuid)!r}"
        )
    if count != expected:
        raise SystemExit(
            f"callback invoked {count} times, expected {expected}: "
            "the bench measured the wrong path"
        )
    if warnings.records:
        first = warnings.records[0]
        raise SystemExit(
            f"cryptofeed logged {len(warnings.records)} warning(s), first: {first.getMessage()}"
        )

    overhead = await time_handler(
        _noop_handler, conn, frames, per_frame, args.repeats, args.warmup, lambda: None
    )
    decode = time_decode(frames, args.repeats)

    us = 1e6
    return {
        "cryptofeed_version": importlib.metadata.version("cryptofeed"),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "json_backend": cf_json.BACKEND,
        "msgspec_version": importlib.metadata.version("msgspec")
        if cf_json.BACKEND == "msgspec"
        else None,
        "input": str(args.jsonl),
        "frames": n_frames,
        "trades": n_trades,
        "trades_per_frame": per_frame,
        "repeats": args.repeats,
        # headline figures are best-of-repeats, like bench/normalize.py's own numbers
        "us_per_frame": round(timing.best * us / n_frames, 3),
        "us_per_trade": round(timing.best * us / n_trades, 3),
        "us_per_frame_median": round(timing.median * us / n_frames, 3),
        "us_per_trade_median": round(timing.median * us / n_trades, 3),
        "us_per_frame_floor": round(timing.floor * us / n_frames, 3),
        "us_per_trade_floor": round(timing.floor * us / n_trades, 3),
        "loop_overhead_us_per_frame": round(overhead.best * us / n_frames, 3),
        "decode_us_per_frame": round(decode * us / n_frames, 3),
        # handler cost over bare decode of the same frames (timed separately, so noisy too)
        "best_over_decode": round(timing.best / decode, 2),
        "callbacks_invoked": count,
        "callbacks_expected": expected,
        "trades_verified": verified,
    }


async def main_async(args: argparse.Namespace) -> int:
    tickers, skipped = load_tickers(args.jsonl, args.limit)
    if not tickers:
        raise SystemExit(f"{args.jsonl}: no ticker messages with a trade")
    symbols = preset_symbols([t["product_id"] for t in tickers])

    warnings = WarningCounter()
    logging.getLogger("cryptofeed").addHandler(warnings)

    print(
        f"{len(tickers)} tickers ({skipped} lines skipped), {len(symbols)} products, "
        f"repeats={args.repeats} warmup={args.warmup}",
        file=sys.stderr,
    )
    for per_frame in args.trades_per_frame:
        result = await bench_one(per_frame, tickers, symbols, args, warnings)
        print(json.dumps(result), flush=True)
        print(
            f"K={per_frame}: best {result['us_per_frame']:.2f} us/frame, "
            f"{result['us_per_trade']:.2f} us/trade "
            f"(median {result['us_per_frame_median']:.2f} / {result['us_per_trade_median']:.2f}, "
            f"floor {result['us_per_frame_floor']:.2f} / {result['us_per_trade_floor']:.2f}; "
            f"decode alone {result['decode_us_per_frame']:.2f} us/frame, "
            f"loop {result['loop_overhead_us_per_frame']:.3f}); "
            f"callbacks {result['callbacks_invoked']}/{result['callbacks_expected']}",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "jsonl", type=Path, help="Coinbase Exchange ticker messages, one JSON object per line"
    )
    parser.add_argument(
        "--trades-per-frame",
        "-k",
        type=int,
        nargs="+",
        default=[1, 5],
        metavar="K",
        help="trades per market_trades frame; one result line per K (default: 1 5)",
    )
    parser.add_argument(
        "--repeats", type=int, default=10, help="timed passes over all frames (default 10)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes first (default 1)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N tickers")
    args = parser.parse_args(argv)
    if any(k < 1 for k in args.trades_per_frame) or args.repeats < 1 or args.warmup < 0:
        parser.error("K and --repeats must be >= 1, --warmup >= 0")

    forbid_network()
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
