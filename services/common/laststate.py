"""The newest tick per product as stored in MD_TICKS (last message per subject).

Used to recover the normalizer's per-product order after a restart and to warm the
gateway's snapshot cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import nats.js.errors
from nats.js import JetStreamContext

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
            data = msg.data or b""
            try:
                tick = decode_tick(data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.error("unreadable_tick_in_stream", subject=subject, stream_seq=msg.seq)
                continue
            last[product] = StoredTick(tick, data, msg.seq or 0)
    return last
