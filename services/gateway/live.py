"""The gateway's live tail of MD_TICKS: an ordered JetStream push consumer.

A core NATS subscription on ``md.ticks.>`` loses every tick published while the gateway
is reconnecting (NATS restarted, a cluster node lost): the normalizer reconnects first and
stores them, the gateway's clients would then see a silent jump in ``seq``. An ordered
consumer remembers the last stream sequence it delivered; when its heartbeats stop or a
delivery is missing, nats-py recreates it from the next sequence, so the hub receives every
tick of the stream, once, in order.

The consumer starts at the stream's next sequence (not ``DeliverPolicy.ALL``), and nats-py
is told so: its resume point is the last sequence *seen*, 0 before the first tick, which
would replay the whole stream if NATS restarted before any tick arrived.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext

from services.common.broker import ack_sequences
from services.common.logging import get_logger
from services.common.subjects import TICKS_STREAM, TICKS_WILDCARD
from services.gateway import metrics

log = get_logger(__name__)

Handler = Callable[[Msg], Awaitable[None]]


async def subscribe_live(
    js: JetStreamContext, on_tick: Handler, heartbeat_s: float
) -> JetStreamContext.PushSubscription:
    """Deliver every MD_TICKS message stored from now on to ``on_tick``, in stream order,
    across NATS reconnects and server restarts."""
    info = await js.stream_info(TICKS_STREAM)
    start = info.state.last_seq + 1
    consumer = 0  # consumer sequence of the previous delivery: 1 again means a new consumer

    async def deliver(msg: Msg) -> None:
        nonlocal consumer
        stream_seq, consumer_seq = ack_sequences(msg)
        if consumer_seq <= consumer:
            metrics.LIVE_RESUMES.inc()
            log.info("live_tail_resumed", stream_seq=stream_seq)
        consumer = consumer_seq
        metrics.LIVE_STREAM_SEQ.set(stream_seq)
        await on_tick(msg)

    sub = await js.subscribe(
        TICKS_WILDCARD,
        stream=TICKS_STREAM,
        cb=deliver,
        ordered_consumer=True,
        idle_heartbeat=heartbeat_s,
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
        config=api.ConsumerConfig(opt_start_seq=start),
        pending_msgs_limit=1_000_000,
    )
    jsi = sub._sub._jsi  # nats-py keeps the resume point there
    if jsi is not None:
        jsi._sseq = start - 1
    log.info("live_tail_started", stream_seq=start)
    return sub
