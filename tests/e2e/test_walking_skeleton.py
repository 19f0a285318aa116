"""One tick through the whole system, for real: feedsim → ingestor → normalizer →
snapshotter (DynamoDB Local) and gateway (WebSocket), every service its own OS process."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import websockets

from services.devstack.ports import free_port
from services.devstack.servers import NatsServer
from services.devstack.stack import DevStack
from tests.ops.promql import all_queries, metric_names
from tests.ops.test_metric_names import _SUFFIXES, PROMETHEUS_BUILTINS
from tests.support.aws import stack_client
from tests.support.procs import ServiceProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PRODUCTS = ["BTC-USD", "ETH-USD"]
RATE = 200
TOTAL_TICKS = 1200  # six seconds of feed at 200 ticks/s


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


async def _poll_json(url: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncio.to_thread(_get_json, url)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def _scraped_names(url: str) -> set[str]:
    """Sample names a /metrics page exposes, including families with no sample yet."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            names.update(family + suffix for suffix in _SUFFIXES.get(kind, ("",)))
        elif line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names


async def _read_table(env: dict[str, str], table: str) -> dict[str, dict[str, Any]]:
    async with stack_client(env, "dynamodb") as ddb:
        try:
            page = await ddb.scan(TableName=table, ConsistentRead=True)
        except ddb.exceptions.ResourceNotFoundException:
            return {}
    return {item["product"]["S"]: json.loads(item["tick"]["S"]) for item in page["Items"]}


async def test_ticks_flow_end_to_end_and_dynamodb_holds_the_last_tick(
    nats_server: NatsServer,
    devstack: DevStack,
    service_logs: Path,
    spawn: list[ServiceProcess],
) -> None:
    """A client subscribed to both products gets ticks of both with strictly increasing
    seq, and once the feed stops DynamoDB holds exactly the last tick feedsim emitted."""
    table = f"latest-{uuid.uuid4().hex[:8]}"
    feed_port, gateway_port = free_port(), free_port()
    metrics_ports = {name: free_port() for name in ("ingestor", "normalizer", "snapshotter")}
    env = {
        **devstack.env(),
        "NATS_URLS": nats_server.url,
        "COINBASE_PRODUCTS": ",".join(PRODUCTS),
        "COINBASE_WS_URL": f"ws://127.0.0.1:{feed_port}",
        "COINBASE_REST_URL": f"http://127.0.0.1:{feed_port}",
        "DDB_TABLE": table,
        "METRICS_PORT": "0",
        "GATEWAY_PORT": str(gateway_port),
        "GATEWAY_HOST": "127.0.0.1",
    }
    feedsim = ServiceProcess(
        "feedsim",
        {},
        service_logs,
        [
            "--host", "127.0.0.1", "--port", str(feed_port),
            "--products", ",".join(PRODUCTS), "--rate", str(RATE), "--seed", "11",
            "--max-ticks", str(TOTAL_TICKS), "--wait-subscribers", "1",
        ],
    )  # fmt: skip
    processes = {
        name: ServiceProcess(
            name, {**env, "METRICS_PORT": str(metrics_ports.get(name, 0))}, service_logs
        )
        for name in ("normalizer", "snapshotter", "gateway", "ingestor")
    }
    spawn.extend([feedsim, *processes.values()])
    feedsim.start()
    for name in ("normalizer", "snapshotter", "gateway"):
        processes[name].start()
    await processes["gateway"].wait_for_event("gateway_started", timeout=30)
    await processes["snapshotter"].wait_for_event("snapshotter_started", timeout=30)
    await processes["normalizer"].wait_for_event("normalizer_started", timeout=30)
    await _poll_json(f"http://127.0.0.1:{feed_port}/healthz", timeout=15)

    received: dict[str, list[int]] = {p: [] for p in PRODUCTS}
    async with websockets.connect(f"ws://127.0.0.1:{gateway_port}/ws") as ws:
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome"
        await ws.send(json.dumps({"op": "subscribe", "products": PRODUCTS, "id": "e2e"}))
        processes["ingestor"].start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and min(len(v) for v in received.values()) < 50:
            message = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if message["type"] == "tick":
                received[message["product"]].append(message["seq"])
            else:
                assert message["type"] in {"subscribed", "snapshot"}, message

    for product, seqs in received.items():
        assert len(seqs) >= 50, f"{product}: only {len(seqs)} ticks"
        assert all(a < b for a, b in itertools.pairwise(seqs)), f"{product} out of order"

    # The feed stops by itself after TOTAL_TICKS; then DynamoDB must converge on its last ticks.
    stats_url = f"http://127.0.0.1:{feed_port}/sim/stats"
    deadline = time.monotonic() + 30
    while (stats := await _poll_json(stats_url, 5))["ticks_total"] < TOTAL_TICKS:
        assert time.monotonic() < deadline, f"feed stuck at {stats['ticks_total']} ticks"
        await asyncio.sleep(0.2)
    last_emitted = {p: stats["products"][p]["last_ticker"] for p in PRODUCTS}

    deadline = time.monotonic() + 30
    while True:
        stored = await _read_table(env, table)
        if all(stored.get(p, {}).get("seq") == last_emitted[p]["sequence"] for p in PRODUCTS):
            break
        assert time.monotonic() < deadline, f"DynamoDB never caught up: {stored}"
        await asyncio.sleep(0.25)
    for product in PRODUCTS:
        tick, sent = stored[product], last_emitted[product]
        assert tick["product"] == sent["product_id"]
        assert tick["trade_id"] == sent["trade_id"]
        assert tick["price"] == sent["price"]
        assert tick["size"] == sent["last_size"]
        assert tick["side"] == sent["side"]
        assert tick["bid"] == sent["best_bid"] and tick["ask"] == sent["best_ask"]
        assert tick["bid_size"] == sent["best_bid_size"]
        assert tick["ask_size"] == sent["best_ask_size"]
        assert tick["time"] == sent["time"]
        assert tick["volume_24h"] == sent["volume_24h"]

    latest = await _poll_json(f"http://127.0.0.1:{gateway_port}/v1/ticks/BTC-USD/latest", 5)
    assert latest["seq"] == last_emitted["BTC-USD"]["sequence"]

    # Dashboards and alert rules may only query metrics the running services really expose.
    scrape_urls = [f"http://127.0.0.1:{port}/metrics" for port in metrics_ports.values()]
    scrape_urls.append(f"http://127.0.0.1:{gateway_port}/metrics")
    exposed = set(PROMETHEUS_BUILTINS)
    for url in scrape_urls:
        exposed |= await asyncio.to_thread(_scraped_names, url)
    unknown = sorted(
        f"{query.location()}: {name}"
        for query in all_queries()
        for name in metric_names(query.expr) - exposed
    )
    assert not unknown, "queried but not exposed by any running service:\n" + "\n".join(unknown)

    for name, proc in processes.items():
        assert await proc.terminate() == 0, f"{name} did not exit cleanly:\n{proc.tail()}"
    assert await feedsim.terminate() == 0
