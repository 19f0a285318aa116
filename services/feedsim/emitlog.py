"""``--emit-log``: an audit trail of every ticker the simulator produced, as JSON lines.

One line per ticker, in the order frames went out (a reordered ticker is written after
the one that overtook it)::

    {"recv_ns": 1718000000123456789, "fault": null, "sent": 1, "msg": {...ticker...}}

``fault`` is null or the per-ticker fault applied (gap, dup, malformed, reorder); ``sent``
is how many times ``msg`` itself went out (0 for gap and malformed, 2 for dup). Malformed
lines add ``"malformed": variant`` and ``"raw"``: the broken frame sent instead. Being
``{"recv_ns", "msg"}`` lines, the file can be fed back to ``--replay`` (lines with
``"sent": 0`` are skipped there, ``"sent": 2`` is sent twice).

Lines are buffered and written by a background task through a worker thread, so the
event loop never blocks on disk.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import BinaryIO, Self

import orjson

FLUSH_INTERVAL_S = 0.1


class LineFile:
    """Append-only lines, buffered in memory and written by :meth:`run` through a worker
    thread (every ``FLUSH_INTERVAL_S``) and on :meth:`close`."""

    def __init__(self, path: Path, file: BinaryIO) -> None:
        self.path = path
        self._file = file
        self._buf: list[bytes] = []
        self._lock = asyncio.Lock()
        self._writing: asyncio.Future[None] | None = None
        self.lines = 0

    @classmethod
    async def open(cls, path: Path) -> Self:
        file = await asyncio.to_thread(path.open, "ab")
        return cls(path, file)

    def append(self, line: bytes) -> None:
        self._buf.append(line)
        self.lines += 1

    async def flush(self) -> None:
        async with self._lock:  # keep line order across concurrent flushes
            if not self._buf:
                return
            data, self._buf = b"".join(self._buf), []
            # shielded: when stop() cancels the flushing task, the thread still writes these
            # lines, and close() waits for that before it closes the file
            self._writing = asyncio.ensure_future(asyncio.to_thread(self._write, data))
            await asyncio.shield(self._writing)

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            await self.flush()

    async def close(self) -> None:
        if self._writing is not None:
            await self._writing  # a write whose flush was cancelled mid-way
        await self.flush()
        await asyncio.to_thread(self._file.close)


class EmitLog(LineFile):
    def record(
        self,
        recv_ns: int,
        frame: bytes,
        fault: str | None,
        sent: int,
        malformed: tuple[str, bytes] | None = None,
    ) -> None:
        fault_json = b"null" if fault is None else b'"%s"' % fault.encode()
        extra = b""
        if malformed is not None:
            variant, raw = malformed
            extra = b',"malformed":"%s","raw":%s' % (
                variant.encode(),
                orjson.dumps(raw.decode("utf-8", "replace")),
            )
        self.append(
            b'{"recv_ns":%d,"fault":%s,"sent":%d%s,"msg":%s}\n'
            % (recv_ns, fault_json, sent, extra, frame)
        )
