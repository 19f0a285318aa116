"""Table tests: real Coinbase messages (coinbase-protocol.md) → canonical ticks or a DLQ reason."""

from __future__ import annotations

import msgspec
import orjson
import pytest

from services.common.models import Tick, decode_tick, encode_tick
from services.normalizer.decode import (
    CoinbaseHeartbeat,
    PositionalTick,
    decode_frame,
    ticker_to_tick,
)
from services.normalizer.errors import RejectedFrameError
from services.normalizer.process import RawIn, process_batch

# 2022-10 ETH-USD ticker with every field, as quoted in coinbase-protocol.md §1.
REAL_TICKER = (
    b'{"type":"ticker","sequence":37475248783,"product_id":"ETH-USD","price":"1285.22",'
    b'"open_24h":"1310.79","volume_24h":"245532.79269678","low_24h":"1280.52",'
    b'"high_24h":"1313.8","volume_30d":"9788783.60117027","best_bid":"1285.04",'
    b'"best_bid_size":"0.46688654","best_ask":"1285.27","best_ask_size":"1.56637040",'
    b'"side":"buy","time":"2022-10-19T23:28:22.061769Z","trade_id":370843401,'
    b'"last_size":"11.4396987"}'
)
# 2021 capture: no best_bid_size/best_ask_size yet.
TICKER_2021 = (
    b'{"type":"ticker","sequence":333938798,"product_id":"BAND-GBP","price":"14.7775",'
    b'"open_24h":"13.3","volume_24h":"10316.08","low_24h":"12.8","high_24h":"15.1",'
    b'"volume_30d":"120000.5","best_bid":"14.7625","best_ask":"14.8081","side":"sell",'
    b'"time":"2021-04-20T10:00:00.000001Z","trade_id":12345,"last_size":"3.7"}'
)
REAL_HEARTBEAT = (
    b'{"type":"heartbeat","last_trade_id":319738525,"product_id":"ETH-USD",'
    b'"sequence":32589047800,"time":"2022-07-19T12:09:26.296459Z"}'
)


def test_real_ticker_becomes_an_exact_tick() -> None:
    """Every decimal string is carried over byte for byte; fields map as DESIGN §3 says."""
    frame = decode_frame(REAL_TICKER)
    tick = ticker_to_tick(frame, "ETH-USD", recv_ns=1)  # type: ignore[arg-type]
    assert (tick.product, tick.seq, tick.trade_id) == ("ETH-USD", 37475248783, 370843401)
    assert (tick.price, tick.size, tick.side) == ("1285.22", "11.4396987", "buy")
    assert (tick.bid, tick.bid_size, tick.ask, tick.ask_size) == (
        "1285.04",
        "0.46688654",
        "1285.27",
        "1.56637040",
    )
    assert (tick.open_24h, tick.high_24h, tick.low_24h, tick.volume_24h) == (
        "1310.79",
        "1313.8",
        "1280.52",
        "245532.79269678",
    )
    wire = orjson.loads(encode_tick(tick))
    assert list(wire)[:4] == ["type", "v", "exchange", "product"]
    assert wire["type"] == "tick" and wire["v"] == 1 and "resync" not in wire
    assert decode_tick(encode_tick(tick)) == tick


def test_the_positional_tick_is_the_tick_model_field_for_field() -> None:
    """The hot path's PositionalTick has Tick's tag, names, order and types (all but the
    gateway's ``skipped``), so a field added to Tick cannot go missing from MD_TICKS."""
    tick_fields = [(f.name, f.type) for f in msgspec.structs.fields(Tick) if f.name != "skipped"]
    positional = [(f.name, f.type) for f in msgspec.structs.fields(PositionalTick)]
    assert positional == tick_fields
    assert msgspec.inspect.type_info(PositionalTick).tag == "tick"  # type: ignore[attr-defined]
    assert msgspec.inspect.type_info(PositionalTick).tag_field == "type"  # type: ignore[attr-defined]


def test_2021_ticker_without_sizes_has_nulls() -> None:
    """Fields the exchange did not send are null, not missing and not zero."""
    tick = ticker_to_tick(decode_frame(TICKER_2021), "BAND-GBP", recv_ns=1)  # type: ignore[arg-type]
    wire = orjson.loads(encode_tick(tick))
    assert wire["bid_size"] is None and wire["ask_size"] is None
    assert wire["price"] == "14.7775"


def test_heartbeat_decodes_as_liveness() -> None:
    frame = decode_frame(REAL_HEARTBEAT)
    assert isinstance(frame, CoinbaseHeartbeat)
    assert frame.last_trade_id == 319738525


def _mutated(**changes: object) -> bytes:
    message = orjson.loads(REAL_TICKER)
    for key, value in changes.items():
        if value is ...:
            del message[key]
        else:
            message[key] = value
    return orjson.dumps(message)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not json at all", "unparseable"),
        (b"[1,2,3]", "unparseable"),
        (b'{"type":"ticker"}', "schema"),
        (_mutated(price=...), "schema"),
        (_mutated(sequence="12"), "schema"),
        (_mutated(price=1285.22), "schema"),
        (_mutated(price="1,285.22"), "bad_decimal"),
        (_mutated(price="-1"), "bad_decimal"),
        (_mutated(price="1e3"), "bad_decimal"),
        (_mutated(price="1,285.22", last_size=None), "bad_decimal"),  # not all ten present
        (_mutated(last_size=""), "bad_decimal"),
        (_mutated(volume_24h="1."), "bad_decimal"),
        (_mutated(best_ask_size=".5"), "bad_decimal"),
        (_mutated(high_24h="1313.8.1"), "bad_decimal"),
        (_mutated(low_24h="None"), "bad_decimal"),
        (_mutated(price="0.000"), "bad_value"),
        (_mutated(best_bid="1300", best_ask="1200"), "bad_value"),
        (_mutated(side="hold"), "bad_value"),
        (_mutated(time="yesterday"), "bad_time"),
        (_mutated(time="2022-10-19T23:28:22"), "bad_time"),
        (_mutated(product_id="BTC-USD"), "product_mismatch"),
        (b'{"type":"l2update","product_id":"ETH-USD","changes":[]}', "unsupported_type"),
    ],
)
def test_bad_frames_are_dead_lettered_with_a_reason(data: bytes, reason: str) -> None:
    """Each invalid frame becomes one dead letter on md.dlq.<reason>, original bytes intact."""
    result = process_batch(
        [RawIn("md.raw.coinbase.ETH-USD", data, None, 7)],
        {},
        num_shards=4,
        owned_shards=frozenset(range(4)),
        now_ns=1,
    )
    assert result.dead_letters == {reason: 1}
    (out,) = result.outputs
    assert out.subject == f"md.dlq.{reason}"
    assert out.payload == data
    assert out.headers is not None and out.headers["Ledgerflux-Dlq-Reason"] == reason


def test_rejections_carry_their_reason() -> None:
    with pytest.raises(RejectedFrameError) as excinfo:
        decode_frame(b"{")
    assert excinfo.value.reason == "unparseable"
