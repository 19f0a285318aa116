"""Coinbase Exchange frames for tests, shaped like real ones (coinbase-protocol.md §1)."""

from __future__ import annotations

import orjson


def ticker(
    product: str,
    sequence: int,
    *,
    price: str = "91234.56",
    trade_id: int | None = None,
    side: str = "buy",
    best_bid: str = "91234.55",
    best_ask: str = "91234.57",
    time: str = "2026-11-28T15:00:00.123456Z",
) -> bytes:
    return orjson.dumps(
        {
            "type": "ticker",
            "sequence": sequence,
            "product_id": product,
            "price": price,
            "open_24h": "90000.00",
            "volume_24h": "12345.67890000",
            "low_24h": "89000.00",
            "high_24h": "92000.00",
            "volume_30d": "345678.12345678",
            "best_bid": best_bid,
            "best_bid_size": "0.50000000",
            "best_ask": best_ask,
            "best_ask_size": "0.30000000",
            "side": side,
            "time": time,
            "trade_id": trade_id if trade_id is not None else sequence // 10,
            "last_size": "0.00120000",
        }
    )


def heartbeat(product: str, sequence: int, last_trade_id: int) -> bytes:
    return orjson.dumps(
        {
            "type": "heartbeat",
            "last_trade_id": last_trade_id,
            "product_id": product,
            "sequence": sequence,
            "time": "2026-11-28T15:00:01.000001Z",
        }
    )
