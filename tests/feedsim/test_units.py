"""Pure functions of the simulator: command parsing, fault specs, the market model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

from services.feedsim import FaultSpecError, FeedSimSettings, parse_faults
from services.feedsim.__main__ import parse_settings
from services.feedsim.emitlog import LineFile
from services.feedsim.faults import FaultInjector, parse_duration
from services.feedsim.market import Market, ProductModel, derive_spec, fmt_price, fmt_size
from services.feedsim.protocol import AUTH_REASON, encode, parse_command
from services.feedsim.settings import clock_sequence_base

from .helpers import check_ticker

VALID = {"BTC-USD", "ETH-USD"}
CHANNELS = {"ticker", "heartbeat", "matches", "status"}


def _errors(raw: Any) -> list[dict[str, Any]]:
    text = raw if isinstance(raw, str) else json.dumps(raw)
    cmd = parse_command(text, valid_products=VALID, allowed_channels=CHANNELS)
    return [json.loads(e) for e in cmd.errors]


def test_root_and_per_channel_products() -> None:
    """Root product ids apply to bare channel names; channel objects bring their own."""
    cmd = parse_command(
        json.dumps(
            {
                "type": "subscribe",
                "product_ids": ["BTC-USD"],
                "channels": ["ticker", {"name": "heartbeat", "product_ids": ["ETH-USD"]}],
            }
        ),
        valid_products=VALID,
        allowed_channels=CHANNELS,
    )
    assert cmd.kind == "subscribe"
    assert cmd.items == [("ticker", "BTC-USD"), ("heartbeat", "ETH-USD")]
    assert cmd.errors == []


@pytest.mark.parametrize(
    ("msg", "reason"),
    [
        (
            {"type": "subscribe", "product_ids": ["XYZ-USD"], "channels": ["ticker"]},
            "XYZ-USD is not a valid product",
        ),
        (
            {"type": "subscribe", "product_ids": ["BTC-USD"], "channels": ["level2"]},
            AUTH_REASON,
        ),
        ({"type": "subscribe", "product_ids": ["BTC-USD"], "channels": ["full"]}, AUTH_REASON),
        ({"type": "subscribe", "product_ids": ["BTC-USD"], "channels": ["user"]}, AUTH_REASON),
        (
            {"type": "subscribe", "product_ids": ["BTC-USD"], "channels": ["bogus"]},
            "bogus is not a valid channel",
        ),
        (
            {"type": "subscribe", "channels": ["heartbeat"]},
            "You need to specify at least one product ID for channel heartbeat",
        ),
        ({"type": "subscribe", "product_ids": ["BTC-USD"]}, "No channels provided"),
    ],
)
def test_subscribe_errors(msg: dict[str, Any], reason: str) -> None:
    """Each invalid part yields one Coinbase-shaped error with the documented reason."""
    errors = _errors(msg)
    assert errors == [{"type": "error", "message": "Failed to subscribe", "reason": reason}]


def test_malformed_client_json() -> None:
    """Unparseable client frames get an error message, not a disconnect."""
    assert _errors("{nope")[0]["type"] == "error"
    assert _errors("[1, 2]")[0]["message"] == "Malformed JSON"
    assert _errors({"type": "hello"})[0]["reason"] == "hello is not a valid message type"
    # nested past msgspec's depth limit: a RecursionError and a traceback, no reply
    assert _errors("[" * 2000)[0]["message"] == "Malformed JSON"


def test_unsubscribe_without_products_drops_channel() -> None:
    """Omitting product ids in an unsubscribe removes the whole channel."""
    cmd = parse_command(
        '{"type":"unsubscribe","channels":["heartbeat"]}',
        valid_products=VALID,
        allowed_channels=CHANNELS,
    )
    assert cmd.items == [("heartbeat", None)]
    assert cmd.errors == []


def test_fault_spec_parsing() -> None:
    """Probabilities, durations and the stall period parse; str() round-trips."""
    spec = parse_faults("gap=0.01,dup=0.02,malformed=0.001,reorder=0.1,disconnect=30s,stall=5s")
    assert (spec.gap, spec.dup, spec.malformed, spec.reorder) == (0.01, 0.02, 0.001, 0.1)
    assert spec.disconnect_every_s == 30.0
    assert (spec.stall_s, spec.stall_every_s) == (5.0, 30.0)
    assert parse_faults("stall=500ms@2s").stall_every_s == 2.0
    assert parse_faults(str(spec)) == spec
    assert parse_duration("2m") == 120.0


@pytest.mark.parametrize(
    "bad",
    ["explode=0.1", "gap=2", "gap=x", "gap", "disconnect=soon", "gap=0.6,dup=0.6", "stall=5s@1s"],
)
def test_fault_spec_rejects(bad: str) -> None:
    """Unknown kinds, bad numbers and impossible combinations are refused up front."""
    with pytest.raises(FaultSpecError):
        parse_faults(bad)


def test_fault_decisions_are_deterministic() -> None:
    """Same seed and product: the same tickers get the same faults."""
    spec = parse_faults("gap=0.1,dup=0.1,malformed=0.1,reorder=0.1")
    a, b = FaultInjector(spec, 7), FaultInjector(spec, 7)
    assert [a.decide("BTC-USD") for _ in range(500)] == [b.decide("BTC-USD") for _ in range(500)]
    kinds = {a.decide("ETH-USD") for _ in range(500)}
    assert kinds == {None, "gap", "dup", "malformed", "reorder"}


def test_exact_decimal_formatting() -> None:
    """Integers in ticks/units format exactly; prices drop trailing zeros like the feed."""
    assert fmt_price(6_500_000, 2) == "65000"
    assert fmt_price(131_380, 2) == "1313.8"
    assert fmt_price(1_500, 4) == "0.15"
    assert fmt_size(1) == "0.00000001"
    assert fmt_size(1_234_567_890) == "12.34567890"
    assert fmt_price(5, 4) == "0.0005"
    assert fmt_size(123_456_789) == "1.23456789"


def test_tick_sizes() -> None:
    """Known products use Coinbase quote increments; other names get a stable derived one."""
    assert derive_spec("BTC-USD").quote_increment == "0.01"
    assert derive_spec("ADA-USD").quote_increment == "0.0001"
    assert derive_spec("SIM0042-USD") == derive_spec("SIM0042-USD")
    assert derive_spec("SIM0042-USD").quote_decimals in (2, 4, 5)


def _stream(model: ProductModel, n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        msg = msgspec.json.decode(encode(model.step(i, "2024-01-01T00:00:00.000000Z")))
        out.append(msg)
    return out


@pytest.mark.parametrize("product", ["BTC-USD", "DOGE-USD", "SIM0007-USD"])
def test_model_invariants(product: str) -> None:
    """Every step is a valid ticker on the product's tick grid with monotonic ids."""
    spec = derive_spec(product)
    model = ProductModel(spec, seed=3, now_ns=0)
    prev_seq, prev_trade = model.sequence, model.trade_id
    step = Decimal(spec.quote_increment)
    for msg in _stream(model, 2_000):
        check_ticker(msg)
        assert Decimal(msg["price"]) % step == 0
        assert msg["sequence"] > prev_seq
        assert msg["trade_id"] >= prev_trade + 1
        prev_seq, prev_trade = msg["sequence"], msg["trade_id"]


