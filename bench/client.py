"""A measuring WebSocket client, run as its own process by the benchmarks.

Subscribes to the given products, records for each tick ``now - recv_ns`` and per-product
order, and prints one JSON summary line at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import orjson
import websockets


async def run(args: argparse.Namespace) -> dict[str, object]:
    latencies: list[int] = []
    last: dict[str, int] = {}
    regressions = skipped = ticks = resyncs = 0
    last_ns = 0
    async with websockets.connect(args.url, max_size=2**24, compression=None) as ws:
        await ws.send(json.dumps({"op": "subscribe", "products": args.products.split(","),
                                  "snapshot": False}))  # fmt: skip
        print("ready", flush=True)
        deadline = time.monotonic() + args.duration
        idle_deadline = None
        while time.monotonic() < deadline:
            try:
                raw = await asyncio.wait_for(ws.recv(decode=False), 0.5)
            except TimeoutError:
                if ticks and args.stop_when_idle:
                    idle_deadline = idle_deadline or time.monotonic() + args.stop_when_idle
                    if time.monotonic() > idle_deadline:
                        break
                continue
            idle_deadline = None
            now = last_ns = time.time_ns()
            decoded = orjson.loads(raw)
            for msg in decoded if isinstance(decoded, list) else [decoded]:
                if msg.get("type") != "tick":
                    continue
                ticks += 1
                if msg.get("resync"):
                    resyncs += 1  # rebuilt from the exchange's REST ticker, not a feed frame
                latencies.append(now - msg["recv_ns"])
                product, seq = msg["product"], msg["seq"]
                if seq <= last.get(product, -1):
                    regressions += 1
                last[product] = seq
                skipped += msg.get("skipped", 0)
    latencies.sort()

    def pct(p: float) -> float | None:
        if not latencies:
            return None
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] / 1e6

    return {
        "ticks": ticks, "resyncs": resyncs, "last_recv_ns": last_ns,
        "regressions": regressions, "skipped": skipped,
        "p50_ms": pct(0.50), "p99_ms": pct(0.99), "p999_ms": pct(0.999),
        "max_ms": latencies[-1] / 1e6 if latencies else None,
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--products", required=True)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--stop-when-idle", type=float, default=0.0)
    print(json.dumps(asyncio.run(run(parser.parse_args()))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
