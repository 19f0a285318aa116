"""The broker abstraction over nats-py JetStream (DESIGN §2).

- :func:`connect` — a ``NATS_URLS`` list, reconnecting forever, state in metrics and logs.
- :func:`ensure_streams` — create or update MD_RAW, MD_TICKS, MD_DLQ idempotently.
- :class:`Publisher` — bounded in-flight async publishes with ``Nats-Msg-Id``; never one
  awaited round trip per message.
- :func:`ensure_durable` / :func:`fetch_batch` — durable pull consumers with explicit acks
  (the services consume through :class:`services.common.pull.TrackedPull`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any, Protocol

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    StorageType,
    StreamConfig,
)

from services.common import metrics
from services.common.aio import sleep_or_stop
from services.common.errors import (
    NUM_SHARDS_METADATA,
    BrokerError,
    ShardCountMismatchError,
    StoppedError,
    StreamConfigError,
)
from services.common.logging import get_logger
from services.common.publisher import PendingPublish as PendingPublish  # re-exported
from services.common.publisher import Publisher as Publisher  # re-exported
from services.common.settings import CommonSettings, redact_url
from services.common.subjects import (
    DLQ_STREAM,
    DLQ_WILDCARD,
    RAW_STREAM,
    RAW_WILDCARD,
    TICKS_STREAM,
    TICKS_WILDCARD,
)

log = get_logger(__name__)

_STREAM_IN_USE = 10058  # "stream name already in use with a different configuration"
_DRAIN_WAIT_S = 0.005  # how long a fetch waits for more once it has a first message


async def connect(
    settings: CommonSettings,
    *,
    name: str,
    stop: asyncio.Event | None = None,
    give_up_after_s: float | None = None,
) -> NATS:
    """Connect to the first reachable server of ``NATS_URLS``, retrying until one answers;
    :class:`StoppedError` if ``stop`` is set first, :class:`BrokerError` once
    ``give_up_after_s`` have passed (command-line tools: an operator waits for an answer).

    Once connected, nats-py reconnects on its own forever; while it is away, publishes
    queue in its pending buffer and our bounded publisher window applies backpressure.
    """

    async def on_error(exc: Exception) -> None:
        metrics.NATS_ERRORS.labels(kind=metrics.nats_error_kind(exc)).inc()
        log.warning("nats_error", error=str(exc) or type(exc).__name__)

    async def on_disconnect() -> None:
        if not connected_once:
            return  # a connect abandoned on stop: nothing was connected
        metrics.NATS_CONNECTED.set(0)
        if nc.is_closed:
            return  # our own close at stop, not a lost connection
        metrics.NATS_DISCONNECTS.inc()
        log.warning("nats_disconnected")

    async def on_reconnect() -> None:
        metrics.NATS_CONNECTED.set(1)
        metrics.NATS_RECONNECTS.inc()
        log.info("nats_reconnected", server=_server(nc))

    connected_once = False
    nc = NATS()
    options: dict[str, Any] = {
        "servers": settings.nats_urls,
        "name": name,
        "connect_timeout": int(max(1, settings.nats_connect_timeout_s)),
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 1,
        "error_cb": on_error,
        "disconnected_cb": on_disconnect,
        "reconnected_cb": on_reconnect,
        "pending_size": 64 * 1024 * 1024,
    }
    urls = [redact_url(u) for u in settings.nats_urls]
    log.info("nats_connecting", urls=urls)
    # With reconnects unlimited, nats-py's connect itself retries for ever until a server
    # answers (each failure reported through on_error): race it against the stop request,
    # or a service started while NATS is down would ignore SIGTERM.
    connecting = asyncio.ensure_future(nc.connect(**options))
    stopping = asyncio.ensure_future(stop.wait()) if stop is not None else None
    waiting = {connecting} if stopping is None else {connecting, stopping}
    await asyncio.wait(waiting, timeout=give_up_after_s, return_when=asyncio.FIRST_COMPLETED)
    if stopping is not None:
        stopping.cancel()
    if not connecting.done():
        connecting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await connecting
        with contextlib.suppress(Exception):
            await nc.close()
        where = ", ".join(urls)
        if stop is not None and stop.is_set():
            raise StoppedError(f"stopped before NATS was reachable at {where}")
        raise BrokerError(f"NATS not reachable at {where} within {give_up_after_s:g} s")
    await connecting
    connected_once = True
    metrics.NATS_CONNECTED.set(1)
    log.info("nats_connected", server=_server(nc))
    return nc


def _server(nc: NATS) -> str | None:
    """host:port of the connected server: never the URL's user:password part."""
    url = nc.connected_url
    return f"{url.hostname}:{url.port}" if url is not None else None


