"""``FeedSim``: the simulator as an object, for ``__main__`` and for in-process tests.

    async with FeedSim(FeedSimSettings(port=0, products=["BTC-USD"])) as sim:
        url = sim.ws_url            # ws://127.0.0.1:<bound port>
        sim.stats()                 # same JSON as GET /sim/stats

It owns the market model (or the replayer), the hub of clients, the fault schedule and
the background tasks; ``stop()`` (or leaving the context) cancels them, closes every
client with 1001 and flushes the emit log.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

import msgspec

from services.common.logging import get_logger
from services.feedsim.deliverylog import DeliveryLog
from services.feedsim.emitlog import EmitLog
from services.feedsim.errors import FeedSimError
from services.feedsim.faults import Fault, FaultCounters, FaultInjector
from services.feedsim.hub import Client, Hub
from services.feedsim.market import CLOCK, Market, ProductModel
from services.feedsim.metrics import make_registry, render
from services.feedsim.protocol import Status, encode, parse_command, subscriptions_frame
from services.feedsim.replay import ReplayData, Replayer, ReplayItem, load_replay
from services.feedsim.rest import RateLimiter, RestApi
from services.feedsim.server import FeedServer
from services.feedsim.settings import FeedSimSettings

log = get_logger(__name__)
_decode = msgspec.json.Decoder().decode

TICKER, HEARTBEAT, MATCHES, STATUS = "ticker", "heartbeat", "matches", "status"


class ListenError(FeedSimError):
    def __init__(self, host: str, port: int, reason: str) -> None:
        self.host, self.port = host, port
        super().__init__(f"cannot listen on {host}:{port}: {reason}")


class ReplayProduct:
    """Per-product state in replay mode (the market mode uses ``ProductModel``)."""

    __slots__ = ("held", "last_frame", "product_id", "ticks")

    def __init__(self, product_id: str) -> None:
        self.product_id = product_id
        self.ticks = 0
        self.last_frame = b""
        self.held: tuple[bytes, int] | None = None

    def rest_ticker(self) -> dict[str, object] | None:
        if not self.last_frame:
            return None
        t = _decode(self.last_frame)
        return {
            "ask": t.get("best_ask", ""),
            "bid": t.get("best_bid", ""),
            "volume": t.get("volume_24h", ""),
            "trade_id": t.get("trade_id", 0),
            "price": t.get("price", ""),
            "size": t.get("last_size", ""),
            "time": t.get("time", ""),
            "rfq_volume": "0",
        }


class FeedSim:
    """A Coinbase-Exchange-compatible feed (ws + REST ticker) on ``settings.host:port``."""

    def __init__(self, settings: FeedSimSettings) -> None:
        self.settings = settings
        self.hub = Hub(settings.max_client_buffer_bytes)
        self.counters = FaultCounters()
        spec = settings.faults
        self._injector = FaultInjector(spec, settings.seed) if spec.tick_faults else None
        self.market: Market | None = None
        self.replay: ReplayData | None = None
        self._replayer: Replayer | None = None
        self._replay_products: dict[str, ReplayProduct] = {}
        self._valid_products: frozenset[str] = frozenset()
        self._allowed = frozenset(settings.channels_allowed)
        self._status_frame = b""
        self._emit_log: EmitLog | None = None
        self._delivery_log: DeliveryLog | None = None
        self._registry = make_registry(lambda: self.stats(last_tickers=False))
        self.rest = RestApi(
            ticker=self._rest_ticker,
            stats=self.stats,
            metrics=lambda: render(self._registry),
            limiter=RateLimiter(settings.rest_rate_per_s, settings.rest_burst),
        )
        self._server = FeedServer(
            self,
            self.rest,
            subscribe_timeout_s=settings.subscribe_timeout_s,
            close_timeout_s=settings.close_timeout_s,
            compression=settings.compression == "deflate",
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()  # enough subscribers to start (wait_subscribers)
        self.finished = asyncio.Event()  # replay done with replay_end=exit, or a task failed
        self.replay_done = asyncio.Event()
        self.error: BaseException | None = None
        self.ticks_total = 0
        self._started_at = time.monotonic()
        self._started = False
        self._stopped = False

    # -- lifecycle --------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def metrics_port(self) -> int:
        return self._server.metrics_port

    @property
    def ws_url(self) -> str:
        return f"ws://{self._url_host}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self._url_host}:{self.port}"

    @property
    def _url_host(self) -> str:
        host = self.settings.host
        if host in ("", "0.0.0.0", "::"):
            return "127.0.0.1"
        return f"[{host}]" if ":" in host else host

    @property
    def products(self) -> list[str]:
        if self.market is not None:
            return list(self.market.models)
        return list(self._replay_products)

    async def __aenter__(self) -> FeedSim:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._started:
            return
        s = self.settings
        if s.replay is not None:
            self.replay = await asyncio.to_thread(load_replay, s.replay)
            names = [*self.replay.products, *s.products]
            self._replay_products = {p: ReplayProduct(p) for p in dict.fromkeys(names)}
            self._valid_products = frozenset(self._replay_products)
        else:
            self.market = Market(
                s.product_ids,
                seed=s.seed,
                skew=s.rate_skew,
                now_ns=time.time_ns(),
                sequence_base=s.sequence_base,
            )
            for model in self.market.models.values():
                model.last_frame = encode(model.last)
            self._valid_products = frozenset(self.market.models)
            products, currencies = self.market.status()
            self._status_frame = encode(Status(products=products, currencies=currencies))
        if s.emit_log is not None:
            try:
                self._emit_log = await EmitLog.open(s.emit_log)
            except OSError as exc:
                raise FeedSimError(f"cannot open --emit-log {s.emit_log}: {exc.strerror}") from None
        if s.delivery_log is not None:
            try:
                self._delivery_log = await DeliveryLog.open(s.delivery_log)
            except OSError as exc:
                if self._emit_log is not None:
                    await self._emit_log.close()
                raise FeedSimError(
                    f"cannot open --delivery-log {s.delivery_log}: {exc.strerror}"
                ) from None
        try:
            await self._server.start(s.host, s.port)
            if s.metrics_port:
                await self._server.start_metrics(s.host, s.metrics_port, self._metrics)
        except OSError as exc:
            await self._server.close()
            await self._close_logs()
            raise ListenError(s.host, s.port, exc.strerror or str(exc)) from None
        self._started = True
        self._started_at = time.monotonic()
        if s.effective_wait_subscribers == 0:
            self._ready.set()
        self._spawn(self._replay_loop() if self.replay else self._market_loop(), "feed")
        if self.market is not None:
            self._spawn(self._heartbeat_loop(), "heartbeat")
            self._spawn(self._status_loop(), "status")
        if s.faults.disconnect_every_s is not None:
            self._spawn(self._disconnect_loop(s.faults.disconnect_every_s), "disconnect")
        if s.faults.stall_s is not None:
            self._spawn(self._stall_loop(s.faults.stall_s, s.faults.stall_every_s), "stall")
        if self._emit_log is not None:
            self._spawn(self._emit_log.run(), "emit_log")
        if self._delivery_log is not None:
            self._spawn(self._delivery_log.run(), "delivery_log")
        log.info(
            "feedsim_listening",
            host=s.host,
            port=self.port,
            metrics_port=self.metrics_port or None,
            mode="replay" if self.replay else "market",
            products=len(self._valid_products),
            rate=s.rate,
            seed=s.seed,
            faults=str(s.faults) or None,
        )

    async def stop(self) -> None:
        """Stop producing, close clients with 1001, flush the emit log. Safe to repeat."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        await self._server.close()
        await self._close_logs()
        log.info("feedsim_stopped", ticks_total=self.ticks_total, frames=self.hub.frames_sent)

    async def flush_emit_log(self) -> None:
        if self._emit_log is not None:
            await self._emit_log.flush()
        if self._delivery_log is not None:
            await self._delivery_log.flush()

    async def _close_logs(self) -> None:
        for file in (self._emit_log, self._delivery_log):
            if file is not None:
                await file.close()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=f"feedsim-{name}")
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("task_failed", task=task.get_name(), exc_info=exc)
            self.error = exc
            self.finished.set()

    # -- client sessions (called by FeedServer) ---------------------------------------

    def on_connect(self, client: Client) -> None:
        self.hub.add(client)

    def on_disconnect(self, client: Client) -> None:
        self.hub.remove(client)

    def on_message(self, client: Client, raw: str | bytes) -> None:
        hub = self.hub
        cmd = parse_command(
            raw, valid_products=self._valid_products, allowed_channels=self._allowed
        )
        for frame in cmd.errors:
            hub.send(client, frame)
        if cmd.kind == "subscribe" and cmd.items:
            added = hub.subscribe(client, cmd.items)
            hub.send(client, subscriptions_frame(client.subs))
            for channel, product in added:
                self._send_snapshot(client, channel, product)
            log.info("subscribed", channels={k: len(v) for k, v in client.subs.items()})
        elif cmd.kind == "unsubscribe" and (cmd.items or not cmd.errors):
            hub.unsubscribe(client, cmd.items)
            hub.send(client, subscriptions_frame(client.subs))
        if client.subs:
            client.settled.set()
            if self.hub.subscribed_clients() >= self.settings.effective_wait_subscribers:
                self._ready.set()
        hub.flush()

    def _send_snapshot(self, client: Client, channel: str, product: str | None) -> None:
        if channel == STATUS:
            if self._status_frame:
                self.hub.send(client, self._status_frame)
            return
        if product is None:
            return
        if channel == TICKER:
            state = self._state(product)
            if state is not None and state.last_frame:
                self.hub.send(client, state.last_frame)  # the last trade, as Coinbase does
                if self._delivery_log is not None and client.writable:
                    self._delivery_log.record(
                        time.time_ns(), (client.conn_id,), product, state.last_frame, "snapshot"
                    )
        elif channel == MATCHES and self.market is not None:
            self.hub.send(client, encode(self.market.models[product].last_match()))

    def _state(self, product: str) -> ProductModel | ReplayProduct | None:
        if self.market is not None:
            return self.market.models.get(product)
        return self._replay_products.get(product)

    # -- feed -------------------------------------------------------------------------

    async def _market_loop(self) -> None:
        s = self.settings
        await self._wait_ready()
        if s.rate <= 0:
            return  # a quiet market: snapshots and heartbeats only
        loop = asyncio.get_running_loop()
        interval, cap = s.batch_interval_ms / 1000.0, s.max_batch_ticks
        start, emitted = loop.time(), 0
        while True:
            now = loop.time()
            due = int((now - start) * s.rate) - emitted
            if due > cap:
                # Behind schedule: drop the backlog rather than burst to catch up.
                start = now - (emitted + cap) / s.rate
                due = cap
            if s.max_ticks:
                due = min(due, s.max_ticks - self.ticks_total)
            if due > 0:
                self._emit_ticks(due)
                emitted += due
            if s.max_ticks and self.ticks_total >= s.max_ticks:
                self._release_held()
                log.info("max_ticks_reached", ticks_total=self.ticks_total)
                return
            await asyncio.sleep(0 if due >= cap else interval)

    def _emit_ticks(self, n: int) -> None:
        assert self.market is not None
        now_ns = time.time_ns()
        time_s = CLOCK.micros(now_ns)
        hub = self.hub
        for model in self.market.pick(n):
            ticker = model.step(now_ns, time_s)
            frame = encode(ticker)
            model.last_frame = frame
            model.ticks += 1
            pid = model.product_id
            if hub.has_subscribers(MATCHES, pid):
                for match in model.matches():
                    hub.publish(MATCHES, pid, encode(match))
            self._deliver_ticker(model, pid, frame, now_ns)
        self.ticks_total += n
        hub.flush()

    def _deliver_ticker(
        self, state: ProductModel | ReplayProduct, pid: str, frame: bytes, now_ns: int
    ) -> None:
        hub, elog, injector, dlog = self.hub, self._emit_log, self._injector, self._delivery_log
        if injector is None:
            hub.publish(TICKER, pid, frame)
            if elog is not None:
                elog.record(now_ns, frame, None, 1)
            if dlog is not None:
                self._delivered(dlog, now_ns, pid, frame, "ticker")
            return
        fault = injector.decide(pid)  # drawn for every ticker: keeps the fault stream stable
        held = state.held
        if held is not None:
            # The previous ticker was held back by "reorder": this one overtakes it.
            state.held = None
            self.counters.count(Fault.REORDER, pid)
            hub.publish(TICKER, pid, frame)
            hub.publish(TICKER, pid, held[0])
            if elog is not None:
                elog.record(now_ns, frame, None, 1)
                elog.record(held[1], held[0], Fault.REORDER, 1)
            if dlog is not None:
                self._delivered(dlog, now_ns, pid, frame, "ticker")
                self._delivered(dlog, now_ns, pid, held[0], "reorder")
            return
        if fault is None:
            hub.publish(TICKER, pid, frame)
            if elog is not None:
                elog.record(now_ns, frame, None, 1)
            if dlog is not None:
                self._delivered(dlog, now_ns, pid, frame, "ticker")
            return
        if fault is Fault.REORDER:
            state.held = (frame, now_ns)  # counted when the next ticker overtakes it
            return
        self.counters.count(fault, pid)
        if fault is Fault.GAP:
            if elog is not None:
                elog.record(now_ns, frame, fault, 0)
        elif fault is Fault.DUP:
            hub.publish(TICKER, pid, frame)
            hub.publish(TICKER, pid, frame)
            if elog is not None:
                elog.record(now_ns, frame, fault, 2)
            if dlog is not None:
                self._delivered(dlog, now_ns, pid, frame, "ticker")
                self._delivered(dlog, now_ns, pid, frame, "dup")
        else:  # malformed: a broken frame goes out instead of the ticker
            variant, bad = injector.malformed(pid, frame)
            self.counters.malformed_variants[variant] += 1
            hub.publish(TICKER, pid, bad)
            if elog is not None:
                elog.record(now_ns, frame, fault, 0, (variant, bad))
            if dlog is not None:
                self._delivered(dlog, now_ns, pid, frame, f"malformed:{variant}")

    def _delivered(self, dlog: DeliveryLog, ns: int, pid: str, frame: bytes, kind: str) -> None:
        """Log a ticker frame just published, for each client it will be written to."""
        conn_ids = self.hub.writable_subscribers(TICKER, pid)
        if conn_ids:
            dlog.record(ns, conn_ids, pid, frame, kind)

    def _release_held(self) -> None:
        """At the end of the feed, send tickers still held by reorder (nothing overtakes)."""
        states = self.market.models.values() if self.market else self._replay_products.values()
        for state in states:
            if state.held is not None:
                frame, ns = state.held
                state.held = None
                self.hub.publish(TICKER, state.product_id, frame)
                if self._emit_log is not None:
                    self._emit_log.record(ns, frame, None, 1)
                if self._delivery_log is not None:
                    self._delivered(self._delivery_log, ns, state.product_id, frame, "held")
        self.hub.flush()

    async def _wait_ready(self) -> None:
        if not self._ready.is_set():
            log.info("waiting_for_subscribers", n=self.settings.effective_wait_subscribers)
            await self._ready.wait()

    async def _heartbeat_loop(self) -> None:
        assert self.market is not None
        models = self.market.models
        loop = asyncio.get_running_loop()
        interval = self.settings.heartbeat_interval_s
        next_at = loop.time() + interval
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at = max(next_at + interval, loop.time())
            now_ns = time.time_ns()
            for pid in self.hub.products_subscribed(HEARTBEAT):
                self.hub.publish(HEARTBEAT, pid, encode(models[pid].heartbeat(now_ns)))
            self.hub.flush()

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.status_interval_s)
            if self.hub.has_global(STATUS):
                self.hub.publish_global(STATUS, self._status_frame)
                self.hub.flush()

    # -- replay -----------------------------------------------------------------------

    async def _replay_loop(self) -> None:
        assert self.replay is not None
        s = self.settings
        self._replayer = Replayer(
            self.replay,
            speed=s.speed,
            deliver=self._deliver_replay,
            flush=self.hub.flush,
            backlog=self.hub.max_buffered,
            max_backlog=s.max_client_buffer_bytes // 2,
        )
        await self._wait_ready()
        while True:
            log.info("replay_started", path=str(self.replay.path), messages=len(self.replay.items))
            await self._replayer.play()
            log.info("replay_done", sent=self._replayer.sent, passes=self._replayer.passes)
            self.replay_done.set()
            if s.replay_end != "loop":
                break
        self._release_held()
        if s.replay_end == "exit":
            self.finished.set()

    def _deliver_replay(self, item: ReplayItem) -> None:
        for _ in range(item.repeat):
            if item.channel == TICKER and item.product_id is not None:
                state = self._replay_products[item.product_id]
                state.ticks += 1
                state.last_frame = item.frame
                self.ticks_total += 1
                self._deliver_ticker(state, item.product_id, item.frame, time.time_ns())
            elif item.product_id is None:
                self.hub.publish_global(item.channel, item.frame)
            else:
                self.hub.publish(item.channel, item.product_id, item.frame)

    # -- connection faults ------------------------------------------------------------

    async def _disconnect_loop(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            n = self.hub.abort_all()
            self.counters.count(Fault.DISCONNECT)
            self.counters.clients_disconnected += n
            log.info("fault_disconnect", clients=n)

    async def _stall_loop(self, stall_s: float, every_s: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every_s)
            stalled = self.hub.stall()
            # ends in a callback of its own, never in the middle of a publish + flush batch
            loop.call_later(stall_s, self.hub.unstall, stalled)
            self.counters.count(Fault.STALL)
            self.counters.clients_stalled += len(stalled)
            log.info("fault_stall", clients=len(stalled), duration_s=stall_s)

    # -- HTTP side --------------------------------------------------------------------

    def _rest_ticker(self, product: str) -> dict[str, object] | None:
        if self.market is not None:
            model = self.market.models.get(product)
            return model.rest_ticker() if model is not None else None
        state = self._replay_products.get(product)
        return state.rest_ticker() if state is not None else None

    def _metrics(self) -> bytes:
        return render(self._registry)

    def stats(self, *, last_tickers: bool = True) -> dict[str, Any]:
        """What ``GET /sim/stats`` returns (see services/feedsim/README.md)."""
        products: dict[str, Any] = {}
        states: list[ProductModel | ReplayProduct] = (
            list(self.market.models.values())
            if self.market is not None
            else list(self._replay_products.values())
        )
        for state in states:
            last = _decode(state.last_frame) if last_tickers and state.last_frame else None
            entry: dict[str, Any] = {
                "ticks": state.ticks,
                "faults": dict(self.counters.by_product.get(state.product_id, {})),
            }
            if isinstance(state, ProductModel):
                entry["sequence"] = state.sequence
                entry["trade_id"] = state.trade_id
            if last_tickers:
                entry["last_ticker"] = last
            products[state.product_id] = entry
        hub = self.hub
        replay = None
        if self.replay is not None:
            replay = {
                "path": str(self.replay.path),
                "messages": len(self.replay.items),
                "skipped_lines": self.replay.skipped,
                "sent": self._replayer.sent if self._replayer else 0,
                "passes": self._replayer.passes if self._replayer else 0,
                "done": self.replay_done.is_set(),
            }
        return {
            "mode": "replay" if self.replay is not None else "market",
            "seed": self.settings.seed,
            "rate": self.settings.rate,
            "faults_spec": str(self.settings.faults),
            "uptime_s": round(time.monotonic() - self._started_at, 3),
            "ticks_total": self.ticks_total,
            "clients": {
                "connected": len(hub.clients),
                "subscribed": hub.subscribed_clients(),
                "connections_total": hub.connections_total,
                "slow_client_drops": hub.slow_client_drops,
            },
            "frames_sent": hub.frames_sent,
            "bytes_sent": hub.bytes_sent,
            "stall_dropped_frames": hub.stall_dropped_frames,
            "faults": self.counters.snapshot(),
            "products": products,
            "rest": {"requests": self.rest.requests, "rate_limited": self.rest.rate_limited},
            "replay": replay,
        }
