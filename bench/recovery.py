"""Recovery benchmark: kill -9 each service under a steady feed, restart it at once, and time
how long until the pipeline is caught up again.

    python -m bench.recovery [--rate 5000] [--products 100] [--settle 5] [--quick]

The whole pipeline runs as separate processes on real servers (feedsim → ingestor →
normalizer → snapshotter + gateway). For each service in turn: SIGKILL, start a new process
with the same settings, and measure

- ``ready_s``: kill → the new process logs ``<service>_started`` (imports, connections,
  state warm-up);
- ``recovery_s``: kill → caught up. Normalizer and snapshotter: their consumer's backlog
  (``num_pending``) back under ``--lag-ticks`` (default: 0.2 s of feed), for the first
  sample after it had grown. Ingestor: MD_RAW receiving frames again and the normalizer's
  backlog under the same bound. Gateway: a client connecting again and receiving a live
  tick (clients reconnect every 50 ms, as the web page does with backoff);
- ``peak_lag``: the largest backlog seen meanwhile.

Only this orchestrator (light polling) and the feed share the cores with the system.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
import websockets
from nats.js import JetStreamContext

from bench.frames import synthetic_products
from services.common.subjects import RAW_STREAM, TICKS_STREAM
from services.devstack.ports import free_port
from services.devstack.stack import DevStack, StackPorts
from tests.support.procs import REPO, ServiceProcess

RESULTS = REPO / "bench" / "results"
ORDER = ["normalizer", "snapshotter", "gateway", "ingestor"]
CONSUMERS = {"normalizer": (RAW_STREAM, "normalizer"), "snapshotter": (TICKS_STREAM, "snapshotter")}


async def backlog(js: JetStreamContext, name: str) -> int:
    stream, durable = CONSUMERS[name]
    try:
        info = await js.consumer_info(stream, durable)
    except Exception:  # noqa: BLE001 - briefly unavailable while the service restarts
        return -1
    return int(info.num_pending or 0)


async def wait_caught_up(
    js: JetStreamContext, name: str, killed_at: float, bound: int, within_s: float
) -> tuple[float, int]:
    """Seconds from the kill until the backlog is under ``bound`` again, and its peak."""
    peak = 0
    grew = False
    while time.monotonic() - killed_at < within_s:
        lag = await backlog(js, name)
        peak = max(peak, lag)
        grew = grew or lag > bound
        # a kill right after a fetch may leave no visible backlog at all: then ready = caught up
        if lag >= 0 and lag <= bound and (grew or time.monotonic() - killed_at > 1.0):
            return time.monotonic() - killed_at, peak
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{name} not caught up {within_s:.0f} s after the kill (peak lag {peak})")


async def first_live_tick(url: str, product: str, killed_at: float, within_s: float) -> float:
    """Seconds from the kill until a fresh connection receives a live tick."""
    while time.monotonic() - killed_at < within_s:
        try:
            async with websockets.connect(url, open_timeout=1, compression=None) as ws:
                await ws.send(json.dumps({"op": "subscribe", "products": [product],
                                          "snapshot": False}))  # fmt: skip
                async for raw in ws:
                    if '"type":"tick"' in (raw if isinstance(raw, str) else raw.decode()):
                        return time.monotonic() - killed_at
        except (OSError, websockets.WebSocketException, TimeoutError):
            await asyncio.sleep(0.05)
    raise TimeoutError(f"no live tick from the gateway {within_s:.0f} s after the kill")


async def raw_resumed(
    js: JetStreamContext, since_seq: int, killed_at: float, within_s: float
) -> None:
    while time.monotonic() - killed_at < within_s:
        info = await js.stream_info(RAW_STREAM)
        if info.state.last_seq > since_seq:
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"MD_RAW received nothing {within_s:.0f} s after the ingestor kill")


async def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    products = synthetic_products(args.products)
    bound = args.lag_ticks or max(50, int(args.rate * 0.2))
    stack = DevStack(root / "stack", StackPorts.free(), with_redis=False,
                     tools_dir=REPO / ".devstack" / "tools" / "dynamodb")  # fmt: skip
    results: dict[str, Any] = {
        "rate": args.rate, "products": len(products), "lag_bound_ticks": bound, "services": {},
    }  # fmt: skip
    with stack:
        feed_port, gateway_port = free_port(), free_port()
        env = stack.env() | {
            "COINBASE_PRODUCTS": ",".join(products),
            "COINBASE_WS_URL": f"ws://127.0.0.1:{feed_port}",
            "COINBASE_REST_URL": f"http://127.0.0.1:{feed_port}",
            "GATEWAY_PORT": str(gateway_port), "GATEWAY_HOST": "127.0.0.1",
            "METRICS_PORT": "0", "RECONNECT_INITIAL_S": "0.1", "RECONNECT_MAX_S": "0.5",
        }  # fmt: skip
        procs = {name: ServiceProcess(name, env, root).start() for name in ORDER}
        feed = ServiceProcess("feedsim", {}, root, [
            "--host", "127.0.0.1", "--port", str(feed_port), "--products", ",".join(products),
            "--rate", str(args.rate), "--compression", "none", "--seed", "5",
        ]).start()  # fmt: skip
        nc = await nats.connect(env["NATS_URLS"])
        js = nc.jetstream()
        try:
            for name, proc in procs.items():
                await proc.wait_for_event(f"{name}_started", timeout=90)
            print(f"  feed at {args.rate:,.0f} ticks/s; settling {args.settle:.0f} s", flush=True)
            await asyncio.sleep(args.settle)
            for name in ORDER:
                for consumer in CONSUMERS:
                    steady = await backlog(js, consumer)
                    if steady > bound:
                        print(f"  note: {consumer} backlog {steady} > {bound} before the kill: "
                              "the pipeline does not keep up at this rate", flush=True)  # fmt: skip
                killed_at = time.monotonic()
                procs[name].kill()
                # what the dead ingestor had in flight lands within milliseconds: only a
                # frame after that shows the new process publishing
                await asyncio.sleep(0.3)
                raw_before = (await js.stream_info(RAW_STREAM)).state.last_seq
                procs[name] = ServiceProcess(name, env, root).start()
                figures: dict[str, Any] = {}
                if name == "gateway":
                    url = f"ws://127.0.0.1:{gateway_port}/ws"
                    figures["recovery_s"] = await first_live_tick(url, products[0], killed_at, 60)
                else:
                    if name == "ingestor":
                        await raw_resumed(js, raw_before, killed_at, 60)
                    watched = "normalizer" if name == "ingestor" else name
                    seconds, peak = await wait_caught_up(js, watched, killed_at, bound, 120)
                    figures |= {"recovery_s": seconds, "peak_lag": peak}
                await procs[name].wait_for_event(f"{name}_started", timeout=60)
                started = next(
                    e for e in procs[name].events() if e.get("event") == f"{name}_started"
                )
                figures["ready_s"] = _log_seconds(started) - _wall(killed_at)
                results["services"][name] = figures
                print(f"  {name}: caught up {figures['recovery_s']:.2f} s after kill -9 "
                      f"(process ready after {figures['ready_s']:.2f} s"
                      + (f", peak backlog {figures['peak_lag']:,}" if "peak_lag" in figures else "")
                      + ")", flush=True)  # fmt: skip
                await asyncio.sleep(args.settle)
        finally:
            await nc.close()
            await feed.terminate()
            for proc in procs.values():
                with contextlib.suppress(AssertionError):
                    await proc.terminate(timeout=20)
    return results


_MONO_TO_WALL = time.time() - time.monotonic()


def _wall(monotonic: float) -> float:
    return monotonic + _MONO_TO_WALL


def _log_seconds(event: dict[str, Any]) -> float:
    """The wall-clock time of a JSON log line (ISO 8601 ``timestamp``)."""
    from datetime import datetime

    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=5000)
    parser.add_argument("--products", type=int, default=100)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds between kills")
    parser.add_argument("--lag-ticks", type=int, default=0, help="caught-up bound (0: 0.2 s)")
    parser.add_argument("--quick", action="store_true", help="1,000 ticks/s, 3 s settles")
    args = parser.parse_args()
    if args.quick:
        args.rate, args.settle = 1000.0, 3.0
    print(f"recovery benchmark: kill -9 each service at {args.rate:,.0f} ticks/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = asyncio.run(run(args, Path(tmp)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recovery.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'service':<14}{'caught up s':>12}{'ready s':>10}{'peak backlog':>14}")
    for name, f in results["services"].items():
        print(f"{name:<14}{f['recovery_s']:>12.2f}{f['ready_s']:>10.2f}"
              f"{f.get('peak_lag', 0):>14,}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
