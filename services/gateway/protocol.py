"""The client protocol of DESIGN §8: commands in, messages out.

Commands are decoded with msgspec into typed structs; anything that does not fit is a
``bad_request`` naming what is wrong. Outbound messages are encoded here once; tick
bytes are spliced into them as stored, never re-encoded.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal

import msgspec

# WebSocket close codes (DESIGN §8)
CLOSE_GOING_AWAY = 1001
CLOSE_ABNORMAL = 1006  # recorded, never sent: the socket went without a close frame
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN = 1013
CLOSE_SLOW_CONSUMER = 4008
CLOSE_UNAUTHORIZED = 4401

ErrorCode = Literal[
    "bad_request",
    "unknown_product",
    "rate_limited",
    "too_many_subscriptions",
    "unauthorized",
    "backfill_unavailable",
]


class Backfill(msgspec.Struct, forbid_unknown_fields=True):
    last: Annotated[int, msgspec.Meta(ge=1)] | None = None
    since_seq: Annotated[int, msgspec.Meta(ge=0)] | None = None
    since_time: str | None = None


class Subscribe(msgspec.Struct, tag_field="op", tag="subscribe", forbid_unknown_fields=True):
    products: list[str]
    snapshot: bool = True
    backfill: Backfill | None = None
    id: str | int | None = None


class Unsubscribe(msgspec.Struct, tag_field="op", tag="unsubscribe", forbid_unknown_fields=True):
    products: list[str]
    id: str | int | None = None


class Ping(msgspec.Struct, tag_field="op", tag="ping", forbid_unknown_fields=True):
    id: str | int | None = None


Command = Subscribe | Unsubscribe | Ping

_command_decoder = msgspec.json.Decoder(Command)
_encoder = msgspec.json.Encoder()


class _IdOnly(msgspec.Struct):
    id: object = None


_id_decoder = msgspec.json.Decoder(_IdOnly)


class BadCommandError(ValueError):
    def __init__(self, message: str, request_id: str | int | None) -> None:
        self.request_id = request_id
        super().__init__(message)


def decode_command(data: bytes | str) -> Command:
    try:
        command: Command = _command_decoder.decode(data)
    except msgspec.ValidationError as exc:  # a DecodeError subclass: test it first
        raise BadCommandError(str(exc), request_id_of(data)) from None
    except msgspec.DecodeError as exc:
        raise BadCommandError(f"invalid JSON: {exc}", None) from None
    except UnicodeDecodeError:  # a binary frame: msgspec decodes its strings as UTF-8
        raise BadCommandError("invalid JSON: a string is not UTF-8", None) from None
    except RecursionError:  # "[[[[…" inside an unknown field: past msgspec's depth limit
        raise BadCommandError("invalid JSON: nested too deeply", None) from None
    if not isinstance(command, Ping):
        # product ids are case-insensitive, as in the REST paths; replies use the canonical
        # (upper-case, as Coinbase spells them) id
        command.products = [product.upper() for product in command.products]
    return command


def request_id_of(data: bytes | str) -> str | int | None:
    """The ``id`` of a frame that did not decode as a command (or was not read: a
    rate-limited one), if it is of an accepted type, for the error reply."""
    try:
        found = _id_decoder.decode(data).id
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
        return None
    return found if isinstance(found, str | int) else None


# RFC 3339 date-time: seconds required, a zone required, no week dates or basic format
# (all of which datetime.fromisoformat accepts)
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})"
)


@dataclass(frozen=True, slots=True)
class BackfillSpec:
    """One validated backfill request: exactly one of its three forms."""

    last: int | None = None
    since_seq: int | None = None
    since_time: datetime | None = None

    @property
    def form(self) -> str:
        if self.last is not None:
            return "last"
        return "since_seq" if self.since_seq is not None else "since_time"


def backfill_spec(backfill: Backfill, request_id: str | int | None) -> BackfillSpec:
    """Exactly one of ``last``/``since_seq``/``since_time``; the time is RFC 3339 with a zone."""
    given = [
        name for name in ("last", "since_seq", "since_time") if getattr(backfill, name) is not None
    ]
    if len(given) != 1:
        raise BadCommandError(
            "backfill needs exactly one of last, since_seq, since_time", request_id
        )
    if backfill.since_time is None:
        return BackfillSpec(last=backfill.last, since_seq=backfill.since_seq)
    when = None
    if _RFC3339.fullmatch(backfill.since_time):
        with contextlib.suppress(ValueError):  # the pattern passes a 31st of February
            when = datetime.fromisoformat(backfill.since_time)
    if when is None:
        raise BadCommandError(
            f"since_time must be RFC 3339 with a zone, got {backfill.since_time!r}", request_id
        )
    return BackfillSpec(since_time=when)


def encode(message: dict[str, object]) -> bytes:
    return _encoder.encode(message)


def error(code: ErrorCode, message: str, request_id: object = None) -> bytes:
    return encode({"type": "error", "code": code, "message": message, "id": request_id})


def snapshot_message(product: str, tick_data: bytes | None) -> bytes:
    return b'{"type":"snapshot","product":%b,"tick":%b}' % (
        _encoder.encode(product),
        tick_data if tick_data is not None else b"null",
    )


def backfill_message(product: str, ticks: Sequence[bytes], done: bool) -> bytes:
    """A backfill chunk; the stored tick bytes are joined as they are, not re-encoded."""
    return b'{"type":"backfill","product":%b,"ticks":[%b],"done":%b}' % (
        _encoder.encode(product),
        b",".join(ticks),
        b"true" if done else b"false",
    )
