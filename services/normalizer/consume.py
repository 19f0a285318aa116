"""MD_RAW → MD_TICKS: fetch a batch, normalize, publish pipelined, then ack.

Inputs are acked only after every output of their batch is acked by JetStream. A failed
publish retries the *same* outputs (same ``Nats-Msg-Id``: stored once) until it succeeds
or the service stops, so per-product order never breaks and nothing is acked early.
"""

from __future__ import annotations

import asyncio
import time

from services.common.broker import Publisher
from services.common.logging import get_logger
from services.common.pull import Delivery, TrackedPull
from services.normalizer import metrics
from services.normalizer.process import BatchResult, RawIn, process_batch
from services.normalizer.settings import NormalizerSettings

log = get_logger(__name__)


class Normalizer:
    def __init__(
        self, settings: NormalizerSettings, publisher: Publisher, last_seq: dict[str, int]
    ) -> None:
        self.settings = settings
        self.publisher = publisher
        self.last_seq = last_seq
        self.owned = settings.owned_shards

    async def run(self, pull: TrackedPull, stop: asyncio.Event) -> None:
        """Consume until ``stop``; what was delivered by then is handled and acked first.

        A batch ends before a hole in the deliveries (AckPolicy.ALL would ack frames never
        seen); once it is acked the durable is rewound to the first frame not handled.
        """
        while True:
            if stop.is_set():
                pull.finish()
            msgs = await pull.fetch(self.settings.fetch_batch, self.settings.fetch_timeout_s)
            if msgs:
                if not await self.handle(msgs, pull, stop):
                    return
            elif pull.finished:
                return
            if pull.hole and (stop.is_set() or not await pull.rewind(stop)):
                return

    async def handle(self, msgs: list[Delivery], pull: TrackedPull, stop: asyncio.Event) -> bool:
        """Normalize, publish and ack one batch; ``False`` if stopped before it was durable."""
        started = time.perf_counter()
        frames = [RawIn(m.subject, m.data, m.headers, m.stream_seq) for m in msgs]
        result = process_batch(
            frames,
            self.last_seq,
            num_shards=self.settings.num_shards,
            owned_shards=self.owned,
            now_ns=time.time_ns(),
        )
        cpu_s = time.perf_counter() - started
        if not await self._publish_until_acked(result, stop):
            return False
        self.last_seq.update(result.staged)
        await pull.ack(msgs[-1])  # AckPolicy.ALL: acks the whole batch
        self._record(result, len(msgs), cpu_s, time.perf_counter() - started)
        return True

    async def _publish_until_acked(self, result: BatchResult, stop: asyncio.Event) -> bool:
        backoff = 0.1
        while True:
            try:
                pending = [
                    await self.publisher.publish(
                        out.stream, out.subject, out.payload, msg_id=out.msg_id, headers=out.headers
                    )
                    for out in result.outputs
                ]
                await self.publisher.wait(pending)
            except Exception as exc:  # noqa: BLE001 - any publish failure means "retry this batch"
                if stop.is_set():
                    log.warning("batch_abandoned_on_stop", outputs=len(result.outputs))
                    return False
                log.warning("publish_retry", outputs=len(result.outputs), error=repr(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            return True

    def _record(self, result: BatchResult, n: int, cpu_s: float, total_s: float) -> None:
        for kind, count in result.frames_in.items():
            metrics.FRAMES_IN.labels(type=kind).inc(count)
        metrics.TICKS_OUT.inc(result.ticks)
        for reason, count in result.dropped.items():
            metrics.DROPPED.labels(reason=reason).inc(count)
        for reason, count in result.dead_letters.items():
            metrics.DEAD_LETTERS.labels(reason=reason).inc(count)
            log.warning("frames_dead_lettered", reason=reason, count=count)
        if result.not_owned:
            metrics.NOT_OWNED.inc(result.not_owned)
        for product, recv_ns in result.last_seen.items():
            metrics.LAST_SEEN.labels(product=product).set(recv_ns / 1e9)
        metrics.BATCH_SECONDS.observe(total_s)
        metrics.FRAME_SECONDS.observe(cpu_s / n)
