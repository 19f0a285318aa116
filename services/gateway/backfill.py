"""Backfill from MD_TICKS: a product's recent ticks, read straight from JetStream.

Three forms (DESIGN §8): ``last: N``, ``since_seq: S`` (tick seq ≥ S) and ``since_time: T``
(stored in MD_TICKS at or after T). Whatever the form, at most ``BACKFILL_MAX`` ticks come
back: the newest ones of the range, so the hand-over to live ticks stays gapless.

The read never scans a product's whole history. Per subject, tick ``seq`` and the stream
timestamp both grow with the stream sequence, so ``since_*`` find their first message by
binary search with direct gets (``next_by_subj``, ~log2(stream length) round trips); a
range larger than the cap is narrowed by probing consumer ``num_pending`` counts. Only
then does an ephemeral, unacknowledged pull consumer read the range, up to what was
stored when it was created (anything later reaches the client as a live tick).

Alongside the ticks comes the tick just before the first one returned (or ``None`` when
the range starts at the product's first stored tick): the gateway sends it as the
subscription's snapshot, so snapshot → backfill → live is one strictly increasing
sequence per product.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RawStreamMsg

from services.common.logging import get_logger
from services.common.logthrottle import throttle
from services.common.models import decode_tick_seq
from services.common.subjects import TICKS_STREAM, tick_subject
from services.gateway import metrics
from services.gateway.errors import BackfillUnavailableError
from services.gateway.protocol import BackfillSpec

log = get_logger(__name__)

_FETCH_BATCH = 500
# a short wait for ticks the hub has seen but the stream has not stored yet (its inbound
# queue can lag core delivery by a little); ticks published later are in the live buffer
_TAIL_WAIT_S = 0.25
_PROBES = 6


@dataclass(slots=True)
class BackfillResult:
    before: bytes | None
    before_seq: int | None
    ticks: list[bytes]
    last_seq: int | None


async def read_backfill(
    js: JetStreamContext,
    product: str,
    spec: BackfillSpec,
    *,
    num_shards: int,
    cap: int,
    seen_seq: int,
) -> BackfillResult:
    """The backfill of ``product``; ``seen_seq`` is the newest seq the hub had forwarded when
    the client's live subscription was registered: the read goes at least that far.

    Raises :class:`BackfillUnavailableError` when JetStream cannot serve it.
    """
    subject = tick_subject(product, num_shards)
    try:
        return await _read(js, subject, spec, cap, seen_seq)
    except nats.js.errors.NotFoundError as exc:
        raise BackfillUnavailableError(product, "stream MD_TICKS not found") from exc
    except msgspec.DecodeError as exc:
        raise BackfillUnavailableError(product, "unreadable tick in MD_TICKS") from exc
    except (nats.errors.Error, TimeoutError, OSError) as exc:
        raise BackfillUnavailableError(product, type(exc).__name__) from exc


async def _read(
    js: JetStreamContext, subject: str, spec: BackfillSpec, cap: int, seen_seq: int
) -> BackfillResult:
    info = await js.stream_info(TICKS_STREAM, subjects_filter=subject)
    stored = (info.state.subjects or {}).get(subject, 0)
    first, last = info.state.first_seq, info.state.last_seq
    if stored == 0:
        return BackfillResult(None, None, [], None)
    before: RawStreamMsg | None = None
    if spec.last is not None:
        n, lo, in_range = min(spec.last, cap), first, stored
    else:
        n = cap
        if spec.since_seq is not None:
            since_seq = spec.since_seq
            lo, before = await _search(js, subject, first, last, lambda m: _seq(m) >= since_seq)
        else:
            assert spec.since_time is not None
            since = spec.since_time
            lo, before = await _search(js, subject, first, last, lambda m: _at_or_after(m, since))
        if lo > last:
            return _result(before, [])
        in_range = stored if lo == first else -1  # unknown: the probe below counts it
    consumer, pending = await _open_tail(js, subject, lo, last, n, in_range)
    try:
        window: deque[tuple[int, bytes]] = deque(maxlen=n + 1)
        await _drain(js, consumer, pending, window, seen_seq)
    finally:
        await _close(js, consumer)
    log.debug("backfill_read", subject=subject, start=lo, pending=pending, kept=len(window))
    if len(window) > n:
        head_seq, head = window.popleft()
        return BackfillResult(head, head_seq, [d for _, d in window], window[-1][0])
    return _result(before, list(window))


def _result(before: RawStreamMsg | None, window: list[tuple[int, bytes]]) -> BackfillResult:
    before_data = before.data if before is not None else None
    before_seq = _seq(before) if before is not None else None
    return BackfillResult(
        before_data, before_seq, [d for _, d in window], window[-1][0] if window else None
    )


def _seq(msg: RawStreamMsg) -> int:
    return decode_tick_seq(msg.data or b"")


def _at_or_after(msg: RawStreamMsg, since: datetime) -> bool:
    return msg.time is not None and msg.time >= since


async def _search(
    js: JetStreamContext,
    subject: str,
    first: int,
    last: int,
    reached: Callable[[RawStreamMsg], bool],
) -> tuple[int, RawStreamMsg | None]:
    """Smallest stream seq ``x`` whose next ``subject`` message satisfies ``reached`` (or
    ``last + 1``), and the subject's message just before it (``None`` at the start)."""
    lo, hi = first, last + 1
    before: RawStreamMsg | None = None
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            msg = await js.get_msg(TICKS_STREAM, seq=mid, subject=subject, direct=True, next=True)
        except nats.js.errors.NotFoundError:
            hi = mid  # no message of the subject at or after mid
            continue
        if reached(msg):
            hi = mid
        else:
            # every x in [mid, msg.seq] has this same next message: skip past it
            before = msg
            lo = (msg.seq or mid) + 1
    return lo, before


