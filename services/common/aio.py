"""Small asyncio helpers shared by the services."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time

from services.common import metrics
from services.common.logging import get_logger

log = get_logger(__name__)
_STALL_LOG_S = 0.05


async def sleep_or_stop(seconds: float, stop: asyncio.Event | None) -> None:
    """Sleep ``seconds``, or less if ``stop`` is set meanwhile."""
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def wait_any(*events: asyncio.Event) -> None:
    """Return as soon as one of ``events`` is set."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class Signal:
    """An ``asyncio.Event`` without the Event's deque and dict: ~100 bytes instead of ~1.1 KiB.

    For per-connection flags (10,000 idle WebSocket connections hold two each). Usually one
    task waits; a second concurrent waiter shares the pending future through a shield, so
    cancelling one waiter never cancels the other.
    """

    __slots__ = ("_flag", "_waiter")

    def __init__(self) -> None:
        self._flag = False
        self._waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        if not self._flag:
            self._flag = True
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._flag = False

    async def wait(self) -> None:
        if self._flag:
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            await asyncio.shield(waiter)  # someone already waits on it
            return
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            if self._waiter is waiter:
                self._waiter = None


async def watch_loop_lag(stop: asyncio.Event, period_s: float = 0.05) -> None:
    """Observe how late a timer fires every ``period_s`` until ``stop``: the event loop's
    stalls (a long callback, a GC pass) that every task on it waits out."""
    loop = asyncio.get_running_loop()
    logged_at = 0.0
    while not stop.is_set():
        due = loop.time() + period_s
        await asyncio.sleep(period_s)
        now = loop.time()
        lag = max(0.0, now - due)
        metrics.LOOP_LAG.observe(lag)
        if lag >= _STALL_LOG_S and now - logged_at >= 1.0:  # at most one line a second
            log.warning("event_loop_stall", ms=round(lag * 1000, 1))
            logged_at = now


def watch_gc_pauses() -> None:
    """Time every cyclic GC pass (``ledgerflux_gc_pause_seconds``); a pass long enough to
    stall the loop is logged with what it collected."""
    started = [0.0]
    children = {
        generation: metrics.GC_PAUSE.labels(generation=str(generation)) for generation in range(3)
    }

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        pause = time.perf_counter() - started[0]
        generation = info["generation"]
        children[generation].observe(pause)
        if pause >= _STALL_LOG_S:
            log.warning(
                "gc_pause",
                ms=round(pause * 1000, 1),
                generation=generation,
                collected=info["collected"],
                frozen=gc.get_freeze_count(),
            )

    gc.callbacks.append(on_gc)
