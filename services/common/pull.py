"""A durable pull consumer whose deliveries are checked for holes, for AckPolicy.ALL owners.

The server numbers every delivery of a consumer, redeliveries included: 1, 2, 3, ... A jump
means deliveries it counts as made never reached us. Seen in a 3-node cluster: the
consumer's leader served a pending pull request, recorded and replicated the deliveries,
and was killed before its route flushed them to the client. The new leader hands out the
next messages; the lost ones come back only after ``ack_wait``, behind newer ones, and with
AckPolicy.ALL the ack of any newer message acks them too: they would never be processed.

So a fetch stops at a hole: the caller handles and acks what came before it, then calls
:meth:`TrackedPull.rewind`, which recreates the durable at the first frame not acked.

Deliveries come through :class:`DirectPull`: pull requests kept topped up so the server
pushes the next batch while this one is handled (no request round trip per batch), the
messages parsed in the read loop (:mod:`services.common.wire`) into a plain buffer of
:class:`Delivery` objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from services.common import metrics
from services.common.aio import Signal
from services.common.broker import ack_subject_sequences, ensure_durable
from services.common.logging import get_logger
from services.common.wire import parse_headers, status_of, subscribe_direct, unsubscribe_direct

log = get_logger(__name__)

_REBIND_RETRY_S = 0.5
_STATUS_RETRY_S = 0.05  # after a 409/503 (leader moving, too many waiting requests)


class _PullRequest(msgspec.Struct):
    batch: int
    expires: int  # ns


_encode_request = msgspec.json.Encoder().encode


class Delivery:
    """One message a pull delivered, with its stream and consumer sequences read from the
    ack subject once. Leaner than nats-py's ``Msg`` (a nine-field dataclass and a parsed
    header dict per message, ~15 % of the snapshotter's CPU): headers stay raw until read."""

    __slots__ = ("_raw_headers", "consumer_seq", "data", "reply", "stream_seq", "subject")

    def __init__(self, subject: str, reply: str, data: bytes, raw_headers: bytes | None) -> None:
        self.subject = subject
        self.reply = reply
        self.data = data
        self._raw_headers = raw_headers
        self.stream_seq, self.consumer_seq = ack_subject_sequences(reply)

    @property
    def headers(self) -> dict[str, str] | None:
        raw = self._raw_headers
        return parse_headers(raw) if raw is not None else None


