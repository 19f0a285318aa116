r"""Write realistic Coinbase Exchange ``ticker`` messages (JSONL) for the cryptofeed baseline.

Runs with the project's Python (3.12), stdlib only by default:

    cd /work/main && python -m uv run python bench/cryptofeed/make_sample.py OUT.jsonl \
        [-n 20000] [--seed 7] [--source builtin|feedsim]

``--source feedsim`` takes the frames from ``bench.frames.ticker_frames`` (our feed simulator)
instead of the built-in generator, so the baseline sees exactly the tickers our own benches use.

The built-in generator is deterministic for a given seed: a weighted mix of real Coinbase
products (BTC-USD dominates, as on the live feed), a tick-size-aware random walk per product,
the trade printed at the ask for taker buys and at the bid for taker sells, per-product
``sequence`` and ``trade_id`` that increase with gaps, running 24h/30d statistics, and
microsecond ``time`` stamps in Coinbase's ``...Z`` format. Field order is Coinbase's.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path


@dataclass(frozen=True)
class ProductSpec:
    product_id: str
    price: str  # starting price
    quote_increment: str  # tick size
    base_increment: str  # size granularity
    weight: float  # share of the trade stream
    typical_size: float  # median trade size in base units


# Weights roughly follow the live ticker stream's trade counts; prices are ballpark.
PRODUCTS: tuple[ProductSpec, ...] = (
    ProductSpec("BTC-USD", "65000.00", "0.01", "0.00000001", 30, 0.02),
    ProductSpec("ETH-USD", "3200.00", "0.01", "0.00000001", 20, 0.3),
    ProductSpec("SOL-USD", "150.00", "0.01", "0.00000001", 12, 4.0),
    ProductSpec("XRP-USD", "0.5500", "0.0001", "0.000001", 8, 800.0),
    ProductSpec("DOGE-USD", "0.12000", "0.00001", "0.1", 6, 3000.0),
    ProductSpec("USDT-USD", "1.00010", "0.00001", "0.01", 4, 2500.0),
    ProductSpec("ADA-USD", "0.4500", "0.0001", "0.01", 4, 1500.0),
    ProductSpec("AVAX-USD", "35.00", "0.01", "0.00000001", 4, 20.0),
    ProductSpec("LINK-USD", "15.000", "0.001", "0.01", 4, 50.0),
    ProductSpec("LTC-USD", "80.00", "0.01", "0.00000001", 3, 5.0),
    ProductSpec("BTC-EUR", "60000.00", "0.01", "0.00000001", 3, 0.01),
    ProductSpec("ETH-BTC", "0.05000", "0.00001", "0.00000001", 2, 0.5),
)

START = datetime(2026, 1, 15, 14, 0, 0, tzinfo=UTC)


def fmt_price(ticks: int, tick: Decimal) -> str:
    """Coinbase prints prices without trailing zeros: "64993.5", "3200"."""
    return format((tick * ticks).normalize(), "f")


def fmt_size(value: Decimal, increment: Decimal) -> str:
    """Sizes are printed fixed to the product's base increment: "0.00279197"."""
    return format(value.quantize(increment), "f")


