#!/usr/bin/env python3
"""LedgerFlux WebSocket test client: subscribe, print ticks, summarise.

    python test_client.py --products BTC-USD,ETH-USD --duration 5
    python test_client.py --url ws://localhost:8080/ws --backfill 100 --json

The summary gives ticks/s, end-to-end latency (client receive time minus the ingestor's
``recv_ns``; meaningful when both run on one clock), per-product seq regressions (must be
0) and how many ticks the gateway conflated (``skipped``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import websockets
    from websockets.exceptions import ConnectionClosed
except ModuleNotFoundError:  # started by a Python outside the project: rerun in its venv
    _venv = Path(__file__).resolve().with_name(".venv")
    if (_venv / "bin" / "python").exists() and Path(sys.prefix).resolve() != _venv.resolve():
        os.execv(_venv / "bin" / "python", [str(_venv / "bin" / "python"), *sys.argv])
    sys.exit("test_client.py needs the project's environment: run `make install` first")


@dataclass
class Summary:
    ticks: int = 0
    snapshots: int = 0
    backfilled: int = 0
    skipped: int = 0
    regressions: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    last_seq: dict[str, int] = field(default_factory=dict)
    per_product: dict[str, int] = field(default_factory=dict)
    close_code: int | None = None

    def tick(self, tick: dict[str, Any], received_ns: int) -> None:
        product = str(tick.get("product"))
        seq = int(tick.get("seq", -1))
        if seq <= self.last_seq.get(product, -1):
            self.regressions += 1
        self.last_seq[product] = seq
        self.per_product[product] = self.per_product.get(product, 0) + 1
        self.skipped += int(tick.get("skipped", 0))
        recv_ns = tick.get("recv_ns")
        if isinstance(recv_ns, int):
            self.latencies_ms.append((received_ns - recv_ns) / 1e6)

    def percentile(self, p: float) -> float | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    def as_dict(self, elapsed_s: float) -> dict[str, Any]:
        return {
            "ticks": self.ticks,
            "ticks_per_s": round(self.ticks / elapsed_s, 1) if elapsed_s else 0.0,
            "per_product": self.per_product,
            "snapshots": self.snapshots,
            "backfilled": self.backfilled,
            "skipped": self.skipped,
            "seq_regressions": self.regressions,
            "latency_ms_p50": _round(self.percentile(50)),
            "latency_ms_p99": _round(self.percentile(99)),
            "errors": self.errors,
            "close_code": self.close_code,
            "elapsed_s": round(elapsed_s, 3),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--url", default="ws://localhost:8080/ws", help="gateway WebSocket URL")
    parser.add_argument("--products", default="BTC-USD,ETH-USD", help="comma separated")
    parser.add_argument("--backfill", type=int, default=0, help="ask for the last N ticks first")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds to listen")
    parser.add_argument("--batch", action="store_true", help="connect with ?batch=true")
    parser.add_argument("--json", action="store_true", help="print raw JSON lines")
    parser.add_argument("--quiet", action="store_true", help="print the summary only")
    parser.add_argument("--token", default=None, help="API key (GATEWAY_API_KEYS)")
    args = parser.parse_args(argv)
    if args.duration <= 0:
        parser.error("--duration must be positive")
    return args


def _handle(
    message: dict[str, Any], summary: Summary, args: argparse.Namespace, now_ns: int
) -> None:
    kind = message.get("type")
    if kind == "tick":
        summary.ticks += 1
        summary.tick(message, now_ns)
        if not args.quiet and not args.json:
            extra = f" skipped={message['skipped']}" if message.get("skipped") else ""
            print(
                f"{message['product']:<10} seq={message['seq']} price={message['price']} "
                f"bid={message.get('bid')} ask={message.get('ask')}{extra}"
            )
    elif kind == "snapshot":
        summary.snapshots += 1
        if message.get("tick"):
            summary.tick(message["tick"], now_ns)
    elif kind == "backfill":
        for tick in message.get("ticks", []):
            summary.backfilled += 1
            summary.tick(tick, now_ns)
    elif kind == "error":
        summary.errors.append(message)
        print(f"error from gateway: {message}", file=sys.stderr)
    if args.json and not args.quiet:
        print(json.dumps(message, separators=(",", ":")))


async def run(args: argparse.Namespace) -> Summary:
    summary = Summary()
    url = args.url
    params = []
    if args.batch:
        params.append("batch=true")
    if args.token:
        params.append(f"token={args.token}")
    if params:
        url += ("&" if "?" in url else "?") + "&".join(params)
    products = [p.strip() for p in args.products.split(",") if p.strip()]
    subscribe: dict[str, Any] = {
        "op": "subscribe",
        "products": products,
        "snapshot": True,
        "id": "cli",
    }
    if args.backfill:
        subscribe["backfill"] = {"last": args.backfill}
    async with websockets.connect(url, max_size=2**24) as ws:
        await ws.send(json.dumps(subscribe))
        deadline = time.monotonic() + args.duration
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    raw = await asyncio.wait_for(ws.recv(), remaining)
                except TimeoutError:
                    break
                now_ns = time.time_ns()
                decoded = json.loads(raw)
                for message in decoded if isinstance(decoded, list) else [decoded]:
                    _handle(message, summary, args, now_ns)
        except ConnectionClosed as exc:
            summary.close_code = exc.rcvd.code if exc.rcvd else None
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        summary = asyncio.run(run(args))
    except (OSError, websockets.InvalidHandshake, websockets.InvalidURI) as exc:
        print(f"cannot connect to {args.url}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    report = summary.as_dict(time.monotonic() - started)
    print("summary " + json.dumps(report), file=sys.stderr if args.json else sys.stdout)
    return 1 if summary.regressions else 0


if __name__ == "__main__":
    sys.exit(main())
