"""Read JetStream streams back in tests."""

from __future__ import annotations

import asyncio
import time

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy


async def read_all(
    js: JetStreamContext, stream: str, subject: str = ">"
) -> list[tuple[str, bytes]]:
    """Every message of ``stream`` (matching ``subject``), in stream order."""
    info = await js.stream_info(stream)
    total = info.state.messages
    sub = await js.pull_subscribe(
        subject,
        stream=stream,
        config=ConsumerConfig(
            ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=30
        ),
    )
    out: list[tuple[str, bytes]] = []
    try:
        while len(out) < total:
            try:
                msgs = await sub.fetch(min(1000, total - len(out)), timeout=2)
            except TimeoutError:
                break
            out.extend((m.subject, m.data) for m in msgs)
    finally:
        await sub.unsubscribe()
    return out


async def wait_consumer_idle(
    js: JetStreamContext, stream: str, durable: str, timeout: float = 30.0
) -> None:
    """Until the durable has nothing pending and nothing un-acked."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = await js.consumer_info(stream, durable)
        except Exception:  # noqa: BLE001 - not created yet
            info = None
        if info is not None and info.num_pending == 0 and info.num_ack_pending == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{durable} on {stream} not idle: {info}")
        await asyncio.sleep(0.1)
