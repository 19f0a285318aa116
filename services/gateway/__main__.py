"""``python -m services.gateway``: FastAPI + uvicorn WebSocket fan-out on GATEWAY_PORT."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Generator

import uvicorn

from services.common.lifecycle import run_service
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: our lifecycle owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None]:
        yield


async def main(settings: GatewaySettings, stop: asyncio.Event) -> None:
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_config=None,
        access_log=False,
        ws_max_size=settings.ws_max_frame_bytes,
        ws_ping_interval=20,
        ws_ping_timeout=20,
        lifespan="on",
        timeout_graceful_shutdown=int(settings.drain_timeout_s),
    )
    server = _Server(config)

    async def stop_on_signal() -> None:
        await stop.wait()
        app.state.gateway.begin_shutdown()
        await asyncio.sleep(0.2)  # let writers flush and send 1001 before uvicorn closes sockets
        server.should_exit = True

    async with asyncio.TaskGroup() as tg:
        watcher = tg.create_task(stop_on_signal())
        await server.serve()
        watcher.cancel()
        if not server.started:
            raise RuntimeError("gateway failed to start (see the log above)")


if __name__ == "__main__":
    sys.exit(run_service("gateway", GatewaySettings, main))
