"""Pipeline benchmark: feedsim → ingestor → normalizer → snapshotter + gateway → one client
subscribed to every product, all separate processes on real servers.

Reports, per fixed feed load, delivered ticks/s and end-to-end latency (client receive time
minus the ingestor's ``recv_ns``: p50, p99, p99.9, max), whether every emitted tick arrived,
and the sustained maximum. Baseline in the same run: raw nats-py core publish → subscribe
of the same number of frames (what NATS alone does on this machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import nats

from bench.frames import synthetic_products, ticker_frames
from services.devstack.ports import free_port
from services.devstack.stack import DevStack, StackPorts
from tests.support.metrics import scrape_total
from tests.support.procs import REPO, ServiceProcess, cpu_seconds

RESULTS = REPO / "bench" / "results"


async def nats_baseline(url: str, n: int) -> float:
    """Core pub → sub msgs/s of ``n`` ticker frames through one nats-server."""
    frames = [data for _p, data in ticker_frames(n, synthetic_products(100))]
    sub_nc, pub_nc = await nats.connect(url), await nats.connect(url)
    done = asyncio.Event()
    got = 0

    async def on_msg(_msg: Any) -> None:
        nonlocal got
        got += 1
        if got == n:
            done.set()

    await sub_nc.subscribe("bench.>", cb=on_msg, pending_msgs_limit=n + 1)
    await sub_nc.flush()
    started = time.perf_counter()
    for i, data in enumerate(frames):
        await pub_nc.publish("bench.x", data)
        if i % 2000 == 0:
            # a round trip now and then: an unpaced publisher makes the server cut the
            # subscriber off as a slow consumer (core NATS drops, it does not queue)
            await pub_nc.flush()
    await pub_nc.flush()
    seen, last_progress = -1, time.perf_counter()
    while not done.is_set() and time.perf_counter() - last_progress < 2.0:
        if got != seen:
            seen, last_progress = got, time.perf_counter()
        await asyncio.sleep(0.05)
    elapsed = (last_progress if not done.is_set() else time.perf_counter()) - started
    await sub_nc.close()
    await pub_nc.close()
    return got / elapsed  # what arrived (all of it unless the server cut the subscriber off)


def _ingestor_drops(metrics_port: int) -> int:
    """Frames the ingestor's full outbound buffer has dropped since it started."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    return round(scrape_total(url, "ledgerflux_ingestor_frames_dropped_total"))


def _stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/sim/stats", timeout=5) as r:
        result: dict[str, Any] = json.loads(r.read())
        return result


async def one_load(
    rate: float, seconds: float, products: list[str], env: dict[str, str], feed_port: int,
    gateway_port: int, logs: Path, sequence_base: int, pids: dict[str, int],
    ingestor_metrics_port: int,
) -> dict[str, Any]:  # fmt: skip
    total = int(rate * seconds)
    drops_before = await asyncio.to_thread(_ingestor_drops, ingestor_metrics_port)
    client = subprocess.Popen(  # noqa: ASYNC220 - started once per load, off the hot path
        [sys.executable, "-m", "bench.client", "--url", f"ws://127.0.0.1:{gateway_port}/ws",
         "--products", ",".join(products), "--duration", str(seconds + 180),
         "--stop-when-idle", "3"],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, **env},
    )  # fmt: skip
    assert client.stdout is not None
    await asyncio.to_thread(client.stdout.readline)  # "ready"
    feed = ServiceProcess(
        "feedsim", {}, logs,
        ["--host", "127.0.0.1", "--port", str(feed_port), "--products", ",".join(products),
         "--rate", str(rate), "--max-ticks", str(total), "--wait-subscribers", "1",
         "--compression", "none", "--seed", "3", "--sequence-base", str(sequence_base)],
    ).start()  # fmt: skip
    pids = {**pids, "feedsim": feed.pid}
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started, started_ns = time.monotonic(), time.time_ns()
    try:
        while True:
            try:
                stats = await asyncio.to_thread(_stats, feed_port)
                if stats["ticks_total"] >= total:
                    break
            except OSError:
                pass
            await asyncio.sleep(0.2)
        feed_s = time.monotonic() - started
        # the client exits once nothing arrived for 3 s: the pipeline has drained by then
        out, _ = await asyncio.to_thread(client.communicate)
        cpu = {name: round(cpu_seconds(pid) - cpu_before[name], 2)
               for name, pid in pids.items() if name != "client"}  # fmt: skip
        dropped = await asyncio.to_thread(_ingestor_drops, ingestor_metrics_port) - drops_before
    finally:
        await feed.terminate()
    summary: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    # sustained = everything received over the time until the last tick arrived (a pipeline
    # that falls behind keeps delivering after the feed stopped)
    span_s = max(feed_s, (summary["last_recv_ns"] - started_ns) / 1e9)
    summary.update(offered_rate=rate, emitted=stats["ticks_total"], feed_seconds=feed_s,
                   delivered_per_s=summary["ticks"] / span_s, cpu_seconds=cpu,
                   # feedsim, like Coinbase, sends each product's current ticker on subscribe;
                   # those are not in its ticks_total, nor are REST resync ticks
                   lost=stats["ticks_total"] + len(products)
                   - (summary["ticks"] - summary["resyncs"]),
                   # where they went: past the pipeline's capacity the ingestor either
                   # falls behind the feed, which closes it as a slow consumer as Coinbase
                   # does (ticks sent meanwhile are gone at the source), or its bounded
                   # buffer fills and drops its oldest frames; both are counted
                   feed_slow_consumer_closes=stats["clients"]["slow_client_drops"],
                   ingestor_dropped=dropped)  # fmt: skip
    return summary


