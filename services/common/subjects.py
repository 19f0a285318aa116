"""Subject and stream names (DESIGN §2) and the product → shard routing every service agrees on."""

from __future__ import annotations

import zlib
from functools import lru_cache

RAW_STREAM = "MD_RAW"
TICKS_STREAM = "MD_TICKS"
DLQ_STREAM = "MD_DLQ"

RAW_PREFIX = "md.raw.coinbase."
TICKS_PREFIX = "md.ticks."
DLQ_PREFIX = "md.dlq."

RAW_WILDCARD = "md.raw.>"
TICKS_WILDCARD = "md.ticks.>"
DLQ_WILDCARD = "md.dlq.>"

HDR_MSG_ID = "Nats-Msg-Id"
HDR_RECV_NS = "Ledgerflux-Recv-Ns"
HDR_DLQ_REASON = "Ledgerflux-Dlq-Reason"
HDR_DLQ_ERROR = "Ledgerflux-Dlq-Error"
HDR_DLQ_SUBJECT = "Ledgerflux-Dlq-Subject"
HDR_RESYNC = "Ledgerflux-Resync"


@lru_cache(maxsize=65_536)
def shard_of(product: str, num_shards: int) -> int:
    """``zlib.crc32(product) % NUM_SHARDS``: anyone can compute where a product lives."""
    return zlib.crc32(product.encode()) % num_shards


@lru_cache(maxsize=65_536)
def raw_subject(product: str) -> str:
    return RAW_PREFIX + product


@lru_cache(maxsize=65_536)
def tick_subject(product: str, num_shards: int) -> str:
    return f"{TICKS_PREFIX}{shard_of(product, num_shards)}.{product}"


def dlq_subject(reason: str) -> str:
    return DLQ_PREFIX + reason


def product_of_raw(subject: str) -> str | None:
    """The product of an ``md.raw.coinbase.<product>`` subject, or ``None``."""
    if not subject.startswith(RAW_PREFIX):
        return None
    return subject[len(RAW_PREFIX) :] or None


def product_of_tick(subject: str) -> str | None:
    """The product of an ``md.ticks.<shard>.<product>`` subject, or ``None``."""
    parts = subject.split(".", 3)
    return parts[3] if len(parts) == 4 and parts[3] else None


def is_valid_product(product: str) -> bool:
    """A product id usable as one subject token (``BTC-USD``): no dots, spaces or wildcards."""
    return 0 < len(product) <= 64 and not any(c in product for c in ". *>\t\r\n")


def tick_filters(owned_shards: frozenset[int], num_shards: int) -> list[str]:
    """The MD_TICKS filter subjects of a replica owning ``owned_shards``.

    One wildcard when it owns every shard: nats-server serves a consumer with several filter
    subjects ~15x slower (3.4k vs 55k msgs/s fetched here, 4 filters vs ``md.ticks.>``).
    """
    if owned_shards >= frozenset(range(num_shards)):
        return [TICKS_WILDCARD]
    return [f"{TICKS_PREFIX}{s}.>" for s in sorted(owned_shards)]
