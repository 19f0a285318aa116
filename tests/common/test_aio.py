"""Signal: the light per-connection event behaves like asyncio.Event for its uses."""

from __future__ import annotations

import asyncio

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
