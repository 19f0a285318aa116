"""The newest tick per product as stored in MD_TICKS (last message per subject).

Used to recover the normalizer's per-product order after a restart and to warm the
gateway's snapshot cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import nats.js.errors
from nats.js import JetStreamContext

from services.common import metrics
from services.common.logging import get_logger
from services.common.models import Tick, decode_tick
from services.common.subjects import TICKS_PREFIX, TICKS_STREAM, product_of_tick

log = get_logger(__name__)


@dataclass(slots=True, frozen=True)
class StoredTick:
    tick: Tick
    data: bytes
    stream_seq: int


async def load_last_ticks(
    js: JetStreamContext, shards: frozenset[int] | None = None
) -> dict[str, StoredTick]:
    """Last tick of every product in MD_TICKS, for ``shards`` (all when ``None``)."""
    filters = (
        [f"{TICKS_PREFIX}>"] if shards is None else [f"{TICKS_PREFIX}{s}.>" for s in sorted(shards)]
    )
    last: dict[str, StoredTick] = {}
    for subject_filter in filters:
        try:
            info = await js.stream_info(TICKS_STREAM, subjects_filter=subject_filter)
        except nats.js.errors.NotFoundError:
            return last
        for subject in info.state.subjects or {}:
            product = product_of_tick(subject)
            if product is None:
                continue
            try:
                msg = await js.get_last_msg(TICKS_STREAM, subject)
            except nats.js.errors.NotFoundError:
                continue
            stored = _readable(msg.data or b"", msg.seq or 0, subject)
            if stored is None:
                # the newest message is not a tick: the one before it is the product's last
                # tick (dropping the product lost its seq for the normalizer's order)
                stored = await _newest_readable_before(js, subject, msg.seq or 0)
            if stored is not None:
                last[product] = stored
    return last


def _readable(data: bytes, stream_seq: int, subject: str) -> StoredTick | None:
    """The tick, if ``data`` is one and of the subject's product (its subject decides whose
    state it becomes: a tick of another product there is as unreadable as garbage)."""
    try:
        tick = decode_tick(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        tick = None
    if tick is None or tick.product != product_of_tick(subject):
        metrics.UNREADABLE_TICKS.inc()
        log.error("unreadable_tick_in_stream", subject=subject, stream_seq=stream_seq)
        return None
    return StoredTick(tick, data, stream_seq)


_MAX_LOOKUPS = 1000  # messages read back per product before giving up (logged)


async def _newest_readable_before(
    js: JetStreamContext, subject: str, before: int
) -> StoredTick | None:
    """The newest readable tick on ``subject`` below stream sequence ``before``.

    JetStream can fetch the next message of a subject from a sequence, not the previous
    one: windows below ``before`` that grow fourfold are read forward until one holds a
    readable tick, whose newest is the answer."""
    high, width, lookups = before, 16, 0
    while high > 1 and lookups < _MAX_LOOKUPS:
        low = max(1, high - width)
        found, seq = None, low
        while seq < high and lookups < _MAX_LOOKUPS:
            lookups += 1
            try:
                msg = await js.get_msg(TICKS_STREAM, seq=seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                break
            if msg.seq is None or msg.seq >= high:
                break
            found = _readable(msg.data or b"", msg.seq, subject) or found
            seq = msg.seq + 1
        if found is not None:
            return found
        high, width = low, width * 4
    if high > 1:
        log.error("no_readable_tick_found", subject=subject, below=before, lookups=lookups)
    return None
