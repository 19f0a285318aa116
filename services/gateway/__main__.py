"""``python -m services.gateway``: FastAPI + uvicorn WebSocket fan-out on GATEWAY_PORT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time
import weakref
from collections.abc import Generator

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from services.common.aio import sleep_or_stop
from services.common.errors import PortUnavailableError
from services.common.lifecycle import run_service
from services.common.logging import get_logger
from services.gateway.app import GatewayState, create_app
from services.gateway.frames import gated_protocol
from services.gateway.pacing import HandshakePacer, PacedH11Protocol, paced_protocol
from services.gateway.settings import GatewaySettings
from services.gateway.uvicorn_logs import UvicornLogFilter

log = get_logger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: our lifecycle owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # gateway_started once the port listens (uvicorn binds after the lifespan start-up,
        # and may fail to: a port in use exits from here), so the line means clients can
        # connect
        await super().startup(sockets)
        if self.started:
            log.info("gateway_started", port=self.config.port)


async def _drop_unfinished_handshakes(
    server: uvicorn.Server, timeout_s: float, stop: asyncio.Event
) -> None:
    """uvicorn's HTTP protocol has no deadline for a connection's first request: close the
    TCP connections that have not completed an HTTP request (or upgrade) within
    ``timeout_s`` of their admission (slowloris). Upgraded WebSockets are other protocol
    objects: untouched. The wait for a handshake token does not count: the pacer bounds it
    (to ``timeout_s`` too, by its queue's length)."""
    first_seen: weakref.WeakKeyDictionary[object, float] = weakref.WeakKeyDictionary()
    while not stop.is_set():
        now = time.monotonic()
        for protocol in list(server.server_state.connections):
            if not isinstance(protocol, H11Protocol) or protocol.cycle is not None:
                continue
            if isinstance(protocol, PacedH11Protocol) and protocol.waiting_for_token:
                continue
            started = first_seen.setdefault(protocol, now)
            if now - started > timeout_s and not protocol.transport.is_closing():
                protocol.transport.close()
        await sleep_or_stop(min(1.0, timeout_s / 2), stop)


async def main(settings: GatewaySettings, stop: asyncio.Event) -> None:
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addFilter(UvicornLogFilter())
    # its INFO lines are start-up chatter (ours say the same) and per-connection lines the
    # filter drops: made and filtered, they were ~10 % of the CPU of a handshake
    uvicorn_log.setLevel(logging.WARNING)
    app = create_app(settings)
    state: GatewayState = app.state.gateway
    pacer = HandshakePacer(
        settings.ws_handshakes_per_sec, settings.ws_handshake_burst, settings.ws_handshake_timeout_s
    )
    config = uvicorn.Config(
        app,
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_config=None,
        access_log=False,
        # h11 (the handshake sweeper below knows its protocol objects), admitting WebSocket
        # upgrades at WS_HANDSHAKES_PER_SEC
        http=paced_protocol(pacer),
        # websockets-sansio that lets sessions write prebuilt frames and refuses bad keys itself
        ws=gated_protocol(state.gatekeeper),
        ws_max_size=settings.ws_max_frame_bytes,
        ws_ping_interval=settings.ws_ping_interval_s,
        ws_ping_timeout=settings.ws_ping_timeout_s,
        ws_per_message_deflate=settings.ws_per_message_deflate,
        lifespan="on",
        timeout_graceful_shutdown=int(settings.drain_timeout_s),
    )
    server = _Server(config)
    served = asyncio.Event()
    try:
        # NATS, streams, the live tail and a warm cache before the port opens (not in the
        # lifespan: uvicorn's startup cannot be interrupted by a stop request)
        await state.start(stop)
    except BaseException:
        await state.stop()
        raise

    async def stop_on_signal() -> None:
        await stop.wait()
        # a quarter of the drain budget to deliver what is stored, then every writer
        # flushes what it holds and sends 1001 before uvicorn drops sockets
        await state.begin_shutdown(settings.drain_timeout_s / 4)
        await state.wait_sessions_closed(settings.drain_timeout_s / 2)
        server.should_exit = True

    async with asyncio.TaskGroup() as tg:
        watcher = tg.create_task(stop_on_signal())
        # batch flushes and Redis leases run until the server is gone: closing clients
        # still flush through the batch clock during shutdown
        tg.create_task(state.hub.run_flusher(settings.ws_batch_flush_ms / 1000, served))
        tg.create_task(state.limiter.run(served))
        tg.create_task(_drop_unfinished_handshakes(server, settings.ws_handshake_timeout_s, served))
        try:
            await server.serve()
        except SystemExit:
            pass  # uvicorn exits when it cannot bind; its error line says why (below: exit 2)
        finally:
            served.set()
            watcher.cancel()
    pacer.close()
    await state.limiter.close()
    if not server.started:
        raise PortUnavailableError(
            f"GATEWAY_PORT {settings.gateway_host}:{settings.gateway_port} could not be bound"
        )


if __name__ == "__main__":
    sys.exit(run_service("gateway", GatewaySettings, main))
