"""``--replay FILE.jsonl``: load recorded Coinbase messages and play them back paced.

Each line is either a raw Coinbase ws message or ``{"recv_ns": int, "msg": {...}}``
(the ingestor's capture format; our ``--emit-log`` also uses it). Messages go to the
subscribers of their channel and product: ``ticker`` -> ticker, ``heartbeat`` ->
heartbeat, ``match``/``last_match`` -> matches, ``status`` -> status; other types
(subscriptions, error, l2update...) are counted as skipped.

Pacing uses ``recv_ns`` when present, else the message's ``time``; messages without
either go out right after the previous one. ``speed`` 1 is real time, 10 ten times
faster, ``inf`` (CLI ``max``) as fast as the clients drain.

The file is loaded whole at start-up (fixtures and recordings, not archives), so a bad
file fails the start with its line number instead of half-way through a run.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from services.feedsim.errors import ReplayFileError

CHANNEL_OF_TYPE = {
    "ticker": "ticker",
    "heartbeat": "heartbeat",
    "match": "matches",
    "last_match": "matches",
    "status": "status",
}
YIELD_EVERY = 512  # unpaced: flush and yield to the loop every N messages
DRAIN_WAIT_S = 10.0  # max speed: wait at most this long for a client's backlog to drain


@dataclass(frozen=True, slots=True)
class ReplayItem:
    at_ns: int | None
    channel: str
    product_id: str | None
    frame: bytes
    repeat: int


@dataclass(frozen=True, slots=True)
class ReplayData:
    path: Path
    items: list[ReplayItem]
    products: list[str]
    skipped: int


def parse_time_ns(value: Any) -> int | None:
    """RFC 3339 ``...T12:09:26.296459Z`` (up to 9 fraction digits) -> epoch ns."""
    if not isinstance(value, str) or len(value) < 20:
        return None
    head, _, rest = value.partition(".")
    digits = rest.removesuffix("Z")
    if rest and not (rest.endswith("Z") and digits.isdigit()):
        return None
    try:
        base = datetime.fromisoformat(head + "+00:00" if rest else value)
    except ValueError:
        return None
    frac = int((digits + "000000000")[:9]) if rest else 0
    return int(base.timestamp()) * 1_000_000_000 + frac


def _item(line: bytes, obj: dict[str, Any], lineno: int, path: Path) -> ReplayItem | None:
    if "msg" in obj and "recv_ns" in obj:
        msg, at_ns, repeat = obj["msg"], obj["recv_ns"], obj.get("sent", 1)
        if not isinstance(msg, dict) or not isinstance(at_ns, int):
            raise ReplayFileError(path, "recv_ns must be an integer and msg an object", lineno)
        if not isinstance(repeat, int) or repeat < 0:
            raise ReplayFileError(path, "sent must be a non-negative integer", lineno)
        frame = orjson.dumps(msg)
    else:
        msg, at_ns, repeat, frame = obj, None, 1, line
    kind = msg.get("type")
    channel = CHANNEL_OF_TYPE.get(kind) if isinstance(kind, str) else None
    product = msg.get("product_id")
    if channel is None or repeat == 0:
        return None
    if channel != "status" and not isinstance(product, str):
        return None
    if at_ns is None:
        at_ns = parse_time_ns(msg.get("time"))
    return ReplayItem(at_ns, channel, product if isinstance(product, str) else None, frame, repeat)


def load_replay(path: Path) -> ReplayData:
    """Read and validate a replay file (blocking: call it from a worker thread)."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise ReplayFileError(path, exc.strerror or str(exc)) from None
    items: list[ReplayItem] = []
    products: dict[str, None] = {}
    skipped = 0
    with handle:
        try:
            for lineno, raw in enumerate(handle, 1):
                line = raw.strip()
                if not line:
                    continue
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise ReplayFileError(path, f"not JSON ({exc})", lineno) from None
                if not isinstance(obj, dict):
                    raise ReplayFileError(path, "expected a JSON object per line", lineno)
                item = _item(line, obj, lineno, path)
                if item is None:
                    skipped += 1
                    continue
                items.append(item)
                if item.product_id is not None:
                    products[item.product_id] = None
        except OSError as exc:
            raise ReplayFileError(path, exc.strerror or str(exc)) from None
    if not items:
        raise ReplayFileError(path, "no replayable message (ticker, heartbeat, match, status)")
    return ReplayData(path, items, list(products), skipped)


class Replayer:
    """Plays ``ReplayData`` through ``deliver``; ``flush`` pushes a batch to clients."""

    def __init__(
        self,
        data: ReplayData,
        *,
        speed: float,
        deliver: Callable[[ReplayItem], None],
        flush: Callable[[], None],
        backlog: Callable[[], int],
        max_backlog: int,
    ) -> None:
        self.data = data
        self.speed = speed
        self._deliver = deliver
        self._flush = flush
        self._backlog = backlog
        self._max_backlog = max_backlog
        self.sent = 0
        self.passes = 0

    async def play(self) -> None:
        """One pass over the file."""
        loop = asyncio.get_running_loop()
        paced = math.isfinite(self.speed)
        items = self.data.items
        t0 = next((i.at_ns for i in items if i.at_ns is not None), None)
        start = loop.time()
        for n, item in enumerate(items):
            if paced and item.at_ns is not None and t0 is not None:
                delay = start + (item.at_ns - t0) / 1e9 / self.speed - loop.time()
                if delay > 0.0005:
                    self._flush()
                    await asyncio.sleep(delay)
            if n % YIELD_EVERY == YIELD_EVERY - 1:
                self._flush()
                await self._drain()
            self._deliver(item)
            self.sent += 1
        self._flush()
        self.passes += 1

    async def _drain(self) -> None:
        # Unpaced replay would otherwise outrun every client and get them dropped as slow.
        deadline = time.monotonic() + DRAIN_WAIT_S
        await asyncio.sleep(0)
        # No event fires when a transport drains below a mark (websockets keeps its
        # drain waiter private), so poll the backlog briefly.
        while self._backlog() > self._max_backlog and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