def stream_configs(settings: CommonSettings) -> list[StreamConfig]:
    """The three streams of DESIGN §2, sized by settings."""
    common = {
        "storage": StorageType.FILE,
        "num_replicas": settings.stream_replicas,
        "discard": DiscardPolicy.OLD,
        "max_bytes": settings.stream_max_bytes,
        "duplicate_window": settings.dedup_window_s,
        "allow_direct": True,
    }
    return [
        StreamConfig(
            name=RAW_STREAM,
            subjects=[RAW_WILDCARD],
            max_age=settings.raw_max_age_s,
            description="Raw Coinbase frames as received, one subject per product",
            **common,  # type: ignore[arg-type]
        ),
        StreamConfig(
            name=TICKS_STREAM,
            subjects=[TICKS_WILDCARD],
            max_age=settings.ticks_max_age_s,
            description="Canonical ticks, md.ticks.<shard>.<product>",
            # the shard in each subject is crc32(product) % this: readers must agree
            metadata={NUM_SHARDS_METADATA: str(settings.num_shards)},
            **common,  # type: ignore[arg-type]
        ),
        StreamConfig(
            name=DLQ_STREAM,
            subjects=[DLQ_WILDCARD],
            max_age=settings.dlq_max_age_s,
            description="Dead letters: original bytes, reason and error in headers",
            **common,  # type: ignore[arg-type]
        ),
    ]


async def ensure_streams(js: JetStreamContext, settings: CommonSettings) -> None:
    """Create the streams, or bring an existing one to our config; safe to call any time.

    Refuses (:class:`ShardCountMismatchError`) when MD_TICKS was sharded with another
    NUM_SHARDS: a gateway or snapshotter replica reading the wrong shard subjects saw no
    ticks for some products, without an error."""
    for config in stream_configs(settings):
        await _check_shard_count(js, config, settings.num_shards)
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != _STREAM_IN_USE:
                raise StreamConfigError(str(config.name), exc.description or str(exc)) from exc
            try:
                await js.update_stream(config)
            except nats.js.errors.APIError as update_exc:
                raise StreamConfigError(
                    str(config.name), update_exc.description or str(update_exc)
                ) from update_exc
            log.info("stream_updated", stream=config.name)


async def _check_shard_count(js: JetStreamContext, config: StreamConfig, ours: int) -> None:
    if not config.metadata or NUM_SHARDS_METADATA not in config.metadata:
        return
    try:
        info = await js.stream_info(str(config.name))
    except nats.js.errors.NotFoundError:
        return  # created below, with ours
    stored = (info.config.metadata or {}).get(NUM_SHARDS_METADATA)
    if stored is not None and stored != str(ours):
        raise ShardCountMismatchError(stored, ours)


def ack_subject_sequences(reply: str) -> tuple[int, int]:
    """(stream sequence, consumer sequence) read from an ack subject (``$JS.ACK.<stream>.
    <consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>``) without building
    ``msg.metadata`` (a datetime and five objects per message)."""
    tokens = reply.split(".")
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[5]), int(tokens[6])
    # the longer v2 form (domains, account hash): nats-py's own parser
    sequence = Msg(_client=None, reply=reply).metadata.sequence  # type: ignore[arg-type]
    return int(sequence.stream), int(sequence.consumer)


async def ensure_durable(
    js: JetStreamContext,
    *,
    stream: str,
    durable: str,
    filter_subjects: list[str],
    max_ack_pending: int = 20_000,
    ack_wait_s: float = 30.0,
    ack_policy: AckPolicy = AckPolicy.EXPLICIT,
    resume_from: int | None = None,
) -> None:
    """Make the durable pull consumer exist as configured, creating or rewinding it first.

    ``resume_from`` (a stream sequence) forces a rewind there: the caller found a hole in
    its deliveries (see :mod:`services.common.pull`).

    A consumer left with un-acked messages (its last owner crashed) or with another filter
    is recreated to start right after its ack floor: the new owner then receives the
    un-acked messages *first and in order*, instead of after ``ack_wait`` behind newer ones
    (which an order-keeping consumer would have to drop as stale). One live owner per
    durable is the design (a replica per shard set), so rewinding cannot steal work.
    """
    config = ConsumerConfig(
        durable_name=durable,
        ack_policy=ack_policy,
        ack_wait=ack_wait_s,
        max_ack_pending=max_ack_pending,
        deliver_policy=DeliverPolicy.ALL,
        filter_subjects=filter_subjects if len(filter_subjects) > 1 else None,
        filter_subject=filter_subjects[0] if len(filter_subjects) == 1 else None,
        max_waiting=64,
    )
    try:
        info = await js.consumer_info(stream, durable)
    except nats.js.errors.NotFoundError:
        info = None
    if info is not None:
        current = info.config
        current_filters = current.filter_subjects or (
            [current.filter_subject] if current.filter_subject else []
        )
        changed = (
            sorted(current_filters) != sorted(filter_subjects)
            or current.max_ack_pending != max_ack_pending
            or current.ack_wait != ack_wait_s
            or current.ack_policy != ack_policy
        )
        if info.num_ack_pending or changed or resume_from is not None:
            floor = info.ack_floor.stream_seq if info.ack_floor else 0
            if resume_from is not None:
                floor = resume_from - 1
            log.warning(
                "consumer_rewound",
                stream=stream,
                consumer=durable,
                from_stream_seq=floor + 1,
                unacked=info.num_ack_pending,
                config_changed=changed,
            )
            await js.delete_consumer(stream, durable)
            if floor:
                config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
                config.opt_start_seq = floor + 1
            info = None
    if info is None and resume_from is not None and resume_from > 1:
        # also when an interrupted rewind already deleted the consumer
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = resume_from
    if info is None:
        try:
            await js.add_consumer(stream, config)
        except nats.js.errors.BadRequestError as exc:
            raise StreamConfigError(stream, f"consumer {durable}: {exc.description}") from exc