def test_product_stream_independent_of_other_products() -> None:
    """A product's stream depends on seed and name only, not on which others exist."""
    a = Market(["BTC-USD"], seed=5, skew=0.5, now_ns=0).models["BTC-USD"]
    b = Market(["ETH-USD", "BTC-USD", "SIM0001-USD"], seed=5, skew=0.5, now_ns=0).models["BTC-USD"]
    assert _stream(a, 300) == _stream(b, 300)
    c = Market(["BTC-USD"], seed=6, skew=0.5, now_ns=0).models["BTC-USD"]
    assert _stream(c, 50) != _stream(
        Market(["BTC-USD"], seed=5, skew=0.5, now_ns=0).models["BTC-USD"], 50
    )


def test_sequence_base_shifts_sequences_only() -> None:
    """--sequence-base lifts every sequence by the same amount; prices and sizes are unchanged."""
    plain = _stream(Market(["BTC-USD"], seed=5, skew=0.5, now_ns=0).models["BTC-USD"], 50)
    lifted = _stream(
        Market(["BTC-USD"], seed=5, skew=0.5, now_ns=0, sequence_base=10**12).models["BTC-USD"],
        50,
    )
    assert [m["sequence"] - 10**12 for m in lifted] == [m["sequence"] for m in plain]
    assert [m["price"] for m in lifted] == [m["price"] for m in plain]
    assert parse_settings(["--sequence-base", "5"]).sequence_base == 5
    # 'clock' (make demo, make run-feedsim): microseconds since 2024, so above any earlier run
    before = clock_sequence_base()
    assert before <= parse_settings(["--sequence-base", "clock"]).sequence_base <= before + 10**7


def test_env_and_cli_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """FEEDSIM_* env vars configure the simulator; CLI flags override them."""
    monkeypatch.setenv("FEEDSIM_PRODUCTS", "BTC-USD, ETH-USD")
    monkeypatch.setenv("FEEDSIM_FAULTS", "gap=0.1,stall=1s@5s")
    monkeypatch.setenv("FEEDSIM_SPEED", "max")
    monkeypatch.setenv("FEEDSIM_RATE", "50")
    settings = FeedSimSettings()
    assert settings.product_ids == ["BTC-USD", "ETH-USD"]
    assert (settings.faults.gap, settings.faults.stall_every_s) == (0.1, 5.0)
    assert settings.speed == math.inf
    assert settings.rate == 50
    with pytest.raises(ValueError, match="invalid product id"):
        FeedSimSettings(products=["btc usd"])
    cli = parse_settings(["--rate", "7", "--num-products", "2"])
    assert cli.rate == 7
    assert cli.product_ids == ["BTC-USD", "ETH-USD", "SIM0001-USD", "SIM0002-USD"]


async def test_lines_of_a_cancelled_flush_are_written_before_close(tmp_path: Path) -> None:
    """stop() cancels the task that flushes the emit/delivery log, possibly while its lines
    are on their way to the worker thread: close() must still write them (a replay of the
    emit log once found it empty)."""
    path = tmp_path / "lines.jsonl"
    log = await LineFile.open(path)
    lines = [b'{"n":%d}\n' % n for n in range(1000)]
    for line in lines:
        log.append(line)
    flushing = asyncio.create_task(log.flush())
    await asyncio.sleep(0)  # the flush has handed its lines to the thread
    flushing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await flushing
    await log.close()
    assert path.read_bytes() == b"".join(lines)
