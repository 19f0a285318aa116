"""Coinbase Exchange WS feed protocol: server message shapes and client command parsing.

Message structs encode with msgspec in the key order seen in real traffic (see
/work/shared/coinbase-protocol.md §1). Prices, sizes and volumes are decimal strings;
``sequence`` and ``trade_id`` are integers.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

# Channels that need an authenticated subscribe on ws-feed (Exchange docs, 2023 change).
AUTH_CHANNELS = frozenset({"level2", "level3", "full", "user", "rfq_matches"})
# Observed reason text (cryptofeed#990); the real text continues with a docs pointer.
AUTH_REASON = "level2, level3, and full channels now require authentication"
PRODUCT_CHANNELS = frozenset({"ticker", "heartbeat", "matches"})
GLOBAL_CHANNELS = frozenset({"status"})  # no product ids needed


class Ticker(msgspec.Struct, tag_field="type", tag="ticker", gc=False):
    sequence: int
    product_id: str
    price: str
    open_24h: str
    volume_24h: str
    low_24h: str
    high_24h: str
    volume_30d: str
    best_bid: str
    best_bid_size: str
    best_ask: str
    best_ask_size: str
    side: str  # TAKER side
    time: str
    trade_id: int
    last_size: str


class Heartbeat(msgspec.Struct, tag_field="type", tag="heartbeat", gc=False):
    last_trade_id: int
    product_id: str
    sequence: int
    time: str


class Match(msgspec.Struct, tag_field="type", tag="match", gc=False):
    trade_id: int
    maker_order_id: str
    taker_order_id: str
    side: str  # MAKER side: the opposite of the ticker's taker side
    size: str
    price: str
    product_id: str
    sequence: int
    time: str


class LastMatch(Match, tag="last_match", gc=False):
    pass


class SubscribedChannel(msgspec.Struct, gc=False):
    name: str
    product_ids: list[str]


class Subscriptions(msgspec.Struct, tag_field="type", tag="subscriptions", gc=False):
    channels: list[SubscribedChannel]


class Error(msgspec.Struct, tag_field="type", tag="error", omit_defaults=True, gc=False):
    message: str
    reason: str | None = None


class StatusProduct(msgspec.Struct, gc=False):
    id: str
    base_currency: str
    quote_currency: str
    base_increment: str
    quote_increment: str
    display_name: str
    status: str
    status_message: str
    min_market_funds: str
    post_only: bool
    limit_only: bool
    cancel_only: bool
    auction_mode: bool
    type: str


class StatusCurrency(msgspec.Struct, gc=False):
    id: str
    name: str
    status: str
    status_message: str


class Status(msgspec.Struct, tag_field="type", tag="status", gc=False):
    products: list[StatusProduct]
    currencies: list[StatusCurrency]


encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def error_frame(message: str, reason: str | None = None) -> bytes:
    return encode(Error(message=message, reason=reason))


def subscriptions_frame(subs: dict[str, dict[str, None]]) -> bytes:
    """The cumulative ``subscriptions`` reply: every channel still subscribed, in order."""
    return encode(
        Subscriptions(channels=[SubscribedChannel(name, list(p)) for name, p in subs.items()])
    )


Item = tuple[str, str | None]  # (channel, product id), product None = global/whole channel


@dataclass(slots=True)
class Command:
    """A parsed client message: what to add or remove, and the errors to report."""

    kind: Literal["subscribe", "unsubscribe"] | None
    items: list[Item] = field(default_factory=list)
    errors: list[bytes] = field(default_factory=list)


def _str_list(value: Any) -> list[str] | None:
    if value is None:
        return []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def parse_command(
    raw: str | bytes, *, valid_products: Collection[str], allowed_channels: Collection[str]
) -> Command:
    """Parse one client frame into subscription changes plus Coinbase-style errors.

    Invalid parts of a request (unknown product or channel, auth-only channel) each
    produce one ``error`` while the valid parts still apply.
    """
    try:
        msg = _decode(raw)
    except (msgspec.DecodeError, RecursionError):  # "[[[[..." nests past the parser's limit
        return Command(None, errors=[error_frame("Malformed JSON")])
    if not isinstance(msg, dict):
        return Command(None, errors=[error_frame("Malformed JSON", "expected a JSON object")])
    kind = msg.get("type")
    if kind not in ("subscribe", "unsubscribe"):
        reason = f"{kind} is not a valid message type" if isinstance(kind, str) else None
        return Command(None, errors=[error_frame("Failed to subscribe", reason or "type missing")])
    failed = f"Failed to {kind}"
    cmd = Command(kind)
    errors: dict[bytes, None] = {}  # dedupe, keep order

    def fail(reason: str) -> None:
        errors[error_frame(failed, reason)] = None

    root = _str_list(msg.get("product_ids"))
    if root is None:
        return Command(kind, errors=[error_frame(failed, "product_ids must be a list of strings")])
    channels = msg.get("channels")
    if channels is None and kind == "unsubscribe" and root:
        # Products without channels: drop those products from every channel.
        channels = [c for c in allowed_channels if c in PRODUCT_CHANNELS]
    if not channels:
        return Command(kind, errors=[error_frame(failed, "No channels provided")])
    if not isinstance(channels, list):
        return Command(kind, errors=[error_frame(failed, "channels must be a list")])

    for entry in channels:
        if isinstance(entry, str):
            name, products = entry, root
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            name = entry["name"]
            own = _str_list(entry.get("product_ids"))
            if own is None:
                fail(f"product_ids of channel {name} must be a list of strings")
                continue
            products = own if "product_ids" in entry else root
        else:
            fail("each channel must be a name or an object with a name")
            continue
        if name in AUTH_CHANNELS:
            fail(AUTH_REASON)
            continue
        if name not in allowed_channels:
            fail(f"{name} is not a valid channel")
            continue
        if name in GLOBAL_CHANNELS:
            cmd.items.append((name, None))
            continue
        if not products:
            if kind == "unsubscribe":
                cmd.items.append((name, None))  # omitting product ids drops the whole channel
            else:
                fail(f"You need to specify at least one product ID for channel {name}")
            continue
        for product in products:
            if product in valid_products:
                cmd.items.append((name, product))
            else:
                fail(f"{product} is not a valid product")
    cmd.errors = list(errors)
    return cmd