async def fetch_batch(
    sub: JetStreamContext.PullSubscription, batch: int, timeout_s: float
) -> list[Msg]:
    """Up to ``batch`` messages, or ``[]`` when none arrived within ``timeout_s``."""
    # nats-py's fetch(batch) keeps a lingering pull open until the batch is full or the
    # timeout ends, so at low rates every message would wait up to ``timeout_s``. Instead:
    # wait for the first message, then take what is already there without waiting.
    try:
        first = await sub.fetch(1, timeout=timeout_s)
    except TimeoutError:  # nats-py raises both its own and asyncio's TimeoutError here
        return []
    except nats.errors.Error as exc:
        # NATS away or reconnecting: the consumer loop just asks again a little later
        log.warning("fetch_failed", error=repr(exc))
        await asyncio.sleep(timeout_s)
        return []
    if batch <= 1:
        return first
    try:
        return first + await sub.fetch(batch - 1, timeout=_DRAIN_WAIT_S)
    except (TimeoutError, nats.errors.Error):
        return first  # the rest comes with the next fetch


async def report_consumer_lag(
    js: JetStreamContext, stream: str, durable: str, stop: asyncio.Event, period_s: float = 2.0
) -> None:
    """Export the consumer's pending (lag) and ack-pending counts until ``stop``.

    While they cannot be read the gauges hold their last value: failures are counted, the
    first of a run is logged, and ``..._lag_updated_timestamp_seconds`` shows how old the
    value is (an alert on lag alone would go blind exactly when NATS is away)."""
    failing = False
    errors = metrics.CONSUMER_INFO_ERRORS.labels(stream=stream, consumer=durable)
    updated = metrics.CONSUMER_LAG_UPDATED.labels(stream=stream, consumer=durable)
    while not stop.is_set():
        try:
            info = await js.consumer_info(stream, durable)
        except (nats.errors.Error, TimeoutError) as exc:
            errors.inc()
            if not failing:
                log.warning("consumer_info_failed", stream=stream, consumer=durable, error=str(exc))
            failing = True
        else:
            if failing:
                log.info("consumer_info_recovered", stream=stream, consumer=durable)
            failing = False
            metrics.CONSUMER_PENDING.labels(stream=stream, consumer=durable).set(
                info.num_pending or 0
            )
            metrics.CONSUMER_ACK_PENDING.labels(stream=stream, consumer=durable).set(
                info.num_ack_pending or 0
            )
            updated.set_to_current_time()
        await sleep_or_stop(period_s, stop)


class Unsubscribable(Protocol):
    async def unsubscribe(self) -> None: ...


async def close(nc: NATS, timeout_s: float, *, pull_subs: Iterable[Unsubscribable] = ()) -> None:
    """Drain (flush publishes and acks, finish subscriptions) within ``timeout_s``, else close.

    Pull subscriptions are unsubscribed first: nobody reads their queue any more, and
    nats-py's drain would otherwise wait its full timeout for the 408 status replies of
    expired fetches sitting in it.
    """
    if nc.is_closed:
        return
    for sub in pull_subs:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    try:
        await asyncio.wait_for(nc.drain(), timeout_s)
    except (TimeoutError, nats.errors.Error) as exc:
        log.warning("nats_drain_incomplete", error=repr(exc))
        try:
            await nc.close()
        except (RuntimeError, TypeError, OSError) as closed:
            # nats-py (2.16) flushes what it still buffers for a reconnect into the transport
            # it lost when the server went away: uvloop raises RuntimeError ("the handler is
            # closed"), asyncio's own loop a TypeError. Nothing can be sent any more; what was
            # not acked is redelivered to the next consumer.
            log.warning("nats_closed_unreachable", error=repr(closed))
