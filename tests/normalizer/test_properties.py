"""Property tests of the normalizer's pure core (hypothesis)."""

from __future__ import annotations

import json
import random
from collections import defaultdict

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.models import decode_tick, encode_tick
from services.normalizer.decode import CoinbaseTicker, decode_frame, encode_ticker, ticker_to_tick
from services.normalizer.errors import DLQ_REASONS
from services.normalizer.process import RawIn, process_batch

ALL_SHARDS = frozenset(range(4))
PRODUCTS = ["BTC-USD", "ETH-USD", "SOL-EUR"]

digits = st.text("0123456789", min_size=1, max_size=12)
decimal_str = st.builds(
    lambda whole, frac: whole if frac is None else f"{whole}.{frac}",
    digits,
    st.one_of(st.none(), digits),
)
positive_decimal = decimal_str.filter(lambda s: s.strip("0."))


@st.composite
def tickers(draw: st.DrawFn) -> dict[str, object]:
    bid = draw(positive_decimal)
    ask = draw(positive_decimal)
    if float(bid) > float(ask):  # only to pick the order; the check itself is exact
        bid, ask = ask, bid
    message: dict[str, object] = {
        "type": "ticker",
        "sequence": draw(st.integers(0, 2**62)),
        "product_id": draw(st.sampled_from(PRODUCTS)),
        "price": draw(positive_decimal),
        "time": draw(
            st.sampled_from(
                [
                    "2022-10-19T23:28:22.061769Z",
                    "2026-11-28T15:00:00Z",
                    "2024-01-01T00:00:00.123456789Z",
                    "2025-06-30T12:00:00.5+02:00",
                ]
            )
        ),
        "side": draw(st.sampled_from(["buy", "sell"])),
        "trade_id": draw(st.integers(0, 2**62)),
        "last_size": draw(decimal_str),
        "open_24h": draw(decimal_str),
        "volume_24h": draw(decimal_str),
        "volume_30d": draw(decimal_str),
        "high_24h": draw(decimal_str),
        "low_24h": draw(decimal_str),
    }
    if draw(st.booleans()):  # 2022+ frames carry the sizes, older ones do not
        message |= {"best_bid": bid, "best_ask": ask}
        message |= {"best_bid_size": draw(decimal_str), "best_ask_size": draw(decimal_str)}
    return message


def _run(frames: list[RawIn], last: dict[str, int] | None = None) -> object:
    return process_batch(frames, last or {}, num_shards=4, owned_shards=ALL_SHARDS, now_ns=1)


@given(tickers())
def test_valid_ticker_round_trips_with_exact_decimals(message: dict[str, object]) -> None:
    """Any valid Coinbase ticker becomes one tick whose decimals are the same strings."""
    product = str(message["product_id"])
    result = process_batch(
        [RawIn(f"md.raw.coinbase.{product}", orjson.dumps(message), None, 1)],
        {},
        num_shards=4,
        owned_shards=ALL_SHARDS,
        now_ns=5,
    )
    assert not result.dead_letters, result.outputs
    (out,) = result.outputs
    tick = decode_tick(out.payload)
    assert tick.seq == message["sequence"] and tick.product == product
    assert tick.price == message["price"]
    assert tick.size == message["last_size"]
    assert tick.bid == message.get("best_bid") and tick.ask == message.get("best_ask")
    assert tick.bid_size == message.get("best_bid_size")
    assert tick.ask_size == message.get("best_ask_size")
    assert tick.volume_24h == message["volume_24h"]
    assert tick.high_24h == message["high_24h"] and tick.low_24h == message["low_24h"]
    assert tick.time == message["time"]
    assert out.subject.startswith("md.ticks.") and out.subject.endswith("." + product)


