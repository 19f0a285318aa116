"""A durable pull consumer whose deliveries are checked for holes, for AckPolicy.ALL owners.

The server numbers every delivery of a consumer, redeliveries included: 1, 2, 3, ... A jump
means deliveries it counts as made never reached us. Seen in a 3-node cluster: the
consumer's leader served a pending pull request, recorded and replicated the deliveries,
and was killed before its route flushed them to the client. The new leader hands out the
next messages; the lost ones come back only after ``ack_wait``, behind newer ones, and with
AckPolicy.ALL the ack of any newer message acks them too: they would never be processed.

So a fetch stops at a hole: the caller handles and acks what came before it, then calls
:meth:`TrackedPull.rewind`, which recreates the durable at the first frame not acked.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from services.common import metrics
from services.common.broker import consumer_seq_of, durable_pull, fetch_batch, stream_seq_of
from services.common.logging import get_logger

log = get_logger(__name__)

_REBIND_RETRY_S = 0.5


class DeliveryTracker:
    """The consumer sequence the next delivery must carry."""

    def __init__(self, next_dseq: int) -> None:
        self.next_dseq = next_dseq

    def first_gap(self, msgs: list[Msg]) -> int | None:
        """Index of the first message after a hole (``None``: no hole); the expectation
        advances over the messages before it."""
        for index, msg in enumerate(msgs):
            dseq = consumer_seq_of(msg)
            if dseq > self.next_dseq:
                return index
            # a lower one is a re-send by a new leader that had not seen it go out
            self.next_dseq = max(self.next_dseq, dseq + 1)
        return None


class TrackedPull:
    """One owner's binding to a durable pull consumer (see the module doc)."""

    def __init__(
        self,
        js: JetStreamContext,
        subs: list[JetStreamContext.PullSubscription],
        *,
        stream: str,
        durable: str,
        **config: Any,
    ) -> None:
        self.js = js
        self.stream = stream
        self.durable = durable
        self._config = config
        self._subs = subs  # every subscription made, for the drain at shutdown
        self.sub: JetStreamContext.PullSubscription | None = None
        self.tracker = DeliveryTracker(1)
        self.acked_through: int | None = None  # stream seq of the last message acked
        self.hole = False  # the last fetch stopped at a hole: ack what came, then rewind

    async def bind(self, resume_from: int | None = None) -> None:
        self.sub = await durable_pull(
            self.js,
            stream=self.stream,
            durable=self.durable,
            resume_from=resume_from,
            **self._config,
        )
        self._subs.append(self.sub)
        info = await self.js.consumer_info(self.stream, self.durable)
        delivered = info.delivered.consumer_seq if info.delivered else 0
        self.tracker = DeliveryTracker((delivered or 0) + 1)
        self.hole = False

    async def fetch(self, batch: int, timeout_s: float) -> list[Msg]:
        """Up to ``batch`` messages, ending before a hole if there is one (``hole`` is then
        set: ack what was returned, then :meth:`rewind`)."""
        assert self.sub is not None, "bind() first"
        msgs = await fetch_batch(self.sub, batch, timeout_s)
        gap = self.tracker.first_gap(msgs) if msgs else None
        if gap is None:
            return msgs
        self.hole = True
        metrics.DELIVERY_GAPS.labels(stream=self.stream).inc()
        log.warning(
            "delivery_gap",
            stream=self.stream,
            consumer=self.durable,
            expected_delivery=self.tracker.next_dseq,
            got_delivery=consumer_seq_of(msgs[gap]),
            got_stream_seq=stream_seq_of(msgs[gap]),
        )
        return msgs[:gap]

    def acked(self, msg: Msg) -> int:
        """Record ``msg`` (and, AckPolicy.ALL, all before it) as acked; its stream seq."""
        self.acked_through = seq = stream_seq_of(msg)
        return seq

    async def rewind(self, stop: asyncio.Event) -> bool:
        """Recreate the durable at the first message not acked; ``False`` if stopped."""
        assert self.sub is not None
        with contextlib.suppress(nats.errors.Error):
            await self.sub.unsubscribe()  # a fresh inbox: no stale deliveries after the rewind
        resume = self.acked_through + 1 if self.acked_through is not None else None
        while not stop.is_set():
            try:
                await self.bind(resume)
            except (nats.errors.Error, TimeoutError) as exc:  # the consumer leader moving
                log.warning("rewind_retry", stream=self.stream, error=repr(exc))
                await asyncio.sleep(_REBIND_RETRY_S)
                continue
            log.info("consumer_resumed", stream=self.stream, from_stream_seq=resume)
            return True
        return False
