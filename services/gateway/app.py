"""The FastAPI application: WebSocket ``/ws``, REST, health, metrics and the web page."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files

import nats.errors
from fastapi import FastAPI, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, Response
from nats.aio.client import Client as NATS
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.routing import WebSocketRoute

from services.common import broker
from services.common.laststate import load_last_ticks
from services.common.logging import get_logger
from services.common.logthrottle import throttle
from services.common.subjects import TICKS_STREAM
from services.gateway import metrics
from services.gateway.admission import Gatekeeper, denial_body, peer_name, presented_key
from services.gateway.hub import Hub
from services.gateway.limits import KeyLimiter, key_id
from services.gateway.live import LiveTail
from services.gateway.protocol import CLOSE_GOING_AWAY, CLOSE_TRY_AGAIN
from services.gateway.session import SessionContext, new_connection, run_session
from services.gateway.settings import GatewaySettings
from services.gateway.uvicorn_logs import mark_handshake_denied

log = get_logger(__name__)


class GatewayState:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.hub = Hub(settings.coinbase_products)
        self.gatekeeper = Gatekeeper(settings)
        self.limiter = KeyLimiter(settings)
        self.ctx = SessionContext(
            self.hub, settings, None, asyncio.Semaphore(settings.backfill_concurrency)
        )
        self.nc: NATS | None = None
        self.live: LiveTail | None = None
        self.accepting = True

    async def start(self, stop: asyncio.Event) -> None:
        self.nc = await broker.connect(self.settings, name="ledgerflux-gateway", stop=stop)
        js = self.ctx.js = self.nc.jetstream()
        await broker.ensure_streams(js, self.settings)
        # subscribe before warming: a tick landing in between is then not missed
        self.live = LiveTail(js, self.hub.on_stored_tick, self.settings.live_heartbeat_s)
        await self.live.start()
        self.hub.warm(await load_last_ticks(js))

    async def begin_shutdown(self, catch_up_s: float) -> None:
        """Refuse new sockets, let the live tail deliver every tick already stored (bounded
        by ``catch_up_s``), then ask every client to close with 1001 after flushing."""
        self.accepting = False
        if self.live is not None and self.hub.connections:
            await self.live.catch_up(catch_up_s)
        self.close_clients()

    def close_clients(self) -> None:
        self.accepting = False
        for conn in list(self.hub.connections):
            conn.request_close(CLOSE_GOING_AWAY, "server shutting down")

    async def wait_sessions_closed(self, timeout_s: float) -> None:
        """Until every session has flushed and sent its close frame, or ``timeout_s``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.hub.idle.wait(), timeout_s)

    async def stop(self) -> None:
        if self.live is not None:
            await self.live.stop()
        if self.nc is not None:
            await broker.close(self.nc, self.settings.drain_timeout_s)

    async def ready(self) -> bool:
        if self.nc is None or not self.nc.is_connected:
            return False
        try:
            await self.nc.jetstream().stream_info(TICKS_STREAM)
        except (nats.errors.Error, TimeoutError):
            return False
        return True


def create_app(settings: GatewaySettings) -> FastAPI:
    state = GatewayState(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # state.start ran before uvicorn, and gateway_started is logged once the port
        # listens (see __main__): uvicorn binds after this start-up half
        yield
        state.close_clients()  # normally done already, by begin_shutdown on the stop request
        await state.stop()

    app = FastAPI(title="LedgerFlux gateway", lifespan=lifespan)
    app.state.gateway = state
    page = files("services.gateway").joinpath("static/index.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ok = state.accepting and await state.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        metrics.FLUSHED.export()
        # built on a worker thread: pure Python for milliseconds (6 ms median, 23 ms at worst
        # while a 2-core machine was under attack), which on the loop stalled every client;
        # a thread gives the GIL back to the loop every switch interval (5 ms)
        body = await asyncio.to_thread(generate_latest)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/products")
    async def products() -> dict[str, object]:
        hub = state.hub
        now = time.time()
        out = []
        for product in sorted(hub.configured | set(hub.latest)):
            latest = hub.latest.get(product)
            updated = hub.last_update.get(product)
            out.append(
                {
                    "product": product,
                    "seq": latest.tick.seq if latest else None,
                    "time": latest.tick.time if latest else None,
                    "price": latest.tick.price if latest else None,
                    "staleness_s": round(now - updated, 3) if updated else None,
                }
            )
        return {"products": out}

    @app.get("/v1/ticks/{product}/latest")
    async def latest(product: str) -> Response:
        product = product.upper()  # case-insensitive, like the WebSocket's product lists
        stored = state.hub.latest.get(product)
        if stored is not None:
            return Response(stored.data, media_type="application/json")
        if state.hub.serves(product):  # configured, no tick yet: the WebSocket's null snapshot
            body = {"error": "no_tick", "message": f"{product} is served but has no tick yet"}
        else:
            body = {"error": "unknown_product", "message": f"not served: {product}"}
        return JSONResponse(body, status_code=404)

    async def ws_endpoint(ws: WebSocket) -> None:
        # our WebSocket protocol refuses these before the ASGI app runs (frames.py); this
        # check is for a server without it, which would otherwise admit anyone
        reason = state.gatekeeper.denial(ws.query_params, ws.headers, peer_name(ws.client))
        if reason is not None:
            await _deny(ws, reason)
            return
        key = presented_key(ws.query_params, ws.headers)
        if not state.accepting:
            await _refuse(ws, "shutting_down", "server shutting down")
            return
        if len(state.hub.connections) >= settings.ws_max_connections:
            await _refuse(ws, "max_connections", "server busy")
            return
        kid = key_id(key) if key is not None and state.gatekeeper.keys_required else None
        if kid is not None and not await state.limiter.acquire(kid):
            await _refuse(ws, "key_limit", "too many connections for this API key")
            return
        try:
            await ws.accept()
            batch = ws.query_params.get("batch", "").lower() in {"true", "1"}
            await run_session(ws, new_connection(state.ctx, batch=batch), state.ctx)
        finally:
            if kid is not None:
                await state.limiter.release(kid)

    # a plain Starlette route: FastAPI's would solve dependencies per connection (an exit
    # stack, dicts) for nothing this endpoint uses — kilobytes per idle connection
    app.router.routes.append(WebSocketRoute("/ws", ws_endpoint))
    return app


async def _deny(ws: WebSocket, message: str) -> None:
    """Refuse the handshake with 403 and an ``unauthorized`` error body (the caller has
    logged why; uvicorn's own lines about it are dropped)."""
    mark_handshake_denied()
    await ws.send_denial_response(
        Response(denial_body(message), status_code=403, media_type="application/json")
    )


async def _refuse(ws: WebSocket, cause: str, reason: str) -> None:
    """Accept, then close with 1013 (try again later) saying why."""
    metrics.DISCONNECTS.labels(code=str(CLOSE_TRY_AGAIN)).inc()
    metrics.REFUSED.labels(cause=cause).inc()
    throttle.emit(log.info, "connection_refused", cause=cause, client=peer_name(ws.client))
    await ws.accept()
    await ws.close(CLOSE_TRY_AGAIN, reason)