class DirectPull:
    """The deliveries of one durable pull consumer, into a buffer.

    Pull requests are kept topped up to twice the batch in messages of credit, so deliveries
    continue while the caller handles a batch (the consumer's ``max_ack_pending`` still
    bounds what is in flight). What is owed is counted in total, not per request: the
    server need not fill requests in the order they were sent, but it ends every expired
    one with a 408 saying how many messages it still owed. Requests lost with a server
    (reconnect, leader change) are forgotten once the last could have expired, so a stall
    lasts one ``expires`` at most.
    """

    def __init__(self, nc: NATS, stream: str, durable: str, *, expires_s: float = 1.0) -> None:
        self.nc = nc
        self.stream = stream
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = nc.new_inbox()
        self._expires_s = expires_s
        self._ready: deque[Delivery] = deque()
        self._arrived = Signal()
        self._owed = 0  # messages the live requests may still deliver
        self._requests_end = 0.0  # when the last request sent has surely expired
        self._retry_at = 0.0
        self._finishing = False
        self._sub: Subscription | None = None

    async def subscribe(self) -> None:
        self._sub = await subscribe_direct(self.nc, self._inbox, self._on_message)

    async def unsubscribe(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await unsubscribe_direct(self.nc, sub)

    def _on_message(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        status = status_of(headers)
        if status is None:
            self._ready.append(Delivery(subject.decode(), reply.decode(), data, headers))
            self._owed -= 1
        elif status == b"408":  # a request expired owing Nats-Pending-Messages
            assert headers is not None
            pending = parse_headers(headers).get("Nats-Pending-Messages", "")
            self._owed -= int(pending) if pending.isdigit() else self._owed
        elif status != b"100":  # 409 leader change / consumer deleted, 503 no responders
            self._owed = 0
            self._retry_at = time.monotonic() + _STATUS_RETRY_S
            assert headers is not None
            log.info(
                "pull_status",
                stream=self.stream,
                status=status.decode(),
                description=parse_headers(headers).get("Description"),
            )
        self._arrived.set()

    def finish(self) -> None:
        """Ask for nothing more: what requests still owe arrives, then ``fetch`` returns
        ``[]`` at once (a clean stop leaves no delivered message un-acked)."""
        self._finishing = True

    @property
    def finished(self) -> bool:
        return self._finishing and not self._ready and self._still_owed() <= 0

    def _still_owed(self) -> int:
        if self._owed > 0 and time.monotonic() > self._requests_end:
            self._owed = 0  # lost with a server: the server forgot them too
        return self._owed

    async def _top_up(self, batch: int) -> None:
        if self._finishing:
            return
        owed = max(self._still_owed(), 0)
        now = time.monotonic()
        if now < self._retry_at:
            return
        want = 2 * batch - owed - len(self._ready)
        if want < max(1, batch // 2):
            return
        request = _PullRequest(want, int(self._expires_s * 1e9))
        self._owed = owed + want  # before the await: deliveries may be counted meanwhile
        ends_before, self._requests_end = self._requests_end, now + self._expires_s + 0.5
        try:
            await self.nc.publish(self._next, _encode_request(request), reply=self._inbox)
        except nats.errors.Error:
            self._owed -= want
            self._requests_end = ends_before
            raise

    def _wake_in(self, now: float, deadline: float) -> float:
        """Seconds until a message may arrive, a retry is due or a request lapses."""
        wake = deadline
        if self._retry_at > now:
            wake = min(wake, self._retry_at)
        if self._owed > 0:
            wake = min(wake, self._requests_end)
        return max(wake - now, 0.001)

    async def fetch(self, batch: int, timeout_s: float) -> list[Delivery]:
        """Up to ``batch`` messages as soon as there are any, else ``[]`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        ready = self._ready
        while not ready:
            if self.finished:
                return []
            try:
                await self._top_up(batch)
            except nats.errors.Error as exc:  # NATS away: ask again a little later
                log.warning("fetch_failed", stream=self.stream, error=repr(exc))
            now = time.monotonic()
            if now >= deadline:
                return []
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._wake_in(now, deadline)):
                    await self._arrived.wait()
        # the rest of a burst is often in the socket already: let the read loop take it
        await asyncio.sleep(0)
        count = min(batch, len(ready))
        msgs = [ready.popleft() for _ in range(count)]
        with contextlib.suppress(nats.errors.Error):
            await self._top_up(batch)  # the next batch flows while this one is handled
        return msgs


class DeliveryTracker:
    """The consumer sequence the next delivery must carry."""

    def __init__(self, next_dseq: int) -> None:
        self.next_dseq = next_dseq

    def first_gap(self, msgs: list[Delivery]) -> int | None:
        """Index of the first message after a hole (``None``: no hole); the expectation
        advances over the messages before it."""
        for index, msg in enumerate(msgs):
            dseq = msg.consumer_seq
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
        subs: list[DirectPull],
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
        self.sub: DirectPull | None = None
        self.tracker = DeliveryTracker(1)
        self.acked_through: int | None = None  # stream seq of the last message acked
        self.hole = False  # the last fetch stopped at a hole: ack what came, then rewind

    async def bind(self, resume_from: int | None = None) -> None:
        await ensure_durable(
            self.js,
            stream=self.stream,
            durable=self.durable,
            resume_from=resume_from,
            **self._config,
        )
        self.sub = DirectPull(self.js._nc, self.stream, self.durable)
        await self.sub.subscribe()
        self._subs.append(self.sub)
        info = await self.js.consumer_info(self.stream, self.durable)
        delivered = info.delivered.consumer_seq if info.delivered else 0
        self.tracker = DeliveryTracker((delivered or 0) + 1)
        self.hole = False

    async def fetch(self, batch: int, timeout_s: float) -> list[Delivery]:
        """Up to ``batch`` messages, ending before a hole if there is one (``hole`` is then
        set: ack what was returned, then :meth:`rewind`)."""
        assert self.sub is not None, "bind() first"
        msgs = await self.sub.fetch(batch, timeout_s)
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
            got_delivery=msgs[gap].consumer_seq,
            got_stream_seq=msgs[gap].stream_seq,
        )
        return msgs[:gap]

    def finish(self) -> None:
        """Stop asking for more (see :meth:`DirectPull.finish`)."""
        if self.sub is not None:
            self.sub.finish()

    @property
    def finished(self) -> bool:
        """After :meth:`finish`: every delivery requested has been returned."""
        return self.sub is None or self.sub.finished

    async def ack(self, msg: Delivery) -> int:
        """Ack ``msg`` and, AckPolicy.ALL, every delivery before it; its stream seq."""
        await self.js._nc.publish(msg.reply)
        self.acked_through = msg.stream_seq
        return msg.stream_seq

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
