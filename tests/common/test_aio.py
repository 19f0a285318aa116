"""Signal: the light per-connection event behaves like asyncio.Event for its uses."""

from __future__ import annotations

import asyncio
import time

from services.common.aio import Signal


async def test_set_wakes_the_waiter_and_stays_set_until_cleared() -> None:
    signal = Signal()
    waiter = asyncio.create_task(signal.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    signal.set()
    await asyncio.wait_for(waiter, 1)
    assert signal.is_set()
    await asyncio.wait_for(signal.wait(), 1)  # already set: returns at once
    signal.clear()
    assert not signal.is_set()


async def test_a_timed_out_waiter_leaves_the_signal_usable() -> None:
    signal = Signal()
    try:
        async with asyncio.timeout(0.01):
            await signal.wait()
    except TimeoutError:
        pass
    waiter = asyncio.create_task(signal.wait())
    await asyncio.sleep(0)
    signal.set()
    await asyncio.wait_for(waiter, 1)


async def test_cancelling_one_of_two_waiters_does_not_cancel_the_other() -> None:
    signal = Signal()
    first = asyncio.create_task(signal.wait())
    second = asyncio.create_task(signal.wait())
    await asyncio.sleep(0)
    second.cancel()
    await asyncio.sleep(0)
    signal.set()
    await asyncio.wait_for(first, 1)
    assert second.cancelled()


async def test_a_blocking_callback_shows_as_loop_lag() -> None:
    """watch_loop_lag observes how late its timer fired: a 150 ms blocking call (what a long
    GC pass or a burst of work does to every task) lands in the >= 0.1 s buckets."""
    from services.common import metrics
    from services.common.aio import watch_loop_lag

    def bucket(le: str) -> float:
        return sum(
            s.value
            for m in metrics.LOOP_LAG.collect()
            for s in m.samples
            if s.name.endswith("_bucket") and s.labels["le"] == le
        )

    def slow_samples() -> float:
        return bucket("+Inf") - bucket("0.1")

    before = slow_samples()
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_loop_lag(stop, period_s=0.01))
    await asyncio.sleep(0.05)
    time.sleep(0.15)  # noqa: ASYNC251 - the stall under test
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(watcher, 1)
    assert slow_samples() - before == 1
