"""A tick as the gateway holds it: the canonical bytes from MD_TICKS, decoded once.

The same object goes to every subscriber. Its WebSocket frame (and, for the plain ASGI
path, its JSON text) is built from the bytes once, on first use, and shared, instead of
once per client per tick.
"""

from __future__ import annotations

from services.common.laststate import StoredTick
from services.common.models import Tick
from services.gateway.frames import text_frame


class LiveTick:
    __slots__ = ("_frame", "_text", "data", "seq", "tick")

    def __init__(self, tick: Tick, data: bytes) -> None:
        self.tick = tick
        self.data = data
        self.seq = tick.seq  # read once per subscriber: a plain attribute, not a property
        self._text: str | None = None
        self._frame: bytes | None = None

    @classmethod
    def from_stored(cls, stored: StoredTick) -> LiveTick:
        return cls(stored.tick, stored.data)

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self.data.decode()
        return self._text

    @property
    def frame(self) -> bytes:
        """The WebSocket text frame carrying the tick, built once for every subscriber."""
        if self._frame is None:
            self._frame = text_frame(self.data)
        return self._frame