@given(tickers(), st.booleans())
def test_the_hot_path_encodes_exactly_what_the_tick_model_does(
    message: dict[str, object], resync: bool
) -> None:
    """process_batch encodes a positional copy of Tick (keyword matching is 2 µs a frame):
    the bytes are those of the canonical Tick built from the same ticker."""
    decoded = decode_frame(orjson.dumps(message))
    assert isinstance(decoded, CoinbaseTicker)
    product = str(message["product_id"])
    expected = encode_tick(ticker_to_tick(decoded, product, 5, resync=resync))
    assert encode_ticker(decoded, 5, resync=resync) == expected


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=20,
)


@st.composite
def mutated_tickers(draw: st.DrawFn) -> bytes:
    """A valid ticker with one field replaced by any JSON value, or removed."""
    message = draw(tickers())
    key = draw(st.sampled_from(sorted(message)))
    if draw(st.booleans()):
        del message[key]
    else:
        message[key] = draw(json_values)
    return json.dumps(message).encode()


@settings(max_examples=400)
@given(
    st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        mutated_tickers(),
    )
)
def test_arbitrary_input_is_accounted_for_never_a_crash(data: bytes) -> None:
    """Bytes or JSON of any shape: a tick, a dead letter with a known reason, or liveness."""
    result = process_batch(
        [RawIn("md.raw.coinbase.BTC-USD", data, None, 9)],
        {},
        num_shards=4,
        owned_shards=ALL_SHARDS,
        now_ns=1,
    )
    assert set(result.dead_letters) <= set(DLQ_REASONS)
    outputs = len(result.outputs)
    liveness_only = sum(result.frames_in.values()) - result.frames_in["rejected"] - result.ticks
    assert outputs + liveness_only == 1
    for out in result.outputs:
        if out.stream == "MD_DLQ":
            assert out.payload == data


@settings(max_examples=200)
@given(
    st.lists(st.tuples(st.sampled_from(PRODUCTS), st.integers(1, 60)), min_size=1, max_size=80),
    st.randoms(use_true_random=False),
    st.integers(1, 10),
)
def test_shuffled_duplicated_frames_yield_strictly_increasing_records(
    events: list[tuple[str, int]], rng: random.Random, batch_size: int
) -> None:
    """Any interleaving with duplicates, cut into batches: per product, output is strictly
    increasing and holds every seq newer than everything emitted before it."""
    frames = [
        RawIn(f"md.raw.coinbase.{p}", _ticker(p, s), None, i) for i, (p, s) in enumerate(events)
    ]
    frames += rng.sample(frames, k=len(frames) // 3)  # duplicates, redelivered later
    rng.shuffle(frames)
    last: dict[str, int] = {}
    emitted: dict[str, list[int]] = defaultdict(list)
    for start in range(0, len(frames), batch_size):
        result = process_batch(
            frames[start : start + batch_size],
            last,
            num_shards=4,
            owned_shards=ALL_SHARDS,
            now_ns=1,
        )
        last.update(result.staged)
        for out in result.outputs:
            assert out.product is not None and out.seq is not None
            emitted[out.product].append(out.seq)
    expected: dict[str, list[int]] = defaultdict(list)
    for frame in frames:
        seq = orjson.loads(frame.data)["sequence"]
        product = frame.subject.rsplit(".", 1)[1]
        if not expected[product] or seq > expected[product][-1]:
            expected[product].append(seq)
    assert emitted == expected


def _ticker(product: str, seq: int) -> bytes:
    return orjson.dumps(
        {
            "type": "ticker",
            "sequence": seq,
            "product_id": product,
            "price": f"{100 + seq}.5",
            "time": "2026-11-28T15:00:00.000001Z",
            "side": "buy",
            "trade_id": seq,
        }
    )


@settings(max_examples=500)
@given(decimal_str, decimal_str)
def test_bid_ask_order_is_exact(a: str, b: str) -> None:
    """The float fast path of the bid ≤ ask check agrees with exact Decimal comparison,
    including values that only differ beyond float precision."""
    from decimal import Decimal

    from services.normalizer.decode import _above

    assert _above(a, b) == (Decimal(a) > Decimal(b))
    near = a + "0000000000000000001" if "." in a else a + ".0000000000000000001"
    assert _above(near, a) and not _above(a, near)
