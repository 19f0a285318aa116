"""Pipelined JetStream publishes, built for the ingestor's and normalizer's hot path.

Same protocol as nats-py's ``publish_async`` (a publish with a reply subject; the stream's
PubAck comes back on it), with its per-message costs taken out — they were ~30 % of the
normalizer's CPU: a NUID plus random token per reply subject (here a counter), an
``asyncio.wait_for`` on a semaphore per publish (a dict size check), headers validated with
a regex and assembled per key (here a few bytes concatenated; values are ours, CR/LF are
replaced), and each ack parsed with ``json.loads`` into a dict then a dataclass (here one
msgspec decode).

The command is handed to nats-py's connection buffer the way ``Client.publish`` does, so
its flusher, reconnect buffering and limits still apply.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from services.common import metrics
from services.common.errors import BrokerError, PublishTimeoutError
from services.common.settings import CommonSettings
from services.common.subjects import HDR_MSG_ID
from services.common.wire import status_of, subscribe_direct

_MSG_ID_PREFIX = HDR_MSG_ID.encode() + b": "
_NO_RESPONDERS = b"503"
_CRLF = b"\r\n"


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int | None = None
    description: str | None = None


class PubAck(msgspec.Struct):
    """A stream's acknowledgement of a publish (nats-py's fields; decoded straight into)."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    domain: str | None = None
    error: _ApiError | None = None


_decode_ack = msgspec.json.Decoder(PubAck).decode


@dataclass(slots=True)
class PendingPublish:
    stream: str
    started: float
    future: asyncio.Future[PubAck]
    token: bytes = b""


def _header_block(msg_id: str | None, headers: Mapping[str, str] | None) -> bytes:
    parts = [b"NATS/1.0\r\n"]
    if msg_id is not None:
        parts.append(b"%b%b\r\n" % (_MSG_ID_PREFIX, _clean(msg_id)))
    if headers:
        for key, value in headers.items():
            parts.append(b"%b: %b\r\n" % (key.encode(), _clean(value)))
    parts.append(_CRLF)
    return b"".join(parts)


def _clean(value: str) -> bytes:
    """A header value on one line: a CR or LF would end the header (or inject a command)."""
    if "\r" in value or "\n" in value:
        value = value.replace("\r", " ").replace("\n", " ")
    return value.encode()