async def _open_tail(
    js: JetStreamContext, subject: str, lo: int, last: int, n: int, in_range: int
) -> tuple[str, int]:
    """A consumer from which at least ``n + 1`` messages of the range remain (or the whole
    range, when it is shorter); returns its name and pending count.

    Starts from a guess by the subject's density and widens or narrows by the counts
    JetStream reports, a handful of probes at most; reading too many is only slower,
    reading too few would be wrong, so it falls back to a wider start, never a narrower.
    """
    want = n + 1
    start = lo
    if in_range > 2 * want:
        density = in_range / max(1, last - lo + 1)
        start = max(lo, last - math.ceil(want * 1.25 / density) + 1)
    spare: tuple[str, int] | None = None  # an open consumer with enough, but many, messages
    for _ in range(_PROBES):
        name, pending = await _create(js, subject, start)
        enough = pending >= want or start == lo
        if enough and pending <= 4 * want:
            if spare is not None:
                await _close(js, spare[0])
            return name, pending
        if enough:  # too many to read comfortably: keep it, try a later start
            if spare is not None:
                await _close(js, spare[0])
            spare = (name, pending)
            span = (last - start + 1) * want * 1.25 / pending
            start = min(last, max(start + 1, last - math.ceil(span) + 1))
        else:  # too few: start earlier
            await _close(js, name)
            span = (last - start + 1) * max(2.0, want * 1.5 / max(pending, 1))
            start = max(lo, last - math.ceil(span) + 1)
    if spare is not None:
        return spare
    return await _create(js, subject, lo)


async def _create(js: JetStreamContext, subject: str, start: int) -> tuple[str, int]:
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=max(1, start),
        filter_subject=subject,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=30.0,  # cleaned up by the server if we die mid-read
        mem_storage=True,
        num_replicas=1,
    )
    info = await js.add_consumer(TICKS_STREAM, config)
    return info.name, info.num_pending or 0


async def _drain(
    js: JetStreamContext,
    consumer: str,
    pending: int,
    window: deque[tuple[int, bytes]],
    seen_seq: int,
) -> None:
    """Read the ``pending`` messages the consumer had when created, and on up to ``seen_seq``.

    Messages stored after the consumer was created need not be read: the client's live
    subscription was registered before that, so they are in its hand-over buffer. Under a
    fast feed this keeps the read bounded instead of chasing the stream's tail.
    """
    sub = await js.pull_subscribe_bind(consumer=consumer, stream=TICKS_STREAM)
    last_seq = -1
    read = 0
    try:
        while read < pending or last_seq < seen_seq:
            try:
                msgs = await sub.fetch(min(_FETCH_BATCH, max(1, pending - read)), _TAIL_WAIT_S)
            except TimeoutError:
                return  # nothing more stored (a tick the hub saw was never stored)
            for msg in msgs:
                read += 1
                try:
                    seq = decode_tick_seq(msg.data)
                except msgspec.DecodeError:  # includes ValidationError
                    metrics.BAD_TICKS.labels(path="backfill").inc()
                    throttle.emit(log.error, "unreadable_tick_in_stream", subject=msg.subject)
                    continue
                if seq > last_seq:  # per subject the stream is in seq order; be defensive
                    window.append((seq, msg.data))
                    last_seq = seq
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()


async def _close(js: JetStreamContext, consumer: str) -> None:
    with contextlib.suppress(nats.errors.Error, TimeoutError):
        await js.delete_consumer(TICKS_STREAM, consumer)
