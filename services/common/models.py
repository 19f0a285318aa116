"""The canonical tick (DESIGN §3): the one shape on ``md.ticks.*``, to clients and in snapshots.

Prices and sizes are exact decimal strings end to end; they are never parsed into floats.
"""

from __future__ import annotations

from typing import Literal

import msgspec

Side = Literal["buy", "sell"]


class Tick(msgspec.Struct, kw_only=True, tag_field="type", tag="tick"):
    """One normalized ticker update of one product.

    ``resync`` is present (``true``) only on ticks rebuilt from the REST ticker after a
    gap or reconnect; ``skipped`` only on ticks a gateway sends after conflating older
    ones. Both are omitted from the JSON otherwise.
    """

    v: int = 1
    exchange: str = "coinbase"
    product: str
    seq: int
    trade_id: int | None
    time: str
    recv_ns: int
    price: str
    size: str | None
    side: Side | None
    bid: str | None
    bid_size: str | None
    ask: str | None
    ask_size: str | None
    open_24h: str | None
    high_24h: str | None
    low_24h: str | None
    volume_24h: str | None
    resync: bool | msgspec.UnsetType = msgspec.UNSET
    skipped: int | msgspec.UnsetType = msgspec.UNSET


# Coinbase's decimal strings, carried into ticks byte for byte: digits with an optional
# fraction, no sign or exponent (the normalizer's and the ingestor's REST check)
DECIMAL_PATTERN = r"[0-9]+(?:\.[0-9]+)?"

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Tick)


def encode_tick(tick: Tick) -> bytes:
    """JSON bytes of a tick, in the field order of DESIGN §3."""
    return _encoder.encode(tick)


class _SeqOnly(msgspec.Struct):
    seq: int


_seq_decoder = msgspec.json.Decoder(_SeqOnly)


def decode_tick_seq(data: bytes | str) -> int:
    """Only a tick's ``seq`` (msgspec skips the rest in C: the cheap read for ordering);
    raises ``msgspec.DecodeError`` (``ValidationError`` included) like :func:`decode_tick`."""
    try:
        return _seq_decoder.decode(data).seq
    except RecursionError:  # nested past msgspec's depth limit (in a field it skips)
        raise msgspec.DecodeError("JSON nested too deeply") from None


def decode_tick(data: bytes | str) -> Tick:
    """Parse and type-check a tick; raises ``msgspec.ValidationError``/``DecodeError``."""
    try:
        return _decoder.decode(data)
    except RecursionError:  # nested past msgspec's depth limit (in a field it skips)
        raise msgspec.DecodeError("JSON nested too deeply") from None
