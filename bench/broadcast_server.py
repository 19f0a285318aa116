"""The fan-out baseline: what one would write instead of the gateway, with ``websockets``.

    python -m bench.broadcast_server --nats-url nats://127.0.0.1:4222 --port 8765

A core NATS subscription on ``md.ticks.>`` and, for every tick, one
``websockets.asyncio.server.broadcast`` of its canonical bytes to every open connection
(every client wants every product). It sees the same load as the gateway and sends the
same thing: the tick bytes from MD_TICKS as they are, in a Text frame (the frame the
gateway sends for a tick), encoded once per tick. Same event loop (uvloop), the same
compression setting (none unless ``--deflate``, like the gateway's
``WS_PER_MESSAGE_DEFLATE``), 64 KiB inbound frame limit and 20 s keepalive. Clients may
send the gateway's subscribe command: it is read and ignored, with no reply.

What it leaves out is what the gateway is for: per-product routing, per-client order,
rate limits, conflation and slow-consumer handling, snapshots and backfill, metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

import nats
import uvloop
from nats.aio.msg import Msg
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

from services.common.subjects import TICKS_WILDCARD


async def run(args: argparse.Namespace) -> None:
    connections: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        connections.add(ws)
        try:
            with contextlib.suppress(ConnectionClosed):
                async for _command in ws:
                    pass  # a subscribe command: every client already gets every product
        finally:
            connections.discard(ws)

    async def on_tick(msg: Msg) -> None:
        broadcast(connections, msg.data, text=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    nc = await nats.connect(args.nats_url)
    # the gateway's pending limit, so neither drops ticks before the other does
    await nc.subscribe(TICKS_WILDCARD, cb=on_tick, pending_msgs_limit=1_000_000)
    await nc.flush()
    compression = "deflate" if args.deflate else None
    async with serve(
        handler, args.host, args.port, compression=compression, max_size=64 * 1024
    ) as server:
        await stop.wait()
        server.close()
        await server.wait_closed()
    await nc.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--deflate", action="store_true", help="accept permessage-deflate")
    uvloop.run(run(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
