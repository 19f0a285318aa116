"""The FastAPI application: WebSocket ``/ws``, REST, health, metrics and the web page."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files

import nats.errors
from fastapi import FastAPI, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, Response
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.common import broker
from services.common.laststate import load_last_ticks
from services.common.logging import get_logger
from services.common.subjects import TICKS_STREAM, TICKS_WILDCARD
from services.gateway.connection import CLOSE_GOING_AWAY, CLOSE_TRY_AGAIN
from services.gateway.hub import Hub
from services.gateway.session import run_session
from services.gateway.settings import GatewaySettings

log = get_logger(__name__)


class GatewayState:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.hub = Hub(settings.coinbase_products)
        self.nc: NATS | None = None
        self.sub: Subscription | None = None
        self.accepting = True

    async def start(self) -> None:
        self.nc = await broker.connect(self.settings, name="ledgerflux-gateway")
        js = self.nc.jetstream()
        await broker.ensure_streams(js, self.settings)
        # subscribe before warming: a tick landing in between is then not missed
        self.sub = await self.nc.subscribe(
            TICKS_WILDCARD, cb=self.hub.on_tick, pending_msgs_limit=1_000_000
        )
        self.hub.warm(await load_last_ticks(js))

    def begin_shutdown(self) -> None:
        """Refuse new sockets and ask every client to close with 1001 after flushing."""
        self.accepting = False
        for conn in list(self.hub.connections):
            conn.request_close(CLOSE_GOING_AWAY, "server shutting down")

    async def stop(self) -> None:
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
        await state.start()
        log.info("gateway_started", port=settings.gateway_port)
        yield
        state.begin_shutdown()
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
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

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
        stored = state.hub.latest.get(product.upper())
        if stored is None:
            return JSONResponse(
                {"error": "unknown_product", "message": f"no tick for {product!r}"},
                status_code=404,
            )
        return Response(stored.data, media_type="application/json")

    @app.websocket("/ws")
    async def ws_endpoint(ws: WebSocket) -> None:
        if not state.accepting or len(state.hub.connections) >= settings.ws_max_connections:
            await ws.accept()
            await ws.close(CLOSE_TRY_AGAIN, "server busy or shutting down")
            return
        await ws.accept()
        await run_session(ws, state.hub, settings)

    return app