class Publisher:
    """Pipelined JetStream publishes: many in flight, each acked before its effect counts.

    ``publish`` only waits when ``PUBLISH_MAX_IN_FLIGHT`` acks are outstanding (that is the
    backpressure). ``wait`` resolves a set of publishes, raising if any failed or timed out;
    a timed-out publish is cancelled so its window slot is freed.
    """

    def __init__(self, nc: NATS, settings: CommonSettings) -> None:
        self.nc = nc
        self.js = nc.jetstream()  # stream management for callers; publishes bypass it
        self._ack_timeout_s = settings.publish_ack_timeout_s
        self._max_in_flight = settings.publish_max_in_flight
        self._inbox: bytes | None = None
        self._acks: dict[bytes, asyncio.Future[PubAck]] = {}
        # read at scrape: it was set in wait() only, so it stood still while publish()
        # waited for room in a full window (one publisher per service process)
        metrics.PUBLISH_IN_FLIGHT.set_function(self.in_flight)
        self._counter = 0
        self._room = asyncio.Event()
        self._room.set()

    async def _open_inbox(self) -> bytes:
        prefix = self.nc.new_inbox() + "."
        # acks are settled in the read loop itself (services.common.wire)
        await subscribe_direct(self.nc, prefix + "*", self._on_ack)
        self._inbox = prefix.encode()
        return self._inbox

    async def publish(
        self,
        stream: str,
        subject: str,
        payload: bytes,
        *,
        msg_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> PendingPublish:
        inbox = self._inbox or await self._open_inbox()
        while len(self._acks) >= self._max_in_flight:
            self._room.clear()
            await self._room.wait()
        self._counter += 1
        token = b"%d" % self._counter
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        self._acks[token] = future
        started = time.perf_counter()
        if msg_id is None and not headers:
            command = b"PUB %b %b%b %d\r\n%b\r\n" % (
                subject.encode(), inbox, token, len(payload), payload
            )  # fmt: skip
        else:
            block = _header_block(msg_id, headers)
            command = b"HPUB %b %b%b %d %d\r\n%b%b\r\n" % (
                subject.encode(), inbox, token, len(block), len(block) + len(payload),
                block, payload,
            )  # fmt: skip
        try:
            await self._send(command, len(payload))
        except BaseException:
            self._settle(token)
            raise
        return PendingPublish(stream, started, future, token)

    async def _send(self, command: bytes, payload_size: int) -> None:
        """What ``nats.aio.client.Client.publish`` does once the command is built."""
        nc = self.nc
        if nc.is_closed:
            raise nats.errors.ConnectionClosedError
        if nc.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError
        if payload_size > nc.max_payload:
            raise nats.errors.MaxPayloadError
        if not nc.is_connected and (
            nc._max_pending_size <= 0 or nc._pending_data_size + len(command) > nc._max_pending_size
        ):
            raise nats.errors.OutboundBufferLimitError
        nc.stats["out_msgs"] += 1
        nc.stats["out_bytes"] += payload_size
        await nc._send_command(command)
        if nc._flush_queue is not None and nc._flush_queue.empty():
            await nc._flush_pending()

    def _settle(self, token: bytes) -> asyncio.Future[PubAck] | None:
        future = self._acks.pop(token, None)
        if len(self._acks) < self._max_in_flight:
            self._room.set()
        return future

    def _on_ack(self, subject: bytes, _reply: bytes, data: bytes, headers: bytes | None) -> None:
        assert self._inbox is not None
        future = self._settle(subject[len(self._inbox) :])
        if future is None or future.done():
            return  # timed out and cancelled already
        if status_of(headers) == _NO_RESPONDERS:
            future.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            body = _decode_ack(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            future.set_exception(BrokerError(f"unreadable PubAck: {exc}"))
            return
        if body.error is not None:
            try:
                nats.js.errors.APIError.from_error(msgspec.structs.asdict(body.error))
            except nats.js.errors.APIError as exc:  # from_error raises the typed error
                future.set_exception(exc)
            return
        future.set_result(body)

    def in_flight(self) -> int:
        return len(self._acks)

    async def wait(self, pending: Iterable[PendingPublish]) -> list[PubAck]:
        """Await the acks of ``pending``; all or nothing."""
        items = list(pending)
        if not items:
            return []
        futures = [item.future for item in items]
        _done, not_done = await asyncio.wait(futures, timeout=self._ack_timeout_s)
        for item in items:
            if item.future in not_done:
                item.future.cancel()
                self._settle(item.token)
        acks: list[PubAck] = []
        first_error: BaseException | None = None
        # metrics per stream and per call, not per message: label lookups were ~5 % of the
        # normalizer's CPU. The latency observed is the call's slowest (its oldest publish).
        stored: Counter[str] = Counter()
        duplicates: Counter[str] = Counter()
        oldest: dict[str, float] = {}
        for item in items:
            if item.future in not_done:
                metrics.PUBLISH_ERRORS.labels(stream=item.stream, kind="timeout").inc()
                continue
            exc = item.future.exception()
            if exc is not None:
                metrics.PUBLISH_ERRORS.labels(stream=item.stream, kind="rejected").inc()
                first_error = first_error or exc
                continue
            ack = item.future.result()
            (duplicates if ack.duplicate else stored)[item.stream] += 1
            if item.stream not in oldest:
                oldest[item.stream] = item.started
            acks.append(ack)
        now = time.perf_counter()
        for stream, started in oldest.items():
            metrics.PUBLISH_SECONDS.labels(stream=stream).observe(now - started)
        for stream, count in stored.items():
            metrics.PUBLISHED.labels(stream=stream).inc(count)
        for stream, count in duplicates.items():
            metrics.PUBLISH_DUPLICATES.labels(stream=stream).inc(count)
        if not_done:
            raise PublishTimeoutError(len(not_done), self._ack_timeout_s)
        if first_error is not None:
            reason = f"{type(first_error).__name__}: {first_error}"
            raise BrokerError(f"publish failed: {reason}") from first_error
        return acks
