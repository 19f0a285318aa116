"""TrackedPull against a real nats-server: deliveries the server counts as made but that never
reached the owner (a cluster leader killed before flushing them) are found and consumed
after a rewind, never acked unseen by AckPolicy.ALL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, StreamConfig

from services.common.pull import Delivery, DirectPull, TrackedPull
from services.devstack.servers import NatsServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

STREAM, DURABLE = "HOLES", "owner"


@pytest.fixture
async def js(nats_server: NatsServer) -> AsyncIterator[JetStreamContext]:
    nc: NATS = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=STREAM, subjects=["holes.>"]))
    for n in range(1, 11):
        await js.publish(f"holes.{n % 3}", b"%d" % n)
    yield js
    await nc.close()


def _pull(js: JetStreamContext, subs: list[DirectPull]) -> TrackedPull:
    return TrackedPull(
        js, subs, stream=STREAM, durable=DURABLE, filter_subjects=["holes.>"],
        max_ack_pending=100, ack_wait_s=30.0, ack_policy=AckPolicy.ALL,
    )  # fmt: skip


async def _lose_deliveries(js: JetStreamContext, n: int) -> None:
    """Deliveries the server records as made, to an inbox the owner never reads."""
    thief = await js.pull_subscribe_bind(durable=DURABLE, stream=STREAM)
    assert len(await thief.fetch(n, timeout=2)) == n
    await thief.unsubscribe()


async def _fetch_exactly(pull: TrackedPull, n: int) -> list[Delivery]:
    """``n`` deliveries: a fetch returns what has arrived, not always all of them at once."""
    got: list[Delivery] = []
    while len(got) < n:
        more = await pull.fetch(n - len(got), 2)
        assert more, f"{len(got)} of {n} deliveries came"
        got += more
    return got


async def _consume_all(pull: TrackedPull, stop: asyncio.Event, want: int) -> list[int]:
    """What a normalizer-like owner handles: every batch acked, rewound at a hole."""
    handled: list[int] = []
    while len(handled) < want:
        msgs = await pull.fetch(4, 0.5)
        if msgs:
            handled += [m.stream_seq for m in msgs]
            await pull.ack(msgs[-1])
        if pull.hole:
            assert await pull.rewind(stop)
    return handled


async def test_deliveries_lost_in_transit_are_consumed_after_a_rewind(
    js: JetStreamContext,
) -> None:
    subs: list[DirectPull] = []
    pull = _pull(js, subs)
    await pull.bind()
    first = await _fetch_exactly(pull, 2)
    assert [m.stream_seq for m in first] == [1, 2] and not pull.hole
    await pull.ack(first[-1])
    await _lose_deliveries(js, 3)  # stream seqs 3, 4, 5 go nowhere
    handled = await _consume_all(pull, asyncio.Event(), 8)
    assert handled == list(range(3, 11))  # nothing acked unseen, in order, once
    assert len(subs) == 2  # the rewind bound a fresh subscription


async def test_a_hole_before_anything_was_acked_rewinds_to_the_ack_floor(
    js: JetStreamContext,
) -> None:
    pull = _pull(js, [])
    await pull.bind()
    await _lose_deliveries(js, 4)
    assert await _consume_all(pull, asyncio.Event(), 10) == list(range(1, 11))


async def test_without_the_check_all_ack_swallows_the_lost_deliveries(
    js: JetStreamContext,
) -> None:
    """Why the check exists: the plain AckPolicy.ALL owner acks 3..5 without seeing them."""
    pull = _pull(js, [])
    await pull.bind()
    await _lose_deliveries(js, 5)
    assert pull.sub is not None
    msgs: list[Delivery] = []
    while len(msgs) < 5:
        more = await pull.sub.fetch(5 - len(msgs), 2)
        assert more, "the deliveries after the lost ones never came"
        msgs += more
    assert [m.stream_seq for m in msgs] == [6, 7, 8, 9, 10]
    await pull.ack(msgs[-1])
    await asyncio.sleep(0.2)
    info = await js.consumer_info(STREAM, DURABLE)
    assert info.num_ack_pending == 0 and info.ack_floor.stream_seq == 10


async def test_direct_pull_asks_again_after_its_consumer_is_recreated(
    js: JetStreamContext,
) -> None:
    """Open pull requests die with their consumer (409 Consumer Deleted): the next fetch asks
    the new consumer, without waiting for the old requests' expiry."""
    pull = _pull(js, [])
    await pull.bind()
    first = await _fetch_exactly(pull, 10)
    assert [m.stream_seq for m in first] == list(range(1, 11))
    await pull.ack(first[-1])
    await js.delete_consumer(STREAM, DURABLE)
    await pull.bind(resume_from=11)  # the same durable again, at the next sequence
    for n in range(11, 16):
        await js.publish(f"holes.{n % 3}", b"%d" % n)
    got: list[int] = []
    while len(got) < 5:
        more = await pull.fetch(10, 2)
        assert more, "no deliveries from the recreated consumer"
        got += [m.stream_seq for m in more]
    assert got == [11, 12, 13, 14, 15]


async def test_finish_hands_over_what_open_requests_deliver_then_stops(
    js: JetStreamContext,
) -> None:
    """After finish() nothing new is requested; fetch returns what is owed, then [] at once."""
    pull = _pull(js, [])
    await pull.bind()
    first = await pull.fetch(4, 2)  # requests for twice the batch: more is owed
    pull.finish()
    for n in range(11, 16):  # stored after finish(): requests still open may take them
        await js.publish(f"holes.{n % 3}", b"%d" % n)
    rest: list[Delivery] = []
    while not pull.finished:
        rest += await pull.fetch(4, 2)
    seqs = [m.stream_seq for m in first + rest]
    assert seqs == list(range(1, len(seqs) + 1))  # in order, none skipped
    assert 8 <= len(seqs) < 15  # what was asked for (2 x 4, topped up once), not all
    assert await pull.fetch(4, 0.5) == []
    info = await js.consumer_info(STREAM, DURABLE)
    assert info.num_pending == 15 - len(seqs)  # the rest waits for the next owner