async def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    products = synthetic_products(args.products)
    stack = DevStack(root / "stack", StackPorts.free(), with_redis=False,
                     tools_dir=REPO / ".devstack" / "tools" / "dynamodb")  # fmt: skip
    results: dict[str, Any] = {"products": len(products), "loads": []}
    with stack:
        env = stack.env()
        results["baseline_nats_pubsub_per_s"] = await nats_baseline(env["NATS_URLS"], 100_000)
        print(
            f"  baseline nats-py pub→sub: {results['baseline_nats_pubsub_per_s']:,.0f} msg/s",
            flush=True,
        )
        feed_port, gateway_port = free_port(), free_port()
        env |= {
            "COINBASE_PRODUCTS": ",".join(products),
            "COINBASE_WS_URL": f"ws://127.0.0.1:{feed_port}",
            "COINBASE_REST_URL": f"http://127.0.0.1:{feed_port}",
            "GATEWAY_PORT": str(gateway_port), "GATEWAY_HOST": "127.0.0.1",
            "WS_MAX_MSGS_PER_SEC": "10000000", "WS_BURST": "10000000",
            "WS_SEND_QUEUE": "1000000", "METRICS_PORT": "0",
            "RECONNECT_INITIAL_S": "0.1", "RECONNECT_MAX_S": "0.5",
        }  # fmt: skip
        names = ["normalizer", "gateway", "ingestor"]
        if not args.no_snapshotter:
            names.insert(1, "snapshotter")
        ingestor_metrics_port = free_port()
        services = [
            ServiceProcess(
                n,
                env | {"METRICS_PORT": str(ingestor_metrics_port)} if n == "ingestor" else env,
                root,
            ).start()
            for n in names
        ]
        try:
            for proc, name in zip(services, names, strict=True):
                await proc.wait_for_event(f"{name}_started", timeout=90)
            pids = {name: proc.pid for name, proc in zip(names, services, strict=True)}
            pids |= {s.name: s.pid for s in stack.servers if s.pid is not None}
            for index, rate in enumerate(args.rates):
                print(f"  load {rate:,.0f} ticks/s for {args.seconds:.0f} s", flush=True)
                # each load's feed starts above the last one's sequences: the normalizer
                # would rightly drop a restarted feed's lower sequences as old
                results["loads"].append(
                    await one_load(rate, args.seconds, products, env, feed_port, gateway_port,
                                   root, (index + 1) * 10**10, pids, ingestor_metrics_port)
                )  # fmt: skip
        finally:
            for proc in services:
                await proc.terminate(timeout=20)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--products", type=int, default=100)
    parser.add_argument("--rates", type=float, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument(
        "--no-snapshotter",
        action="store_true",
        help="leave the snapshotter (and DynamoDB's JVM) out, to see what it costs the rest",
    )
    args = parser.parse_args()
    print("pipeline benchmark", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = asyncio.run(run(args, Path(tmp)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'offered/s':>10}{'delivered/s':>12}{'emitted':>9}{'received':>9}{'lost':>7}"
          f"{'slow':>5}{'dropped':>8}{'p50 ms':>9}{'p99 ms':>9}{'p99.9':>9}{'max':>9}")  # fmt: skip
    for load in results["loads"]:
        print(f"{load['offered_rate']:>10,.0f}{load['delivered_per_s']:>12,.0f}{load['emitted']:>9}"
              f"{load['ticks']:>9}{load['lost']:>7}{load['feed_slow_consumer_closes']:>5}"
              f"{load['ingestor_dropped']:>8}"
              f"{load['p50_ms'] or 0:>9.2f}{load['p99_ms'] or 0:>9.2f}"
              f"{load['p999_ms'] or 0:>9.2f}{load['max_ms'] or 0:>9.1f}")  # fmt: skip
        busiest = sorted(load["cpu_seconds"].items(), key=lambda kv: -kv[1])
        print("    CPU s: " + ", ".join(f"{name} {sec:.1f}" for name, sec in busiest))
    print(f"baseline nats-py core pub→sub: {results['baseline_nats_pubsub_per_s']:,.0f} msg/s")
    print(
        "lost: emitted but never received; slow: times the feed closed the ingestor as a slow "
        "consumer (what it sent meanwhile is lost at the source); dropped: frames the "
        "ingestor's full buffer dropped (counted)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
