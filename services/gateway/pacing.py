"""Handshake pacing: WebSocket upgrades are admitted at a bounded rate, so a flood of new
connections (a reconnect storm after a replica died, a client opening thousands) cannot
take the core from the clients already connected.

An upgrade is the gateway's most expensive event (~2M instructions: HTTP parsing, the
WebSocket handshake, ASGI set-up, admission and the welcome; ARCHITECTURE.md "Capacity
model"), and upgrades arrive in bursts. Once uvicorn has parsed a request head and found
an upgrade, the upgrade takes a token from a bucket (``WS_HANDSHAKES_PER_SEC``,
``WS_HANDSHAKE_BURST``). Without one it waits, oldest first, with the connection's
reading paused, until a token frees up; the handshake then goes on as if it had just
arrived. Plain HTTP (``/healthz``, ``/readyz``, ``/metrics``, REST) is never paced: an
orchestrator's probes must answer during a storm.

An upgrade waits at most ``WS_HANDSHAKE_TIMEOUT_S``: once as many wait as the rate lets
through in that time, a new one is answered at once with ``503`` and ``Retry-After``
(shed), and its client retries with its backoff.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from typing import ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from services.common.logging import get_logger
from services.common.logthrottle import throttle
from services.common.tokenbucket import TokenBucket
from services.gateway import metrics

log = get_logger(__name__)

SHED_BODY = (
    b'{"type":"error","code":"overloaded",'
    b'"message":"too many new connections right now; retry after a few seconds"}'
)


class HandshakePacer:
    """Tokens for upgrades; those without one wait, oldest first."""

    def __init__(self, rate_per_s: float, burst: int, max_wait_s: float) -> None:
        self.bucket = TokenBucket(rate_per_s, burst)
        # the queue's length bounds the wait for a token to max_wait_s
        self.max_waiting = max(1, math.ceil(rate_per_s * max_wait_s))
        self.retry_after_s = max(1, math.ceil(max_wait_s))
        self.waiting: deque[tuple[PacedH11Protocol, float]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def admit(self, conn: PacedH11Protocol) -> bool | None:
        """True: go on now. False: queued, :meth:`PacedH11Protocol.release` comes with its
        token. None: shed (the queue is full)."""
        if not self.waiting and self.bucket.take():
            return True
        if len(self.waiting) >= self.max_waiting:
            self._forget_gone()  # clients that gave up while waiting hold no place
        if len(self.waiting) >= self.max_waiting:
            metrics.HANDSHAKES_SHED.inc()
            throttle.emit(log.warning, "handshakes_shed", waiting=len(self.waiting))
            return None
        self.waiting.append((conn, time.monotonic()))
        metrics.HANDSHAKES_PACED.inc()
        metrics.HANDSHAKE_QUEUE.set(len(self.waiting))
        self._schedule()
        return False

    def _schedule(self) -> None:
        if self._timer is None and self.waiting:
            delay = self.bucket.seconds_until_token()
            self._timer = asyncio.get_running_loop().call_later(delay, self._release)

    def _forget_gone(self) -> None:
        self.waiting = deque(item for item in self.waiting if not item[0].transport.is_closing())
        metrics.HANDSHAKE_QUEUE.set(len(self.waiting))

    def _release(self) -> None:
        self._timer = None
        waiting = self.waiting
        now = time.monotonic()
        try:
            while waiting:
                conn, since = waiting[0]
                if conn.transport.is_closing():  # gone while waiting: no token
                    waiting.popleft()
                    continue
                if not self.bucket.take(now):
                    break
                waiting.popleft()
                metrics.HANDSHAKE_WAIT.observe(now - since)
                conn.release()
        finally:  # whatever one handshake raised, the others still get their turn
            metrics.HANDSHAKE_QUEUE.set(len(waiting))
            self._schedule()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class PacedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, whose WebSocket upgrades go through the pacer."""

    pacer: ClassVar[HandshakePacer | None] = None
    _upgrade: h11.Request | None = None  # an upgrade waiting for its token

    @property
    def waiting_for_token(self) -> bool:
        return self._upgrade is not None

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        pacer = self.pacer
        admitted = True if pacer is None else pacer.admit(self)
        if admitted:
            super().handle_websocket_upgrade(event)
        elif admitted is None:
            assert pacer is not None  # only the pacer sheds
            self._shed(pacer.retry_after_s)
        else:
            self._upgrade = event
            self.transport.pause_reading()

    def release(self) -> None:
        """The upgrade's token came: hand the connection to the WebSocket protocol."""
        event, self._upgrade = self._upgrade, None
        if event is None or self.transport.is_closing():
            return
        self.transport.resume_reading()
        super().handle_websocket_upgrade(event)

    def _shed(self, retry_after_s: int) -> None:
        """503 with Retry-After and the protocol's error body, then close."""
        headers = [
            (b"content-type", b"application/json"),
            (b"retry-after", str(retry_after_s).encode()),
            (b"content-length", str(len(SHED_BODY)).encode()),
            (b"connection", b"close"),
        ]
        response = h11.Response(status_code=503, headers=headers, reason=b"Service Unavailable")
        self.transport.write(
            self.conn.send(response)
            + self.conn.send(h11.Data(data=SHED_BODY))
            + self.conn.send(h11.EndOfMessage())
        )
        self.transport.close()


def paced_protocol(pacer: HandshakePacer) -> type[PacedH11Protocol]:
    """The protocol class for uvicorn's ``http=``, pacing upgrades through ``pacer``."""
    return type("PacedH11Protocol", (PacedH11Protocol,), {"pacer": pacer})
