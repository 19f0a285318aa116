"""Raw Coinbase frame → canonical tick: decode (msgspec, compiled), validate, convert.

One ``msgspec`` decode of a tagged union does the JSON parse and the type checks in C;
what is left in Python is the few checks JSON types cannot express (decimal syntax,
price > 0, bid ≤ ask, RFC 3339 time, product = subject).
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from functools import partial
from operator import is_not
from typing import Any, cast

import msgspec

from services.common.models import DECIMAL_PATTERN, Tick
from services.normalizer.errors import (
    BadDecimalError,
    BadTimeError,
    BadValueError,
    ProductMismatchError,
    SchemaError,
    UnparseableError,
    UnsupportedTypeError,
)

DECIMAL_RE = re.compile(DECIMAL_PATTERN)
# All decimal fields of a ticker joined by "," and checked by one regex call: ten separate
# checks cost several times more in Python (measured in bench/normalize.py). Possessive
# quantifiers (the grammar never needs to backtrack) halve the regex's time.
_DECIMAL = r"[0-9]++(?:\.[0-9]++)?+"
_DECIMALS_RE = re.compile(rf"{_DECIMAL}(?:,{_DECIMAL})*+")
# The usual ticker has all ten: one f-string of the fields (None would read "None" and fail)
# instead of filtering and joining them, ~2 µs less per frame.
_ALL_TEN_DECIMALS_RE = re.compile(rf"{_DECIMAL}(?:,{_DECIMAL}){{9}}")
Dec = str
_is_not_none = partial(is_not, None)


class CoinbaseTicker(msgspec.Struct, tag_field="type", tag="ticker"):
    product_id: str
    sequence: int
    price: Dec
    time: str
    trade_id: int | None = None
    last_size: Dec | None = None
    side: str | None = None
    best_bid: Dec | None = None
    best_bid_size: Dec | None = None
    best_ask: Dec | None = None
    best_ask_size: Dec | None = None
    open_24h: Dec | None = None
    high_24h: Dec | None = None
    low_24h: Dec | None = None
    volume_24h: Dec | None = None


class CoinbaseHeartbeat(msgspec.Struct, tag_field="type", tag="heartbeat"):
    product_id: str
    sequence: int
    last_trade_id: int
    time: str


class CoinbaseMatch(msgspec.Struct, tag_field="type", tag="match"):
    product_id: str
    sequence: int


class CoinbaseLastMatch(msgspec.Struct, tag_field="type", tag="last_match"):
    product_id: str
    sequence: int


Frame = CoinbaseTicker | CoinbaseHeartbeat | CoinbaseMatch | CoinbaseLastMatch

_decoder = msgspec.json.Decoder(Frame)


class _TypeOnly(msgspec.Struct):
    type: Any = None


_type_decoder = msgspec.json.Decoder(_TypeOnly)
_KNOWN_TYPES = frozenset({"ticker", "heartbeat", "match", "last_match"})


def decode_frame(data: bytes) -> Frame:
    """Parse a raw frame; raise a :class:`RejectedFrameError` naming the DLQ reason."""
    try:
        return cast(Frame, _decoder.decode(data))
    except msgspec.ValidationError as exc:
        raise _classify(data, exc) from None
    except msgspec.DecodeError as exc:
        raise UnparseableError(str(exc)) from None
    except RecursionError:  # nested past msgspec's depth limit: a poison message otherwise
        raise UnparseableError("JSON nested too deeply") from None


def _classify(data: bytes, exc: msgspec.ValidationError) -> Exception:
    try:
        kind = _type_decoder.decode(data).type
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return UnparseableError("not a JSON object")
    if isinstance(kind, str) and kind not in _KNOWN_TYPES:
        return UnsupportedTypeError(f"message type {kind!r} is not normalized")
    return SchemaError(str(exc))


def _check_decimals(msg: CoinbaseTicker) -> None:
    if _ALL_TEN_DECIMALS_RE.fullmatch(
        f"{msg.price},{msg.last_size},{msg.best_bid},{msg.best_bid_size},{msg.best_ask},"
        f"{msg.best_ask_size},{msg.open_24h},{msg.high_24h},{msg.low_24h},{msg.volume_24h}"
    ):
        return  # exactly ten values (a comma inside one would make eleven), all decimals
    values: list[str] = list(filter(_is_not_none, (  # type: ignore[arg-type]
        msg.price, msg.last_size, msg.best_bid, msg.best_bid_size, msg.best_ask,
        msg.best_ask_size, msg.open_24h, msg.high_24h, msg.low_24h, msg.volume_24h,
    )))  # fmt: skip
    joined = ",".join(values)
    # the comma count proves no value smuggled in a separator of its own ("1,285.22")
    if joined.count(",") == len(values) - 1 and _DECIMALS_RE.fullmatch(joined):
        return
    for name in _DECIMAL_FIELDS:  # slow path: name the culprit
        value = getattr(msg, name)
        if value is not None and DECIMAL_RE.fullmatch(value) is None:
            raise BadDecimalError(f"{name}={value!r} is not a decimal string")
    raise BadDecimalError("empty decimal string")


_DECIMAL_FIELDS = (
    "price", "last_size", "best_bid", "best_bid_size", "best_ask", "best_ask_size",
    "open_24h", "high_24h", "low_24h", "volume_24h",
)  # fmt: skip


def _above(a: str, b: str) -> bool:
    """Exact ``a > b`` for decimal strings. Rounding to float is monotonic, so only equal
    floats need the (ten times slower) Decimal comparison."""
    fa, fb = float(a), float(b)
    if fa != fb:
        return fa > fb
    return Decimal(a) > Decimal(b)


def check_time(value: str) -> None:
    """RFC 3339 with a time zone (``2022-10-19T23:28:22.061769Z``)."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise BadTimeError(f"time={value!r} is not RFC 3339") from None
    if parsed.tzinfo is None or len(value) < 20 or value[10] not in "Tt":
        raise BadTimeError(f"time={value!r} is not RFC 3339 with a time zone")


