"""Fan-out load check (a tool, not a test): N WebSocket clients, M ticks/s, one gateway.

    python -m tests.gateway.fanout_load --clients 500 --rate 200 --seconds 10
    python -m tests.gateway.fanout_load --clients 500 --rate 200 --batch
    python -m tests.gateway.fanout_load --clients 500 --rate 200 --deflate

Starts its own nats-server and gateway process, publishes canonical ticks to MD_TICKS,
and reports delivered ticks/s and the gateway's CPU time per delivered tick (from
/proc, so the clients' own CPU does not count). On a 2-core machine the clients compete
with the gateway; compare runs side by side rather than reading absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import websockets

from tests.gateway.helpers import stack

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S  # utime + stime


async def _client(
    url: str, products: list[str], counts: list[int], index: int, deflate: bool
) -> None:
    # the client offers permessage-deflate only when asked (the gateway then may accept)
    compression = "deflate" if deflate else None
    async with websockets.connect(url, max_size=2**24, compression=compression) as ws:
        await ws.send(json.dumps({"op": "subscribe", "products": products, "snapshot": False}))
        async for frame in ws:
            # count ticks without parsing: a batch frame holds several
            counts[index] += frame.count('"type":"tick"') if isinstance(frame, str) else 0


async def run(args: argparse.Namespace) -> dict[str, object]:
    products = [f"L{i}-USD" for i in range(args.products)]
    env = {
        "WS_MAX_MSGS_PER_SEC": "1000000",
        "WS_BURST": "1000000",
        "WS_SEND_QUEUE": "100000",
        "WS_PER_MESSAGE_DEFLATE": "true" if args.deflate else "false",
        "WS_MAX_CONNECTIONS": str(args.clients + 10),
    }
    with tempfile.TemporaryDirectory() as tmp:
        async with stack(Path(tmp), **env) as shared:
            await shared.feed.publish((p, 1) for p in products)
            url = shared.gateway.url + ("?batch=true" if args.batch else "")
            counts = [0] * args.clients
            tasks = []
            for i in range(args.clients):
                tasks.append(asyncio.create_task(_client(url, products, counts, i, args.deflate)))
                if i % 50 == 49:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
            pid = shared.gateway.proc.pid
            print(f"gateway pid {pid}", file=sys.stderr, flush=True)  # for py-spy
            seq = 2
            interval = 0.02  # publish in 50 windows per second
            per_window = max(1, round(args.rate * interval))
            start_cpu, started = _cpu_seconds(pid), time.monotonic()
            before = sum(counts)
            published = 0
            while time.monotonic() - started < args.seconds:
                batch = [(products[(seq + k) % len(products)], seq + k) for k in range(per_window)]
                seq += per_window
                await shared.feed.publish(batch)
                published += len(batch)
                await asyncio.sleep(max(0.0, started + published / args.rate - time.monotonic()))
            await asyncio.sleep(0.5)  # let the last ticks drain
            elapsed = time.monotonic() - started
            cpu = _cpu_seconds(pid) - start_cpu
            delivered = sum(counts) - before
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "clients": args.clients,
        "batch": args.batch,
        "deflate": args.deflate,
        "published_per_s": round(published / args.seconds),
        "delivered_per_s": round(delivered / elapsed),
        "expected_per_s": round(published * args.clients / args.seconds),
        "gateway_cpu_pct": round(100 * cpu / elapsed, 1),
        "gateway_cpu_us_per_delivered_tick": round(1e6 * cpu / max(delivered, 1), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rate", type=float, default=200.0, help="ticks/s published in all")
    parser.add_argument("--products", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--batch", action="store_true", help="clients use ?batch=true")
    parser.add_argument("--deflate", action="store_true", help="gateway and clients deflate")
    print(json.dumps(asyncio.run(run(parser.parse_args()))))


if __name__ == "__main__":
    main()
