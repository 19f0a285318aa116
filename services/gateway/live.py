"""The gateway's live tail of MD_TICKS: an ordered JetStream push consumer, dispatched
directly from the NATS read loop.

A core NATS subscription on ``md.ticks.>`` loses every tick published while the gateway
is reconnecting (NATS restarted, a cluster node lost): the normalizer reconnects first and
stores them, the gateway's clients would then see a silent jump in ``seq``. An ordered
consumer (ack none, flow control, idle heartbeats, one in-memory replica) is recreated
from the stream sequence after the last one delivered whenever a delivery is missing
(consumer sequence not the next one), a heartbeat reports deliveries we never got, or
neither data nor heartbeats arrived for two heartbeat intervals (the server restarted or
the consumer's node died). So the hub receives every tick of the stream, once, in order.

This is nats-py's ordered consumer protocol, implemented here on
:mod:`services.common.wire`'s direct dispatch: through nats-py, each tick cost a header
dict, a ``Msg``, a queue hop and a callback task — about half of the gateway's CPU in the
pipeline bench. The tail starts at the stream's next sequence, not ``DeliverPolicy.ALL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.js import api
from nats.js.client import JetStreamContext

from services.common.broker import ack_subject_sequences
from services.common.logging import get_logger
from services.common.subjects import TICKS_STREAM, TICKS_WILDCARD
from services.common.wire import parse_headers, status_of, subscribe_direct, unsubscribe_direct
from services.gateway import metrics

log = get_logger(__name__)

TickHandler = Callable[[bytes, bytes], None]  # (payload, subject), in the read loop

_RECREATE_RETRY_S = 0.5
_MISSED_HEARTBEATS = 2  # silence for this many intervals: the consumer is gone
_CATCH_UP_POLL_S = 0.005


class LiveTail:
    """Every MD_TICKS message stored from :meth:`start` on, to ``on_tick``, in stream order,
    across NATS reconnects and server restarts."""

    def __init__(self, js: JetStreamContext, on_tick: TickHandler, heartbeat_s: float) -> None:
        self.js = js
        self.nc: NATS = js._nc
        self.on_tick = on_tick
        self.heartbeat_s = heartbeat_s
        self.last_stream_seq = 0  # the last delivered (resume after it)
        self._next_delivery = 1  # consumer sequence the next delivery must carry
        self._generation = 0  # deliveries of an older consumer are ignored
        self._active = False  # data or a heartbeat since the last watchdog look
        self._sub: Subscription | None = None
        self._consumer: str | None = None
        self._recreating: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None

    async def start(self) -> None:
        info = await self.js.stream_info(TICKS_STREAM)
        self.last_stream_seq = info.state.last_seq
        await self._create()
        metrics.LIVE_STREAM_SEQ.set_function(lambda: self.last_stream_seq)
        self._watchdog = asyncio.create_task(self._watch())
        log.info("live_tail_started", stream_seq=self.last_stream_seq + 1)

    async def catch_up(self, timeout_s: float) -> bool:
        """Until every tick MD_TICKS held when called has been handed to ``on_tick``, or
        ``timeout_s``; False (logged) if it ran out. Stored is not delivered: a tick that
        JetStream acked just before a SIGTERM may still be on its way to this tail."""
        if not self.nc.is_connected:
            log.warning("live_tail_behind", delivered_seq=self.last_stream_seq, nats="away")
            return False
        started = time.monotonic()
        target: int | None = None
        try:
            async with asyncio.timeout(timeout_s):
                target = (await self.js.stream_info(TICKS_STREAM)).state.last_seq
                # polled, once at shutdown: an event would cost a check on every tick
                while self.last_stream_seq < target:  # noqa: ASYNC110
                    await asyncio.sleep(_CATCH_UP_POLL_S)
        except (TimeoutError, nats.errors.Error) as exc:
            log.warning(
                "live_tail_behind",
                delivered_seq=self.last_stream_seq,
                stream_seq=target,
                waited_s=round(time.monotonic() - started, 3),
                error=repr(exc) if not isinstance(exc, TimeoutError) else None,
            )
            return False
        log.info(
            "live_tail_caught_up",
            stream_seq=target,
            waited_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return True

    async def stop(self) -> None:
        for task in (self._watchdog, self._recreating):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._generation += 1
        await self._drop_subscription()

    async def _create(self) -> None:
        """A new consumer from the sequence after the last delivered, on a fresh inbox."""
        self._generation += 1
        self._next_delivery = 1
        inbox = self.nc.new_inbox()
        self._sub = await subscribe_direct(
            self.nc, inbox, partial(self._on_message, self._generation)
        )
        config = api.ConsumerConfig(
            deliver_subject=inbox,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.last_stream_seq + 1,
            filter_subject=TICKS_WILDCARD,
            ack_policy=api.AckPolicy.NONE,
            max_deliver=1,
            flow_control=True,
            idle_heartbeat=self.heartbeat_s,
            num_replicas=1,
            mem_storage=True,
            inactive_threshold=max(30.0, self.heartbeat_s * 10),
        )
        info = await self.js.add_consumer(TICKS_STREAM, config)
        self._consumer = info.name
        self._active = True

    def _on_message(
        self, generation: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        if generation != self._generation:
            return  # the consumer being replaced
        self._active = True
        status = status_of(headers)
        if status is not None:
            self._on_status(status, reply, headers)
            return
        stream_seq, delivery = ack_subject_sequences(reply.decode())
        if delivery != self._next_delivery:
            self._resume(f"delivery {delivery}, expected {self._next_delivery}")
            return
        self._next_delivery = delivery + 1
        self.last_stream_seq = stream_seq
        self.on_tick(data, subject)

    def _on_status(self, status: bytes, reply: bytes, raw: bytes | None) -> None:
        if status != b"100" or raw is None:
            return  # nothing else is sent to a push consumer's inbox
        if reply:  # a flow-control request: every delivery before it is handled already
            self._publish_empty(reply.decode())
            return
        headers = parse_headers(raw)  # an idle heartbeat
        stalled = headers.get("Nats-Consumer-Stalled")
        if stalled:
            self._publish_empty(stalled)
        last = headers.get("Nats-Last-Consumer")
        if last is not None and last.isdigit() and int(last) != self._next_delivery - 1:
            self._resume(f"heartbeat reports delivery {last}, got {self._next_delivery - 1}")

    def _publish_empty(self, subject: str) -> None:
        task = asyncio.ensure_future(self.nc.publish(subject))
        task.add_done_callback(_ignore_result)

    def _resume(self, why: str) -> None:
        """Recreate the consumer after the last delivered sequence (once at a time)."""
        if self._recreating is not None and not self._recreating.done():
            return
        self._generation += 1  # nothing more from the current consumer counts
        metrics.LIVE_RESUMES.inc()
        log.info("live_tail_resumed", stream_seq=self.last_stream_seq + 1, reason=why)
        self._recreating = asyncio.create_task(self._recreate())

    async def _recreate(self) -> None:
        await self._drop_subscription()
        while True:
            try:
                await self._create()
            except (nats.errors.Error, TimeoutError) as exc:  # NATS away, leader moving
                log.warning("live_tail_retry", error=repr(exc))
                await self._drop_subscription()
                await asyncio.sleep(_RECREATE_RETRY_S)
            else:
                return

    async def _drop_subscription(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await unsubscribe_direct(self.nc, sub)
        consumer, self._consumer = self._consumer, None
        if consumer is not None and self.nc.is_connected:
            # best effort and in the background (its leader may be the node that died):
            # an ephemeral consumer also goes after its inactive threshold
            task = asyncio.ensure_future(self.js.delete_consumer(TICKS_STREAM, consumer))
            task.add_done_callback(_ignore_result)

    async def _watch(self) -> None:
        """Resume when neither data nor heartbeats came for two intervals."""
        while True:
            await asyncio.sleep(self.heartbeat_s * _MISSED_HEARTBEATS)
            if self._active or not self.nc.is_connected:
                self._active = False
                continue
            if self._recreating is None or self._recreating.done():
                self._resume("no data or heartbeat")


def _ignore_result(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # best effort: a lost flow-control reply is asked for again