def check_ticker(msg: CoinbaseTicker, subject_product: str) -> None:
    """Raise a :class:`RejectedFrameError` unless the ticker is a valid canonical tick."""
    if msg.product_id != subject_product:
        raise ProductMismatchError(
            f"product_id={msg.product_id!r} on the subject of {subject_product!r}"
        )
    if msg.sequence < 0:
        raise BadValueError(f"sequence={msg.sequence} is negative")
    _check_decimals(msg)
    price = msg.price
    if not price.strip("0."):
        raise BadValueError(f"price={price!r} is not positive")
    side = msg.side
    if side is not None and side != "buy" and side != "sell":
        raise BadValueError(f"side={side!r} is neither buy nor sell")
    bid, ask = msg.best_bid, msg.best_ask
    if bid is not None and ask is not None and _above(bid, ask):
        raise BadValueError(f"best_bid={bid} is above best_ask={ask}")
    check_time(msg.time)


def ticker_to_tick(
    msg: CoinbaseTicker, subject_product: str, recv_ns: int, *, resync: bool = False
) -> Tick:
    """Validate a decoded ticker and build the canonical tick, decimals untouched."""
    check_ticker(msg, subject_product)
    return Tick(
        product=msg.product_id,
        seq=msg.sequence,
        trade_id=msg.trade_id,
        time=msg.time,
        recv_ns=recv_ns,
        price=msg.price,
        size=msg.last_size,
        side=msg.side,  # type: ignore[arg-type]  # checked
        bid=msg.best_bid,
        bid_size=msg.best_bid_size,
        ask=msg.best_ask,
        ask_size=msg.best_ask_size,
        open_24h=msg.open_24h,
        high_24h=msg.high_24h,
        low_24h=msg.low_24h,
        volume_24h=msg.volume_24h,
        resync=True if resync else msgspec.UNSET,
    )


# The canonical tick with positional fields, for the hot path: msgspec matches Tick's
# nineteen keywords in ~2.3 µs a frame, positional arguments take ~0.7 µs. Derived from
# Tick (same tag, field names, order and types; ``skipped`` is only ever the gateway's), so
# both encode the same bytes, which tests/normalizer/test_decode.py checks.
_TICK_FIELDS = msgspec.structs.fields(Tick)
PositionalTick = msgspec.defstruct(
    "PositionalTick",
    [(f.name, f.type) for f in _TICK_FIELDS if f.name not in ("resync", "skipped")]
    + [("resync", bool | msgspec.UnsetType, msgspec.UNSET)],
    tag_field="type",
    tag="tick",
)
_VERSION, _EXCHANGE = (f.default for f in _TICK_FIELDS[:2])
_encode = msgspec.json.Encoder().encode


def encode_ticker(msg: CoinbaseTicker, recv_ns: int, *, resync: bool = False) -> bytes:
    """The canonical tick's JSON for a ticker that passed :func:`check_ticker`."""
    tick = PositionalTick(
        _VERSION, _EXCHANGE, msg.product_id, msg.sequence, msg.trade_id, msg.time, recv_ns,
        msg.price, msg.last_size, msg.side, msg.best_bid, msg.best_bid_size, msg.best_ask,
        msg.best_ask_size, msg.open_24h, msg.high_24h, msg.low_24h, msg.volume_24h,
        True if resync else msgspec.UNSET,
    )  # fmt: skip
    return _encode(tick)


def require_product(
    frame: CoinbaseHeartbeat | CoinbaseMatch | CoinbaseLastMatch, product: str
) -> None:
    if frame.product_id != product:
        raise ProductMismatchError(f"product_id={frame.product_id!r} on the subject of {product!r}")


__all__ = [
    "CoinbaseHeartbeat",
    "CoinbaseLastMatch",
    "CoinbaseMatch",
    "CoinbaseTicker",
    "Frame",
    "PositionalTick",
    "SchemaError",
    "check_ticker",
    "check_time",
    "decode_frame",
    "encode_ticker",
    "require_product",
    "ticker_to_tick",
]
