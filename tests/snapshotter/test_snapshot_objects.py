"""Reading snapshot objects: what this code wrote parses; anything else is a
SnapshotReadError naming the key, never a traceback or gigabytes of memory."""

from __future__ import annotations

import gzip
import json

import pytest

from services.snapshotter import snapshots
from services.snapshotter.errors import SnapshotReadError
from services.snapshotter.snapshots import SNAPSHOT_VERSION, parse_snapshot

VALID = {
    "version": SNAPSHOT_VERSION, "created": "2026-11-29T12:00:00.000Z", "stream": "MD_TICKS",
    "stream_seq": 10, "num_shards": 4, "shards": [0, 1, 2, 3], "products": {},
}  # fmt: skip


def test_a_snapshot_as_written_parses_gzipped_or_not() -> None:
    raw = json.dumps(VALID).encode()
    assert parse_snapshot(gzip.compress(raw)).stream_seq == 10
    assert parse_snapshot(raw).stream_seq == 10


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"<html>not found</html>", "JSON is malformed"),
        (b"\x1f\x8bnot gzip at all", "while decompressing"),
        (gzip.compress(json.dumps(VALID).encode())[:-12], "truncated gzip"),
        (gzip.compress(b"not json"), "JSON is malformed"),
        (json.dumps({**VALID, "products": []}).encode(), "Expected `object`"),
        (json.dumps({**VALID, "version": 99}).encode(), "version 99"),
        (json.dumps({**VALID, "stream_seq": -5}).encode(), "stream_seq -5"),
    ],
    ids=["html", "bad-gzip", "truncated", "gzip-of-text", "schema", "version", "negative-seq"],
)
def test_anything_else_is_one_error_naming_the_key(data: bytes, says: str) -> None:
    with pytest.raises(SnapshotReadError, match=r"snapshots/k\.json\.gz is not a valid") as caught:
        parse_snapshot(data, "snapshots/k.json.gz")
    assert says in str(caught.value)


def test_an_object_that_inflates_past_the_cap_is_refused_without_inflating_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gzip bomb (here 4 MiB of one byte against a 1 MiB cap; an 800 MB one took 1.5 GB):
    refused after inflating at most the cap."""
    monkeypatch.setattr(snapshots, "MAX_SNAPSHOT_BYTES", 1024 * 1024)
    bomb = gzip.compress(b"[" * (4 * 1024 * 1024))
    assert len(bomb) < 20_000
    with pytest.raises(SnapshotReadError, match="inflates past 1048576 bytes"):
        parse_snapshot(bomb, "snapshots/bomb.json.gz")