def fmt_time(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class ProductState:
    spec: ProductSpec
    rng: random.Random
    tick: Decimal = field(init=False)
    base_inc: Decimal = field(init=False)
    mid_ticks: int = field(init=False)
    open_ticks: int = field(init=False)
    low_ticks: int = field(init=False)
    high_ticks: int = field(init=False)
    volume_24h: Decimal = field(init=False)
    volume_30d: Decimal = field(init=False)
    sequence: int = field(init=False)
    trade_id: int = field(init=False)

    def __post_init__(self) -> None:
        self.tick = Decimal(self.spec.quote_increment)
        self.base_inc = Decimal(self.spec.base_increment)
        self.mid_ticks = int(Decimal(self.spec.price) / self.tick)
        self.open_ticks = self.mid_ticks
        swing = max(2, self.mid_ticks // 33)  # ~3% either side for the day so far
        self.low_ticks = self.mid_ticks - swing
        self.high_ticks = self.mid_ticks + swing
        daily = Decimal(str(self.spec.typical_size * 20_000))
        self.volume_24h = (daily * Decimal(str(self.rng.uniform(0.7, 1.3)))).quantize(self.base_inc)
        self.volume_30d = (self.volume_24h * 30).quantize(self.base_inc)
        self.sequence = self.rng.randrange(10**9, 10**11)
        self.trade_id = self.rng.randrange(10**7, 10**9)

    def step(self, now: datetime) -> dict[str, object]:
        rng = self.rng
        # random walk in ticks, scaled so low-priced products still move occasionally
        scale = max(1, self.mid_ticks // 20_000)
        self.mid_ticks = max(2, self.mid_ticks + round(rng.gauss(0, 1.5) * scale))
        spread = 1 if rng.random() < 0.8 else rng.randint(2, 4)
        best_bid = self.mid_ticks
        best_ask = self.mid_ticks + spread
        side = "buy" if rng.random() < 0.5 else "sell"  # ticker side is the taker side
        price = best_ask if side == "buy" else best_bid
        self.low_ticks = min(self.low_ticks, price)
        self.high_ticks = max(self.high_ticks, price)

        size = Decimal(str(rng.lognormvariate(0, 1.4) * self.spec.typical_size)).quantize(
            self.base_inc
        )
        if size <= 0:
            size = self.base_inc
        self.volume_24h += size
        self.volume_30d += size
        self.sequence += rng.randint(1, 60)  # other channels' messages share the sequence
        self.trade_id += 1 if rng.random() < 0.9 else rng.randint(2, 4)

        def book_size() -> str:
            return fmt_size(
                Decimal(str(rng.lognormvariate(0, 1.0) * self.spec.typical_size * 3)), self.base_inc
            )

        return {
            "type": "ticker",
            "sequence": self.sequence,
            "product_id": self.spec.product_id,
            "price": fmt_price(price, self.tick),
            "open_24h": fmt_price(self.open_ticks, self.tick),
            "volume_24h": fmt_size(self.volume_24h, self.base_inc),
            "low_24h": fmt_price(self.low_ticks, self.tick),
            "high_24h": fmt_price(self.high_ticks, self.tick),
            "volume_30d": fmt_size(self.volume_30d, self.base_inc),
            "best_bid": fmt_price(best_bid, self.tick),
            "best_bid_size": book_size(),
            "best_ask": fmt_price(best_ask, self.tick),
            "best_ask_size": book_size(),
            "side": side,
            "time": fmt_time(now),
            "trade_id": self.trade_id,
            "last_size": fmt_size(size, self.base_inc),
        }


def builtin_lines(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    states = [ProductState(spec, random.Random(rng.getrandbits(64))) for spec in PRODUCTS]
    weights = [spec.weight for spec in PRODUCTS]
    now = START
    out: list[bytes] = []
    for _ in range(n):
        now += timedelta(
            microseconds=max(1, round(rng.expovariate(1 / 400)))
        )  # ~2.5k trades/s overall
        state = rng.choices(states, weights)[0]
        out.append(json.dumps(state.step(now), separators=(",", ":")).encode())
    return out


def feedsim_lines(n: int, seed: int) -> list[bytes]:
    root = Path(__file__).resolve().parents[2]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from bench.frames import ticker_frames
    except ImportError as exc:  # pragma: no cover - depends on the rest of the repo
        raise SystemExit(
            f"--source feedsim needs bench.frames / services.feedsim importable: {exc}"
        ) from exc
    return [
        data for _product, data in ticker_frames(n, [p.product_id for p in PRODUCTS], seed=seed)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="output JSONL path")
    parser.add_argument(
        "-n", "--count", type=int, default=20_000, help="number of ticker messages (default 20000)"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--source", choices=("builtin", "feedsim"), default="builtin")
    args = parser.parse_args(argv)
    if args.count <= 0:
        parser.error("--count must be positive")

    lines = (
        builtin_lines(args.count, args.seed)
        if args.source == "builtin"
        else feedsim_lines(args.count, args.seed)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(b"\n".join(lines) + b"\n")
    print(
        f"wrote {len(lines)} ticker messages to {args.out} "
        f"(source={args.source}, seed={args.seed})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
