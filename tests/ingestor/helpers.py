"""Helpers for the ingestor tests: the ingestor as a real process with its /metrics, feedsim
in this process, and MD_RAW / MD_DLQ read back with their headers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from prometheus_client.parser import text_string_to_metric_families

from services.common.subjects import HDR_RESYNC
from services.devstack.ports import free_port
from services.feedsim import FeedSim, FeedSimSettings
from services.ingestor.resync import HDR_RESYNC_REASON
from tests.support.procs import ServiceProcess


@dataclass(frozen=True, slots=True)
class StoredMsg:
    subject: str
    data: bytes
    headers: dict[str, str]

    @property
    def is_resync(self) -> bool:
        return HDR_RESYNC in self.headers

    @property
    def resync_reason(self) -> str | None:
        return self.headers.get(HDR_RESYNC_REASON)

    def json(self) -> Any:
        return json.loads(self.data)


class Ingestor:
    """``python -m services.ingestor`` with its metrics on a free port."""

    def __init__(
        self,
        spawn: list[ServiceProcess],
        log_dir: Path,
        *,
        nats_url: str,
        sim: FeedSim,
        products: list[str],
        **env: str,
    ) -> None:
        self.metrics_port = free_port()
        base = {
            "NATS_URLS": nats_url,
            "COINBASE_WS_URL": sim.ws_url,
            "COINBASE_REST_URL": sim.http_url,
            "COINBASE_PRODUCTS": ",".join(products),
            "METRICS_HOST": "127.0.0.1",
            "METRICS_PORT": str(self.metrics_port),
            "RECONNECT_INITIAL_S": "0.1",
            "RECONNECT_MAX_S": "0.5",
            "PUBLISH_ACK_TIMEOUT_S": "1",
            "WATCHDOG_TIMEOUT_S": "2",
        }
        self.proc = ServiceProcess("ingestor", {**base, **env}, log_dir)
        spawn.append(self.proc)

    async def start(self) -> Ingestor:
        self.proc.start()
        await self.proc.wait_for_event("ingestor_started", timeout=20)
        return self

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.proc.events() if e.get("event") == name]

    @property
    def alive(self) -> bool:
        return self.proc.proc is not None and self.proc.proc.poll() is None

    async def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """Samples by name (``..._total`` included) with their labels."""

        def get() -> str:
            url = f"http://127.0.0.1:{self.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode())

        text = await asyncio.to_thread(get)
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
        return out

    async def metric(self, name: str, **labels: str) -> float:
        """The sum of ``name`` over the samples matching ``labels`` (0 if none)."""
        samples = (await self.metrics()).get(name, [])
        return sum(v for lbl, v in samples if all(lbl.get(k) == x for k, x in labels.items()))

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


@contextlib.asynccontextmanager
async def feedsim(**overrides: Any) -> AsyncIterator[FeedSim]:
    """A simulator in this process on a free port, stopped on exit."""
    overrides.setdefault("port", 0)
    overrides.setdefault("compression", "none")
    async with FeedSim(FeedSimSettings(**overrides)) as sim:
        yield sim


@contextlib.asynccontextmanager
async def jetstream(url: str) -> AsyncIterator[JetStreamContext]:
    nc: NATS = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=-1)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def read_stream(js: JetStreamContext, stream: str, subject: str = ">") -> list[StoredMsg]:
    """Every message of ``stream`` matching ``subject``, in stream order, with headers."""
    try:
        total = (await js.stream_info(stream)).state.messages
    except nats.js.errors.NotFoundError:
        return []
    sub = await js.pull_subscribe(
        subject,
        stream=stream,
        config=ConsumerConfig(
            ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=30
        ),
    )
    out: list[StoredMsg] = []
    try:
        while len(out) < total:
            try:
                msgs = await sub.fetch(min(1000, total - len(out)), timeout=1)
            except TimeoutError:
                break
            out.extend(StoredMsg(m.subject, m.data, dict(m.headers or {})) for m in msgs)
    finally:
        await sub.unsubscribe()
    return out


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, step: float = 0.1
) -> None:
    """Poll ``check`` until it is true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(step)


async def wait_idle(ingestor: Ingestor, timeout: float = 15.0) -> None:
    """Until the ingestor's buffer is empty and no resync is pending, twice in a row."""
    calm = 0

    async def idle() -> bool:
        nonlocal calm
        metrics = await ingestor.metrics()
        depth = sum(v for _, v in metrics.get("ledgerflux_ingestor_buffer_depth", []))
        pending = sum(v for _, v in metrics.get("ledgerflux_ingestor_resyncs_pending", []))
        calm = calm + 1 if depth == 0 and pending == 0 else 0
        return calm >= 2

    await wait_until(idle, timeout, "the ingestor to be idle", step=0.2)


def tickers_by_product(msgs: list[StoredMsg]) -> dict[str, list[dict[str, Any]]]:
    """Ticker-shaped frames (feed tickers and resyncs) per product, in stream order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for msg in msgs:
        try:
            body = msg.json()
        except ValueError:
            continue
        if isinstance(body, dict) and body.get("type") == "ticker" and "product_id" in body:
            out.setdefault(body["product_id"], []).append(body)
    return out


def emit_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]
