"""The chaos harness: the whole pipeline as OS processes on real servers, faults injected
from the outside, and the waits that tell when it has caught up.

``Pipeline`` starts feedsim (with ``--delivery-log``: every ticker frame it writes to a
socket), the ingestor, normalizer, snapshotter and gateway (``tests.support.procs``), and
the reference WebSocket client (``tests.chaos.refclient``), all as separate processes
against a NATS given by URL (one server, or a cluster's URL list) and a DynamoDB + S3
given by env. Faults: ``kill_and_restart`` of any service, the servers' own
``kill``/``stop``/``start`` (``services.devstack``), feedsim's ``--faults``. After the feed,
``finish`` waits until every stage has caught up, then ``tests.chaos.ledger`` audits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from services.common.subjects import RAW_STREAM, TICKS_STREAM, tick_subject
from services.devstack.ports import free_port
from services.devstack.process import Server
from services.devstack.servers import NatsServer
from tests.support.metrics import metric_total
from tests.support.procs import REPO, ServiceProcess

NUM_SHARDS = 4  # the services' default
SERVICES = ("ingestor", "normalizer", "snapshotter", "gateway")
ARTIFACTS = REPO / "test-artifacts" / "chaos"
PRODUCTS = ["BTC-USD", "ETH-USD", "SOL-USD", "ADA-USD", "DOGE-USD", "LTC-USD", "XRP-USD", "DOT-USD"]


# Bytecode of every child process cached outside the repo: this environment sets
# PYTHONDONTWRITEBYTECODE, and compiling the services' imports from source on every restart
# costs seconds of CPU (3x the import time), which would dominate every recovery measured.
PYCACHE_ENV = {
    "PYTHONDONTWRITEBYTECODE": "",
    "PYTHONPYCACHEPREFIX": str(Path(tempfile.gettempdir()) / "ledgerflux-chaos-pycache"),
}


def log(message: str) -> None:
    """Progress lines of the harness (shown with ``-s``), with a wall-clock stamp."""
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass(frozen=True, slots=True)
class FeedSpec:
    """What feedsim plays: ``ticks`` tickers at ``rate``/s over ``products``, by ``seed``."""

    ticks: int
    rate: float
    seed: int
    products: list[str] = field(default_factory=lambda: list(PRODUCTS))
    faults: str = ""
    heartbeat_s: float = 1.0


class ModuleProcess(ServiceProcess):
    """A ``ServiceProcess`` running any module (the reference client is not a service)."""

    def __init__(self, name: str, module: str, log_dir: Path, args: list[str]) -> None:
        super().__init__(name, PYCACHE_ENV, log_dir, args)
        self.module = module


class Service:
    """One service across its incarnations (each restart is a new process and log)."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path, args: list[str]) -> None:
        self.name = name
        self.env = env
        self.log_dir = log_dir
        self.args = args
        self.incarnations: list[ServiceProcess] = []
        self.kills: list[float] = []  # wall-clock times of our kill -9s

    def start(self) -> Service:
        proc = ServiceProcess(self.name, {**PYCACHE_ENV, **self.env}, self.log_dir, self.args)
        self.incarnations.append(proc.start())
        return self

    @property
    def current(self) -> ServiceProcess:
        return self.incarnations[-1]

    @property
    def pid(self) -> int:
        return self.current.pid

    @property
    def alive(self) -> bool:
        proc = self.current.proc
        return proc is not None and proc.poll() is None

    def kill9(self) -> None:
        self.kills.append(time.time())
        self.current.kill()

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for proc in self.incarnations:
            out.extend(e for e in proc.events() if event is None or e.get("event") == event)
        return out

    def unexpected_exits(self) -> list[str]:
        """Incarnations that ended without us killing them (crashes), with their log tails."""
        out: list[str] = []
        for index, proc in enumerate(self.incarnations):
            if proc.proc is None:
                continue
            code = proc.proc.poll()
            killed = index < len(self.kills) or code == -9
            if code not in (None, 0) and not killed:
                out.append(f"{self.name}#{index + 1} exited {code}:\n{proc.tail(40)}")
        return out


