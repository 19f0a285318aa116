"""The client protocol of DESIGN §8: commands in, messages out.

Commands are decoded with msgspec into typed structs; anything that does not fit is a
``bad_request`` naming what is wrong. Outbound messages are encoded here once.
"""

from __future__ import annotations

from typing import Literal

import msgspec

ErrorCode = Literal[
    "bad_request",
    "unknown_product",
    "rate_limited",
    "too_many_subscriptions",
    "unauthorized",
    "backfill_unavailable",
]


class Backfill(msgspec.Struct, forbid_unknown_fields=True):
    last: int | None = None
    since_seq: int | None = None
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
    def __init__(self, message: str, request_id: object) -> None:
        self.request_id = request_id if isinstance(request_id, str | int) else None
        super().__init__(message)


def decode_command(data: bytes | str) -> Command:
    try:
        command: Command = _command_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise BadCommandError(f"invalid JSON: {exc}", None) from None
    except msgspec.ValidationError as exc:
        raise BadCommandError(str(exc), _request_id(data)) from None
    return command


def _request_id(data: bytes | str) -> object:
    try:
        return _id_decoder.decode(data).id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def encode(message: dict[str, object]) -> bytes:
    return _encoder.encode(message)


def error(code: ErrorCode, message: str, request_id: object = None) -> bytes:
    return encode({"type": "error", "code": code, "message": message, "id": request_id})
