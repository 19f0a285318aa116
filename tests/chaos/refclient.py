"""The chaos suite's reference WebSocket client, run as its own process.

``python -m tests.chaos.refclient --url ws://HOST:PORT/ws --products A,B --out FILE``

Subscribes to every product once, with a snapshot, and from then on wants every tick:
when the connection drops (a gateway killed with ``kill -9``, NATS away) it reconnects and
resubscribes each product with ``backfill: {"since_seq": last + 1}``, so the gateway's
backfill fills what it missed. Everything it receives is written to ``FILE`` as compact
lines for the audit (``tests/chaos/ledger.py``)::

    S,<product>,<seq or -1>         the first subscription's snapshot (the baseline)
    T,<product>,<seq>,<skipped>     a live tick (skipped = ticks conflated before it)
    B,<product>,<seq>               a tick of a backfill
    E,<code>,<message>              an error message
    C,<ns>                          connected (and subscribed)
    D,<ns>,<why>                    disconnected

``FILE.progress.json`` is rewritten atomically every 200 ms with the newest seq per
product, so the harness can wait for the client to catch up. SIGTERM flushes and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any

import orjson
import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake

FLUSH_S = 0.2


class Recorder:
    def __init__(self, out: Path, products: list[str]) -> None:
        self.out: IO[bytes] = out.open("ab")
        self.progress_path = Path(f"{out}.progress.json")
        self.products = products
        self.baseline: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self.buf: list[bytes] = []
        self.connected = False
        self.connects = 0
        self.received = 0
        self.backfills_open: set[str] = set()
        self.errors = 0

    def line(self, text: str) -> None:
        self.buf.append(text.encode() + b"\n")

    def flush(self) -> None:
        if self.buf:
            self.out.write(b"".join(self.buf))
            self.out.flush()
            self.buf.clear()
        tmp = self.progress_path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "connected": self.connected,
                    "connects": self.connects,
                    "received": self.received,
                    "errors": self.errors,
                    "backfills_open": sorted(self.backfills_open),
                    "baseline": self.baseline,
                    "last": self.last,
                }
            )
        )
        os.replace(tmp, self.progress_path)

    def tick(self, product: str, seq: int, skipped: int) -> None:
        self.line(f"T,{product},{seq},{skipped}")
        self.last[product] = seq
        self.received += 1

    def backfill(self, product: str, seq: int) -> None:
        self.line(f"B,{product},{seq}")
        self.last[product] = seq
        self.received += 1


async def session(url: str, rec: Recorder, first: bool) -> None:
    async with websockets.connect(url, max_size=64 * 2**20, open_timeout=5) as ws:
        welcome = orjson.loads(await ws.recv())
        assert welcome.get("type") == "welcome", welcome
        if first:
            sub = {"op": "subscribe", "products": rec.products, "snapshot": True, "id": "ref"}
            await ws.send(orjson.dumps(sub).decode())
        else:
            for product in rec.products:
                since = max(rec.last.get(product, -1), rec.baseline.get(product, -1)) + 1
                rec.backfills_open.add(product)
                await ws.send(
                    orjson.dumps(
                        {
                            "op": "subscribe",
                            "products": [product],
                            "backfill": {"since_seq": since},
                            "id": product,
                        }
                    ).decode()
                )
        rec.connected = True
        rec.connects += 1
        rec.line(f"C,{time.time_ns()}")
        async for raw in ws:
            handle(orjson.loads(raw), rec)


def handle(msg: Any, rec: Recorder) -> None:
    kind = msg.get("type")
    if kind == "tick":
        rec.tick(msg["product"], msg["seq"], msg.get("skipped", 0))
    elif kind == "backfill":
        product = msg["product"]
        for tick in msg["ticks"]:
            rec.backfill(product, tick["seq"])
        if msg.get("done"):
            rec.backfills_open.discard(product)
    elif kind == "snapshot":
        tick = msg.get("tick")
        seq = tick["seq"] if tick else -1
        rec.baseline[msg["product"]] = seq
        rec.line(f"S,{msg['product']},{seq}")
    elif kind == "error":
        rec.errors += 1
        text = str(msg.get("message", "")).replace("\n", " ")
        rec.line(f"E,{msg.get('code')},{text}")


async def flusher(rec: Recorder) -> None:
    while True:
        await asyncio.sleep(FLUSH_S)
        rec.flush()


async def run(url: str, products: list[str], out: Path) -> int:
    rec = Recorder(out, products)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    flush_task = asyncio.create_task(flusher(rec))
    first = True
    delay = 0.1
    try:
        while not stop.is_set():
            task = asyncio.create_task(session(url, rec, first))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                break
            why = "closed"
            exc = task.exception()
            if isinstance(exc, ConnectionClosed):
                why = f"closed:{exc.rcvd.code if exc.rcvd else 'none'}"
            elif isinstance(exc, (OSError, InvalidHandshake, TimeoutError)):
                why = f"connect:{type(exc).__name__}"
            elif exc is not None:
                raise exc
            if rec.baseline:  # the first subscription's snapshots arrived: resume from here
                first = False
            if rec.connected:
                delay = 0.1
            rec.connected = False
            rec.line(f"D,{time.time_ns()},{why}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 1.0)
    finally:
        flush_task.cancel()
        rec.connected = False
        rec.flush()
        rec.out.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--url", required=True)
    parser.add_argument("--products", required=True)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    products = [p for p in args.products.split(",") if p]
    return asyncio.run(run(args.url, products, args.out))


if __name__ == "__main__":
    sys.exit(main())
