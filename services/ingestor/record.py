"""``--record FILE.jsonl``: every received frame as ``{"recv_ns": ..., "msg": {...}}``.

Lines go through a large userspace buffer, so the event loop only pays for a memcpy per
frame; the file rotates to ``FILE.1``, ``FILE.2`` ... once it passes ``max_bytes``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import orjson


class Recorder:
    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._file: BinaryIO = path.open("ab", buffering=1024 * 1024)
        self._size = path.stat().st_size

    def write(self, recv_ns: int, data: bytes) -> None:
        try:
            orjson.loads(data)
        except orjson.JSONDecodeError:
            # not JSON: keep the bytes (as text) so a replay can reproduce the malformed frame
            line = orjson.dumps({"recv_ns": recv_ns, "raw": data.decode("utf-8", "replace")})
        else:
            line = b'{"recv_ns":%d,"msg":%s}' % (recv_ns, data.strip())
        self._file.write(line + b"\n")
        self._size += len(line) + 1
        if self._size >= self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self._file.close()
        index = 1
        while self.path.with_name(f"{self.path.name}.{index}").exists():
            index += 1
        os.replace(self.path, self.path.with_name(f"{self.path.name}.{index}"))
        self._file = self.path.open("ab", buffering=1024 * 1024)
        self._size = 0

    def close(self) -> None:
        self._file.close()
