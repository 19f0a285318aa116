"""A tick as the gateway holds it: the canonical bytes from MD_TICKS, decoded once.

The same object goes to every subscriber. Its JSON text (what a WebSocket text frame
carries) is decoded from the bytes once, on first use, and shared, instead of once per
client per tick.
"""

from __future__ import annotations

from services.common.laststate import StoredTick
from services.common.models import Tick


class LiveTick:
    __slots__ = ("_text", "data", "seq", "tick")

    def __init__(self, tick: Tick, data: bytes) -> None:
        self.tick = tick
        self.data = data
        self.seq = tick.seq  # read once per subscriber: a plain attribute, not a property
        self._text: str | None = None

    @classmethod
    def from_stored(cls, stored: StoredTick) -> LiveTick:
        return cls(stored.tick, stored.data)

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self.data.decode()
        return self._text
