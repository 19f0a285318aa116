"""Fan-out of encoded frames to WebSocket clients.

Each message is encoded once; ``publish`` only appends the same ``bytes`` to the pending
list of every subscriber, and ``flush`` (once per batch) frames a client's pending
messages and hands them to its transport in ONE write. Like ``websockets.broadcast``
there is no backpressure per message: a client whose kernel/transport buffer grows past
``max_buffer_bytes`` is dropped (Coinbase's ErrSlowConsume) so it never stalls the rest.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from services.feedsim.protocol import GLOBAL_CHANNELS, Item

SLOW_CONSUMER_CODE = 1008
SLOW_CONSUMER_REASON = "ErrSlowConsume"


class Client:
    """One WebSocket connection: its subscriptions and the frames waiting for ``flush``."""

    __slots__ = (
        "close_code",
        "close_reason",
        "closing",
        "conn_id",
        "connected_at",
        "dead",
        "frames_sent",
        "pending",
        "remote",
        "settled",
        "stalled",
        "subs",
        "ws",
    )

    def __init__(self, ws: ServerConnection, conn_id: int) -> None:
        self.ws = ws
        self.conn_id = conn_id
        addr: Any = ws.remote_address
        self.remote = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        self.subs: dict[str, dict[str, None]] = {}  # channel -> products, in request order
        self.pending: list[bytes] = []
        self.stalled = False  # set by a stall fault; cleared by a timer, never mid-batch
        self.settled = asyncio.Event()  # first subscription made, or connection gone
        self.closing = asyncio.Event()  # the handler must close (or the peer is gone)
        self.close_code: int | None = None
        self.close_reason = ""
        self.dead = False  # no more writes: being closed
        self.frames_sent = 0
        self.connected_at = time.monotonic()

    @property
    def writable(self) -> bool:
        """Whether a frame published now is written to the socket at the next flush.

        Only event-loop callbacks change this (a stall's end is a timer), so it holds from
        a publish to the flush of the same synchronous batch: ``Hub._write`` decides alike.
        """
        if self.dead or self.stalled:
            return False
        ws = self.ws
        return ws.protocol.state is State.OPEN and not ws.transport.is_closing()

    def kick(self, code: int, reason: str) -> None:
        """Ask the connection handler to close with ``code``; stop writing at once."""
        if not self.dead:
            self.dead = True
            self.close_code = code
            self.close_reason = reason
        self.closing.set()
        self.settled.set()


class Hub:
    """Subscription index (channel -> product -> clients) and batched writes."""

    def __init__(self, max_buffer_bytes: int) -> None:
        self.max_buffer_bytes = max_buffer_bytes
        self.clients: dict[Client, None] = {}
        self._by_product: dict[str, dict[str, dict[Client, None]]] = {}
        self._global: dict[str, dict[Client, None]] = {}
        self._dirty: list[Client] = []
        self.frames_sent = 0
        self.bytes_sent = 0
        self.slow_client_drops = 0
        self.stall_dropped_frames = 0
        self.connections_total = 0

    # -- membership -------------------------------------------------------------------

    def add(self, client: Client) -> None:
        self.clients[client] = None
        self.connections_total += 1

    def remove(self, client: Client) -> None:
        self.unsubscribe(client, [(ch, None) for ch in list(client.subs)])
        self.clients.pop(client, None)
        client.pending.clear()

    def subscribe(self, client: Client, items: list[Item]) -> list[Item]:
        """Add subscriptions; returns the ones that are new (they get snapshots)."""
        added: list[Item] = []
        for channel, product in items:
            subs = client.subs.setdefault(channel, {})
            if product is None:
                members = self._global.setdefault(channel, {})
                if client not in members:
                    members[client] = None
                    added.append((channel, None))
            elif product not in subs:
                subs[product] = None
                self._by_product.setdefault(channel, {}).setdefault(product, {})[client] = None
                added.append((channel, product))
        return added

    def unsubscribe(self, client: Client, items: list[Item]) -> None:
        for channel, product in items:
            subs = client.subs.get(channel)
            if subs is None:
                continue
            if product is None:
                del client.subs[channel]
                self._global.get(channel, {}).pop(client, None)
                for p in subs:
                    self._drop_index(channel, p, client)
            elif product in subs:
                del subs[product]
                self._drop_index(channel, product, client)
                if not subs and channel not in GLOBAL_CHANNELS:
                    del client.subs[channel]

    def _drop_index(self, channel: str, product: str, client: Client) -> None:
        per_channel = self._by_product.get(channel)
        if per_channel is None:
            return
        members = per_channel.get(product)
        if members is not None:
            members.pop(client, None)
            if not members:
                del per_channel[product]

    def has_subscribers(self, channel: str, product: str) -> bool:
        per_channel = self._by_product.get(channel)
        return bool(per_channel and per_channel.get(product))

    def writable_subscribers(self, channel: str, product: str) -> list[int]:
        """Connection ids of the subscribers a frame published now will be written to."""
        per_channel = self._by_product.get(channel)
        members = per_channel.get(product) if per_channel else None
        if not members:
            return []
        return [client.conn_id for client in members if client.writable]

    def products_subscribed(self, channel: str) -> list[str]:
        return list(self._by_product.get(channel, {}))

    def has_global(self, channel: str) -> bool:
        return bool(self._global.get(channel))

    def subscribed_clients(self) -> int:
        return sum(1 for c in self.clients if c.subs)

    # -- sending ----------------------------------------------------------------------

    def publish(self, channel: str, product: str, frame: bytes) -> None:
        per_channel = self._by_product.get(channel)
        if not per_channel:
            return
        members = per_channel.get(product)
        if not members:
            return
        dirty = self._dirty
        for client in members:
            if not client.pending:
                dirty.append(client)
            client.pending.append(frame)

    def publish_global(self, channel: str, frame: bytes) -> None:
        for client in self._global.get(channel, {}):
            self.send(client, frame)

    def send(self, client: Client, frame: bytes) -> None:
        if not client.pending:
            self._dirty.append(client)
        client.pending.append(frame)

    def flush(self) -> None:
        """Write every client's pending frames (one transport write per client)."""
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, []
        for client in dirty:
            frames, client.pending = client.pending, []
            if frames:
                self._write(client, frames)

    def _write(self, client: Client, frames: list[bytes]) -> None:
        # the same decision as Client.writable, with the stall counted
        if client.dead:
            return
        if client.stalled:
            self.stall_dropped_frames += len(frames)
            return
        ws = client.ws
        protocol, transport = ws.protocol, ws.transport
        if protocol.state is not State.OPEN or transport.is_closing():
            return
        for frame in frames:
            protocol.send_text(frame)  # bytes are UTF-8 JSON: sent as text frames, like Coinbase
        data = b"".join(protocol.data_to_send())
        transport.write(data)
        client.frames_sent += len(frames)
        self.frames_sent += len(frames)
        self.bytes_sent += len(data)
        if transport.get_write_buffer_size() > self.max_buffer_bytes:
            self.slow_client_drops += 1
            client.kick(SLOW_CONSUMER_CODE, SLOW_CONSUMER_REASON)

    def max_buffered(self) -> int:
        """Largest write backlog of any client (replay at max speed waits on it)."""
        sizes = [c.ws.transport.get_write_buffer_size() for c in self.clients if not c.dead]
        return max(sizes, default=0)

    # -- connection faults ------------------------------------------------------------

    def stall(self) -> list[Client]:
        """Silence every current client until :meth:`unstall`; new ones are spared."""
        stalled = [client for client in self.clients if not client.dead]
        for client in stalled:
            client.stalled = True
        return stalled

    @staticmethod
    def unstall(clients: list[Client]) -> None:
        for client in clients:
            client.stalled = False

    def abort_all(self) -> int:
        """Drop every connection without a close frame (clients see 1006)."""
        n = 0
        for client in list(self.clients):
            if not client.dead:
                client.dead = True
                client.ws.transport.abort()
                n += 1
        return n
