"""What the snapshotter has made durable: the latest tick per product it wrote (or found
in DynamoDB at start) and the MD_TICKS sequence up to which that is complete."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.snapshotter import metrics
from services.snapshotter.ddb import LatestTick


@dataclass
class DurableState:
    latest: dict[str, LatestTick] = field(default_factory=dict)
    covered_stream_seq: int = 0

    def apply(self, written: list[LatestTick], covered_stream_seq: int) -> None:
        """Record a flush whose writes succeeded and whose messages are acked."""
        for item in written:
            current = self.latest.get(item.product)
            if current is None or item.seq > current.seq:
                self.latest[item.product] = item
        self.covered_stream_seq = max(self.covered_stream_seq, covered_stream_seq)
        metrics.COVERED_STREAM_SEQ.set(self.covered_stream_seq)