@dataclass(slots=True)
class Recovery:
    """A kill -9 and how long until the stage was current again."""

    service: str
    killed_at: float
    down_s: float
    recovered_s: float | None = None
    interrupted: bool = False  # killed again before it had recovered


@dataclass(slots=True)
class StoreEnv:
    """Where DynamoDB and S3 are, and the table/bucket this run owns."""

    env: dict[str, str]
    table: str
    bucket: str


async def _quiet(_exc: Exception) -> None:
    return None


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def get_text(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return str(response.read().decode())


async def wait_for(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, period: float = 0.2
) -> float:
    """Poll ``check`` until true; returns the seconds it took; raises after ``timeout``."""
    started = time.monotonic()
    while True:
        try:
            if await check():
                return time.monotonic() - started
        except (OSError, nats.errors.Error, TimeoutError):
            pass  # a server being restarted: ask again
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(period)


class Pipeline:
    """feedsim → ingestor → normalizer → snapshotter + gateway → reference client."""

    def __init__(
        self,
        name: str,
        feed: FeedSpec,
        nats_urls: list[str],
        store: StoreEnv,
        workdir: Path,
        *,
        replicas: int = 1,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.feed = feed
        self.nats_urls = nats_urls
        self.store = store
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.delivery_log = workdir / "delivery.csv"
        self.client_log = workdir / "client.csv"
        self.feed_port = free_port()
        self.gateway_port = free_port()
        self.metrics_ports = {s: free_port() for s in ("ingestor", "normalizer", "snapshotter")}
        base = {
            **store.env,
            "NATS_URLS": ",".join(nats_urls),
            "STREAM_REPLICAS": str(replicas),
            "LOG_LEVEL": "INFO",
            "COINBASE_PRODUCTS": ",".join(feed.products),
            "COINBASE_WS_URL": f"ws://127.0.0.1:{self.feed_port}",
            "COINBASE_REST_URL": f"http://127.0.0.1:{self.feed_port}",
            "DDB_TABLE": store.table,
            "S3_BUCKET": store.bucket,
            "SNAPSHOT_PERIOD_MS": "1000",
            "METRICS_HOST": "127.0.0.1",
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(self.gateway_port),
            # faster reactions than production, so a run sees many recoveries
            "RECONNECT_INITIAL_S": "0.1",
            "RECONNECT_MAX_S": "1",
            "WATCHDOG_TIMEOUT_S": "2",
            "PUBLISH_ACK_TIMEOUT_S": "3",
            "NATS_CONNECT_TIMEOUT_S": "2",
            # the reference client wants every tick: no conflation by rate, room to backfill
            "WS_MAX_MSGS_PER_SEC": "10000000",
            "WS_BURST": "10000000",
            "WS_SEND_QUEUE": "1000000",
            "WS_SLOW_CONSUMER_S": "60",
            "WS_CMDS_PER_SEC": "200",
            "WS_CMD_BURST": "400",
            "BACKFILL_MAX": "1000000",
            "BACKFILL_TIMEOUT_S": "60",
            **(env or {}),
        }
        self.env = base
        self.services: dict[str, Service] = {
            name: Service(
                name,
                {**base, "METRICS_PORT": str(self.metrics_ports.get(name, 0))},
                self.logs,
                [],
            )
            for name in SERVICES
        }
        feed_args = [
            "--host", "127.0.0.1", "--port", str(self.feed_port),
            "--products", ",".join(feed.products), "--rate", str(feed.rate),
            "--seed", str(feed.seed), "--max-ticks", str(feed.ticks),
            "--wait-subscribers", "1", "--compression", "none",
            "--heartbeat-interval", str(feed.heartbeat_s),
            "--delivery-log", str(self.delivery_log),
        ]  # fmt: skip
        if feed.faults:
            feed_args += ["--faults", feed.faults]
        self.feedsim = Service("feedsim", {}, self.logs, feed_args)
        self.client = ModuleProcess(
            "refclient",
            "tests.chaos.refclient",
            self.logs,
            [
                "--url", f"ws://127.0.0.1:{self.gateway_port}/ws",
                "--products", ",".join(feed.products), "--out", str(self.client_log),
            ],
        )  # fmt: skip
        self.nc: NATS | None = None
        self.final_stats: dict[str, Any] | None = None  # feedsim's /sim/stats as it stopped
        self.backlog_max: dict[str, int] = {}
        self.recoveries: list[Recovery] = []
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []
        self._monitors: list[asyncio.Task[None]] = []
        self.started_at = 0.0
        self.feed_started_at = 0.0

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Consumers first, then the reference client, then the feed and the ingestor: the
        client is subscribed before the first tick, so it must see every tick."""
        self.started_at = time.monotonic()
        self.nc = await nats.connect(
            servers=self.nats_urls,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=2,
            error_cb=_quiet,  # outages are the point here: no traceback per reconnect attempt
        )
        for name in ("normalizer", "snapshotter", "gateway"):
            self.services[name].start()
        for name in ("normalizer", "snapshotter", "gateway"):
            await self.services[name].current.wait_for_event(f"{name}_started", timeout=90)
        self.client.start()
        await wait_for(self._client_subscribed, 30, "the reference client to subscribe")
        self.feedsim.start()
        await self.feedsim.current.wait_for_event("feedsim_listening", timeout=30)
        self.services["ingestor"].start()
        await self.services["ingestor"].current.wait_for_event("ingestor_started", timeout=60)
        self.feed_started_at = time.monotonic()
        self.timings["startup_s"] = self.feed_started_at - self.started_at
        self._monitors.append(asyncio.create_task(self._watch_backlogs()))
        log(
            f"{self.name}: started in {self.timings['startup_s']:.1f}s; feed {self.feed.ticks} "
            f"ticks at {self.feed.rate:g}/s over {len(self.feed.products)} products, "
            f"seed {self.feed.seed}, faults {self.feed.faults or 'none'}"
        )

    async def _client_subscribed(self) -> bool:
        progress = self.client_progress()
        return progress is not None and len(progress.get("baseline", {})) == len(self.feed.products)

    @property
    def nats(self) -> NATS:
        assert self.nc is not None
        return self.nc

    @property
    def js(self) -> JetStreamContext:
        assert self.nc is not None
        return self.nc.jetstream(timeout=5)

    def all_procs(self) -> list[Service]:
        return [self.feedsim, *self.services.values()]

    def crashes(self) -> list[str]:
        out = []
        for service in self.all_procs():
            out.extend(service.unexpected_exits())
        proc = self.client.proc
        if proc is not None and proc.poll() not in (None, 0):
            out.append(f"refclient exited {proc.poll()}:\n{self.client.tail(40)}")
        return out

    async def close(self) -> dict[str, int]:
        """SIGTERM everything (services must exit 0); returns the exit codes."""
        for task in self._monitors:
            task.cancel()
        codes: dict[str, int] = {}
        for name in ("ingestor", "gateway", "normalizer", "snapshotter"):
            service = self.services[name]
            if service.incarnations and service.alive:
                try:
                    codes[name] = await service.current.terminate(timeout=20)
                except AssertionError as exc:
                    codes[name] = -1
                    self.notes.append(str(exc))
        if self.feedsim.incarnations and self.feedsim.alive:
            codes["feedsim"] = await self.feedsim.current.terminate(timeout=15)
        if self.client.proc is not None and self.client.proc.poll() is None:
            codes["refclient"] = await self.client.terminate(timeout=10)
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 5)
        return codes

    def kill_all(self) -> None:
        """After a failure: leave nothing running."""
        for task in self._monitors:
            task.cancel()
        for service in self.all_procs():
            for proc in service.incarnations:
                proc.kill()
        self.client.kill()

    # -- observations -------------------------------------------------------------------

    def feed_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = get_json(f"http://127.0.0.1:{self.feed_port}/sim/stats")
        return stats

    def client_progress(self) -> dict[str, Any] | None:
        path = Path(f"{self.client_log}.progress.json")
        try:
            progress: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return progress

    async def ingestor_metric(self, name: str) -> float | None:
        port = self.metrics_ports["ingestor"]
        try:
            text = await asyncio.to_thread(get_text, f"http://127.0.0.1:{port}/metrics", 2.0)
        except OSError:
            return None
        return metric_total(text, name)

    async def consumer_lag(self, stream: str, durable: str) -> int | None:
        """Messages not yet delivered plus delivered but not acked; None if unknown."""
        try:
            info = await self.js.consumer_info(stream, durable)
        except Exception:  # noqa: BLE001 - not created yet, or NATS away
            return None
        return int((info.num_pending or 0) + (info.num_ack_pending or 0))

    async def stream_last(self, stream: str) -> int:
        info = await self.js.stream_info(stream)
        return int(info.state.last_seq)

    async def last_ticks(self) -> dict[str, int]:
        """The newest seq per product in MD_TICKS."""
        out: dict[str, int] = {}
        for product in self.feed.products:
            try:
                msg = await self.js.get_last_msg(TICKS_STREAM, tick_subject(product, NUM_SHARDS))
            except Exception:  # noqa: BLE001 - no tick of that product yet
                continue
            if msg.data:
                out[product] = int(json.loads(msg.data)["seq"])
        return out

    async def _watch_backlogs(self) -> None:
        """The largest backlog seen at each stage, once a second: how far behind the feed
        the ingestor's buffer and the consumers ran (what a kill -9 there would cost)."""
        while True:
            samples = {
                "ingestor_buffer": await self.ingestor_metric("ledgerflux_ingestor_buffer_depth"),
                "normalizer_lag": await self.consumer_lag(RAW_STREAM, "normalizer"),
                "snapshotter_lag": await self.consumer_lag(TICKS_STREAM, "snapshotter"),
            }
            for name, value in samples.items():
                if value is not None and value > self.backlog_max.get(name, 0):
                    self.backlog_max[name] = int(value)
            await asyncio.sleep(1.0)

    # -- faults -------------------------------------------------------------------------

    async def kill_and_restart(self, name: str, down_s: float) -> Recovery:
        """kill -9 ``name``, restart it after ``down_s``, and time its recovery."""
        service = self.services[name]
        killed = time.monotonic()
        service.kill9()
        recovery = Recovery(name, time.time(), down_s)
        self.recoveries.append(recovery)
        log(f"{self.name}: kill -9 {name} (pid {service.current.pid}), restart in {down_s:.1f}s")
        await asyncio.sleep(down_s)
        service.start()
        self._monitors.append(asyncio.create_task(self._time_recovery(recovery, killed)))
        return recovery

    async def _time_recovery(self, recovery: Recovery, killed: float) -> None:
        lag_ok = max(500, int(self.feed.rate * 0.5))
        service = self.services[recovery.service]
        incarnation = service.current
        kills = len(service.kills)
        started = f"{recovery.service}_started"
        connects_before = (self.client_progress() or {}).get("connects", 0)

        async def recovered() -> bool:
            if len(service.kills) > kills:
                recovery.interrupted = True
                return True
            events = {e.get("event") for e in incarnation.events()}
            if started not in events:
                return False
            match recovery.service:
                case "ingestor":  # subscribed again: frames flow into MD_RAW
                    return "subscribed" in events
                case "normalizer":
                    lag = await self.consumer_lag(RAW_STREAM, "normalizer")
                    return lag is not None and lag <= lag_ok
                case "snapshotter":
                    lag = await self.consumer_lag(TICKS_STREAM, "snapshotter")
                    return lag is not None and lag <= lag_ok
                case _:  # gateway: the client reconnected and its backfills are done
                    progress = self.client_progress() or {}
                    return bool(
                        progress.get("connects", 0) > connects_before
                        and progress.get("connected")
                        and not progress.get("backfills_open")
                    )

        with contextlib.suppress(TimeoutError):
            await wait_for(recovered, 120, f"{recovery.service} to recover", period=0.1)
            if not recovery.interrupted:
                recovery.recovered_s = time.monotonic() - killed

    # -- the end of a run ---------------------------------------------------------------

    async def wait_feed_done(self, timeout: float) -> None:
        async def done() -> bool:
            stats = await asyncio.to_thread(self.feed_stats)
            return int(stats["ticks_total"]) >= self.feed.ticks

        await wait_for(done, timeout, f"feedsim to emit {self.feed.ticks} tickers", period=0.5)
        self.timings["feed_s"] = time.monotonic() - self.feed_started_at

    async def finish(self, timeout: float = 180.0) -> list[str]:
        """After the feed: let the ingestor settle, stop feedsim (flushing its delivery log),
        then wait until MD_TICKS, DynamoDB, the newest snapshot and the reference client all
        hold the same last tick per product. Returns what did not converge (empty: all)."""
        started = time.monotonic()
        problems: list[str] = []
        stable: dict[str, Any] = {"last": None, "since": time.monotonic()}

        async def settled() -> bool:
            if self.services["ingestor"].alive:
                pending = await self.ingestor_metric("ledgerflux_ingestor_resyncs_pending")
                buffered = await self.ingestor_metric("ledgerflux_ingestor_buffer_depth")
                if pending is None or pending > 0 or (buffered or 0) > 0:
                    return False
            lag = await self.consumer_lag(RAW_STREAM, "normalizer")
            last = await self.stream_last(TICKS_STREAM)
            if last != stable["last"]:
                stable["last"], stable["since"] = last, time.monotonic()
            return lag == 0 and time.monotonic() - stable["since"] >= 3.0

        try:
            await wait_for(settled, timeout, "the ingestor and normalizer to settle", period=0.25)
        except TimeoutError as exc:
            problems.append(str(exc))
        if self.feedsim.alive:
            with contextlib.suppress(OSError):
                self.final_stats = await asyncio.to_thread(self.feed_stats)
            await self.feedsim.current.terminate(timeout=15)

        async def caught_up() -> bool:
            return not await self.convergence_gaps()

        try:
            await wait_for(caught_up, timeout, "every stage to hold the last ticks", period=0.5)
        except TimeoutError:
            problems.extend(await self.convergence_gaps())
        self.timings["catch_up_s"] = time.monotonic() - started
        return problems

    async def convergence_gaps(self) -> list[str]:
        """What still differs from MD_TICKS' last tick per product."""
        from tests.chaos.ledger import newest_snapshot, read_table  # (a cycle at import time)

        gaps: list[str] = []
        for durable, stream in (("normalizer", RAW_STREAM), ("snapshotter", TICKS_STREAM)):
            lag = await self.consumer_lag(stream, durable)
            if lag != 0:
                gaps.append(f"{durable} lag {lag}")
        last = await self.last_ticks()
        table = await read_table(self.store)
        for product, seq in last.items():
            stored = table.get(product)
            if stored is None or stored[0] != seq:
                gaps.append(f"DynamoDB {product}: {stored[0] if stored else None} != {seq}")
        progress = self.client_progress() or {}
        client_last = progress.get("last", {})
        for product, seq in last.items():
            if client_last.get(product, -1) < seq:
                gaps.append(f"client {product}: {client_last.get(product)} < {seq}")
        snapshot = await newest_snapshot(self.store)
        ticks_last = await self.stream_last(TICKS_STREAM)
        if snapshot is None or snapshot[1].stream_seq != ticks_last:
            covered = snapshot[1].stream_seq if snapshot else None
            gaps.append(f"newest snapshot covers {covered}, MD_TICKS ends at {ticks_last}")
        return gaps


def kill_schedule(
    rng: random.Random,
    services: list[str],
    rounds: int,
    window: tuple[float, float],
    down: tuple[float, float],
    spacing: float,
) -> list[tuple[float, str, float]]:
    """``rounds`` kills of each service at random moments within ``window`` (seconds after
    the feed starts), at least ``spacing`` apart, each down for a random time in ``down``."""
    victims = [s for _ in range(rounds) for s in services]
    rng.shuffle(victims)
    span = window[1] - window[0]
    slot = span / len(victims)
    if slot < spacing:
        raise ValueError(f"{len(victims)} kills do not fit in {span:.0f}s at {spacing}s apart")
    out = []
    for index, victim in enumerate(victims):
        at = window[0] + index * slot + rng.uniform(0, slot - spacing)
        out.append((round(at, 2), victim, round(rng.uniform(*down), 2)))
    return out


async def run_kills(pipe: Pipeline, schedule: list[tuple[float, str, float]]) -> None:
    """Execute a kill schedule relative to the feed's start (restarts are not awaited)."""
    restarts: list[asyncio.Task[Recovery]] = []
    for at, victim, down_s in schedule:
        delay = pipe.feed_started_at + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        restarts.append(asyncio.create_task(pipe.kill_and_restart(victim, down_s)))
    await asyncio.gather(*restarts)


class ClusterNode(NatsServer):
    """One nats-server of a local JetStream cluster (routes to every node, own store)."""

    def __init__(
        self, data_dir: Path, name: str, cluster_port: int, routes: list[str], cluster: str
    ) -> None:
        super().__init__(data_dir, free_port(), free_port())
        self.node_name = name
        self.cluster_port = cluster_port
        self.routes = routes
        self.cluster = cluster

    @property
    def ports(self) -> dict[str, int]:
        return {**super().ports, "cluster_port": self.cluster_port}

    def command(self) -> list[str]:
        return [
            *super().command(),
            "-n", self.node_name,
            "--cluster_name", self.cluster,
            "-cluster", f"nats://127.0.0.1:{self.cluster_port}",
            "-routes", ",".join(self.routes),
        ]  # fmt: skip


def nats_cluster(root: Path, size: int = 3) -> list[ClusterNode]:
    cluster_ports = [free_port() for _ in range(size)]
    routes = [f"nats://127.0.0.1:{p}" for p in cluster_ports]
    return [
        ClusterNode(root / f"n{i}", f"n{i}", port, routes, "chaos")
        for i, port in enumerate(cluster_ports)
    ]


def proc_rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


async def start_server(server: Server, timeout: float | None = None) -> float:
    """Launch from this (the main) thread — a server's parent-death signal follows the
    launching thread — and wait for it to be ready in a worker thread; seconds to ready."""
    server.launch()
    return await asyncio.to_thread(server.wait_ready, timeout)


async def stop_server(server: Server, *, kill: bool = False) -> None:
    """kill -9 (``kill``) or SIGTERM and wait for the exit."""
    if kill:
        server.kill()
        return
    server.terminate()
    await asyncio.to_thread(server.wait_stopped, 30.0)


async def outage(
    server: Server,
    seconds: float,
    *,
    kill: bool,
    label: str,
    midway: Callable[[], Awaitable[Any]] | None = None,
) -> dict[str, Any]:
    """Take ``server`` away for ``seconds`` (kill -9 or SIGTERM), then start it again on the
    same ports and data; returns when it is ready, with the times (and what ``midway``,
    called halfway through the outage, returned)."""
    log(f"{label}: {'kill -9' if kill else 'stop'} {server.name} for {seconds:g}s")
    started = time.monotonic()
    await stop_server(server, kill=kill)
    out: dict[str, Any] = {}
    await asyncio.sleep(seconds / 2)
    if midway is not None:
        out["midway"] = await midway()
    await asyncio.sleep(seconds / 2)
    ready_s = await start_server(server)
    log(f"{label}: {server.name} back (ready in {ready_s:.1f}s)")
    return {
        **out,
        "down_s": round(time.monotonic() - started - ready_s, 2),
        "ready_s": round(ready_s, 2),
    }


async def wait_meta_leader(nodes: list[ClusterNode], timeout: float = 60.0) -> str:
    """Until the JetStream meta group of the cluster has a leader; its name."""
    leader: dict[str, str] = {}

    async def elected() -> bool:
        for node in nodes:
            if not node.is_running:
                continue
            jsz = await asyncio.to_thread(get_json, f"{node.monitor_url}/jsz", 2.0)
            name = (jsz.get("meta_cluster") or {}).get("leader")
            if name:
                leader["name"] = name
                return True
        return False

    await wait_for(elected, timeout, "a JetStream meta leader", period=0.2)
    return leader["name"]


async def node_serving(nodes: list[ClusterNode], client_name: str) -> ClusterNode | None:
    """The running node a client (by its NATS connection name) is connected to."""
    for node in nodes:
        if not node.is_running:
            continue
        with contextlib.suppress(OSError, ValueError):
            connz = await asyncio.to_thread(get_json, f"{node.monitor_url}/connz?limit=1024", 2.0)
            if any(c.get("name") == client_name for c in connz.get("connections") or []):
                return node
    return None
