"""JSON nested past msgspec's depth limit, at every decoder of outside input: the error
each one already has for bad input, never a RecursionError. Unguarded, it made the
normalizer's batch fail on every redelivery (a poison message), crashed the ingestor's feed
loop and the gateway session that read it."""

from __future__ import annotations

import msgspec
import pytest

from services.common.models import decode_tick, decode_tick_seq
from services.gateway.protocol import BadCommandError, decode_command, request_id_of
from services.ingestor.frames import UnparseableFrameError, parse_frame
from services.normalizer.process import RawIn, process_batch
from services.snapshotter.errors import SnapshotReadError
from services.snapshotter.snapshots import parse_snapshot

DEEP = "[" * 5000 + "]" * 5000  # ~10 KB: well inside every frame size limit


def test_the_normalizer_dead_letters_it_as_unparseable() -> None:
    frame = ('{"type": "ticker", "product_id": "BTC-USD", "x": ' + DEEP + "}").encode()
    result = process_batch(
        [RawIn("md.raw.coinbase.BTC-USD", frame, None, 1)],
        {}, num_shards=4, owned_shards=frozenset(range(4)), now_ns=1,
    )  # fmt: skip
    assert result.dead_letters == {"unparseable": 1}
    assert result.outputs[0].payload == frame


def test_the_ingestor_dead_letters_it_as_unparseable() -> None:
    with pytest.raises(UnparseableFrameError, match="nested too deeply"):
        parse_frame(('{"type": "ticker", "x": ' + DEEP + "}").encode(), 1)


def test_the_gateway_answers_bad_request() -> None:
    with pytest.raises(BadCommandError, match="nested too deeply"):
        decode_command('{"x": ' + DEEP + ', "op": "ping"}')  # skipped while finding "op"
    assert request_id_of('{"x": ' + DEEP + ', "id": 3}') is None


def test_stored_data_is_undecodable_like_any_other() -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_tick('{"type": "tick", "x": ' + DEEP + "}")
    with pytest.raises(msgspec.DecodeError):  # the seq-only read of the snapshotter, backfill
        decode_tick_seq('{"x": ' + DEEP + ', "seq": 1}')
    with pytest.raises(SnapshotReadError):
        parse_snapshot(('{"x": ' + DEEP + "}").encode())
