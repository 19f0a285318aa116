"""Deterministic market model: a per-product random walk in integer ticks.

All amounts are integers (price in quote ticks, sizes and volumes in 1e-8 base units)
and are formatted to decimal strings exactly, never through float formatting.

Determinism: each product draws from its own ``random.Random`` seeded from ``--seed``
and the product id, so a product's ticker stream (everything except ``time``) is the
same for the same seed whatever the rate, the batching, the timing or the other
products. Which product ticks next is drawn from a separate scheduler RNG.
"""

from __future__ import annotations

import itertools
import random
import time
import uuid
from dataclasses import dataclass

from services.feedsim.faults import derive_seed
from services.feedsim.protocol import (
    Heartbeat,
    LastMatch,
    Match,
    StatusCurrency,
    StatusProduct,
    Ticker,
)

SIZE_DECIMALS = 8
SIZE_SCALE = 10**SIZE_DECIMALS
SIZE_TABLE = 256  # distinct fill / book-level sizes per product
PRICE_CACHE = 8_192  # formatted price levels kept per product

# Start price and quote decimals (Coinbase quote_increment) of well-known products.
KNOWN_PRODUCTS: dict[str, tuple[str, int]] = {
    "BTC-USD": ("65000.00", 2),
    "BTC-EUR": ("60000.00", 2),
    "BTC-GBP": ("52000.00", 2),
    "ETH-USD": ("3200.00", 2),
    "ETH-EUR": ("2950.00", 2),
    "ETH-BTC": ("0.04900", 5),
    "SOL-USD": ("150.00", 2),
    "LTC-USD": ("80.00", 2),
    "LINK-USD": ("14.000", 3),
    "ADA-USD": ("0.4500", 4),
    "XRP-USD": ("0.6000", 4),
    "DOGE-USD": ("0.15000", 5),
}


@dataclass(frozen=True, slots=True)
class ProductSpec:
    product_id: str
    base: str
    quote: str
    quote_decimals: int
    start_ticks: int

    @property
    def quote_increment(self) -> str:
        return fmt_fixed(1, self.quote_decimals)


def _ticks(price: str, decimals: int) -> int:
    whole, _, frac = price.partition(".")
    return int(whole) * int(10**decimals) + int((frac + "0" * decimals)[:decimals] or "0")


def derive_spec(product_id: str) -> ProductSpec:
    """Known products use realistic figures; any other name gets a stable derived one."""
    base, _, quote = product_id.partition("-")
    known = KNOWN_PRODUCTS.get(product_id)
    if known is not None:
        price, decimals = known
        return ProductSpec(product_id, base, quote, decimals, _ticks(price, decimals))
    h = derive_seed("spec", product_id)  # independent of --seed: a name is a market
    start = 10 ** (-1.3 + 6.0 * (h % 1_000_003) / 1_000_003)  # ~0.05 .. ~50,000
    decimals = 2 if start >= 10 else 4 if start >= 0.1 else 5
    return ProductSpec(product_id, base, quote, decimals, max(100, int(start * 10**decimals)))


def fmt_fixed(units: int, decimals: int) -> str:
    """``units`` of 10**-decimals, with exactly ``decimals`` fraction digits."""
    if decimals == 0:
        return str(units)
    whole, frac = divmod(units, 10**decimals)
    return f"{whole}.{frac:0{decimals}d}"


def fmt_price(ticks: int, decimals: int) -> str:
    """Prices as the ws ticker shows them: trailing zeros dropped ("1313.8", "15460")."""
    text = str(ticks)
    if decimals == 0:
        return text
    if len(text) <= decimals:
        text = text.zfill(decimals + 1)
    whole, frac = text[:-decimals], text[-decimals:].rstrip("0")
    return f"{whole}.{frac}" if frac else whole


def fmt_size(units: int) -> str:
    """Sizes and volumes: always 8 fraction digits ("0.00000138", "245532.79269678")."""
    # String slicing: ~2x cheaper than a "%08d" format, and this runs 2x per tick.
    text = str(units)
    if len(text) > SIZE_DECIMALS:
        return f"{text[:-SIZE_DECIMALS]}.{text[-SIZE_DECIMALS:]}"
    return "0." + text.zfill(SIZE_DECIMALS)


def _log_grid(lo: float, hi: float) -> list[float]:
    return [10 ** (lo + (hi - lo) * i / (SIZE_TABLE - 1)) for i in range(SIZE_TABLE)]


# Quote-currency values of fills (~$10..~$30k) and book levels (~$100..~$100k): a
# log-spaced grid; a uniform index into it gives log-uniform sizes.
_FILL_VALUES = _log_grid(1.0, 4.5)
_LEVEL_VALUES = _log_grid(2.0, 5.0)


def _size_table(units_per_quote: float, values: list[float]) -> list[tuple[int, str]]:
    """The product's sizes for ``values``, pre-formatted: the hot path only indexes."""
    return [(size, fmt_size(size)) for size in (1 + int(units_per_quote * v) for v in values)]


class IsoClock:
    """RFC 3339 UTC strings from ``time_ns`` values, caching the per-second prefix."""

    __slots__ = ("_prefix", "_sec")

    def __init__(self) -> None:
        self._sec = -1
        self._prefix = ""

    def _head(self, sec: int) -> str:
        if sec != self._sec:
            self._sec = sec
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return self._prefix

    def micros(self, ns: int) -> str:
        """ws feed format: 6 fraction digits and Z."""
        sec, rem = divmod(ns, 1_000_000_000)
        return f"{self._head(sec)}.{rem // 1000:06d}Z"

    def nanos(self, ns: int) -> str:
        """REST format: 9 fraction digits and Z."""
        sec, rem = divmod(ns, 1_000_000_000)
        return f"{self._head(sec)}.{rem:09d}Z"


CLOCK = IsoClock()


def _mix64(x: int) -> int:
    # splitmix64 finalizer: cheap, stable ids without touching the market RNG.
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


class ProductModel:
    """One product's market: ``step()`` makes the next (possibly cascaded) trade."""

    __slots__ = (
        "_book_sizes",
        "_cascade",
        "_ceil",
        "_decimals",
        "_floor",
        "_high_s",
        "_id_salt",
        "_low_s",
        "_open_s",
        "_pcache",
        "_r",
        "_step",
        "_trade_sizes",
        "held",
        "high",
        "last",
        "last_frame",
        "last_ns",
        "low",
        "price",
        "product_id",
        "sequence",
        "spec",
        "ticks",
        "trade_id",
        "volume_24h",
        "volume_30d",
    )

    def __init__(self, spec: ProductSpec, seed: int, now_ns: int, sequence_base: int = 0) -> None:
        self.spec = spec
        self.product_id = spec.product_id
        self._r = random.Random(derive_seed(seed, spec.product_id, "market")).random
        r = self._r
        self._decimals = dec = spec.quote_decimals
        start = spec.start_ticks
        self.price = start
        self._step = max(1, start // 20_000)  # ~0.5 bp of the start price per step
        self._floor = max(start // 3, 8 * self._step)
        self._ceil = start * 3
        self.low = start - start * 3 // 100
        self.high = start + start * 3 // 100
        self._pcache: dict[int, str] = {}
        self._open_s = fmt_price(start, dec)
        self._low_s = fmt_price(self.low, dec)
        self._high_s = fmt_price(self.high, dec)
        upq = SIZE_SCALE * 10**dec / start  # base units per 1 unit of quote currency
        self._trade_sizes = _size_table(upq, _FILL_VALUES)
        self._book_sizes = _size_table(upq, _LEVEL_VALUES)
        self._id_salt = derive_seed(seed, spec.product_id, "ids")
        self.sequence = sequence_base + 100_000_000 + int(r() * 9_000_000_000)
        self.trade_id = 1_000_000 + int(r() * 900_000_000)
        self.volume_24h = int(upq * 10 ** (7.5 + 1.5 * r()))  # $30M..$1B a day
        self.volume_30d = self.volume_24h * 25 + int(upq * 10 ** (8 + 2 * r()))
        # (sequence, (size, size text)) of each fill of the last step
        self._cascade: list[tuple[int, tuple[int, str]]] = []
        self.ticks = 0
        self.held: tuple[bytes, int] | None = None  # a ticker kept back by the reorder fault
        self.last_frame = b""
        self.last_ns = now_ns
        # The "last trade" before the feed starts: what a subscriber's first ticker shows.
        self.last = self.step(now_ns, CLOCK.micros(now_ns))

    def step(self, now_ns: int, time_s: str) -> Ticker:
        """The next trade (a cascade of 1-5 fills at one price) as its ticker."""
        r = self._r
        step = self._step
        delta = int((r() - 0.5) * 7.0)  # -3..3 steps, 0 most likely
        price = self.price + delta * step
        if not self._floor <= price <= self._ceil:
            price = self.price - delta * step  # reflect: keep the walk in a sane band
        self.price = price
        if delta > 0:
            side = "buy"
        elif delta < 0:
            side = "sell"
        else:
            side = "buy" if r() < 0.5 else "sell"

        u = r()
        fills = 1 if u < 0.75 else 2 + int((u - 0.75) * 16)  # cascades batch into one ticker
        # Ticker sequences skip numbers: the product's sequence space is shared with every
        # other order event (open/done/change...), of which the ticker shows only matches.
        seq = self.sequence + 1 + int(r() * r() * 400)
        trade_sizes = self._trade_sizes
        fill = trade_sizes[int(r() * SIZE_TABLE)]
        cascade = [(seq, fill)]
        total = fill[0]
        for _ in range(fills - 1):
            seq += 1 + int(r() * 3)
            fill = trade_sizes[int(r() * SIZE_TABLE)]
            cascade.append((seq, fill))
            total += fill[0]
        self._cascade = cascade
        self.sequence = seq
        self.trade_id += fills

        near, far = int(r() * 2), 1 + int(r() * 3)  # the taker hit the touch
        if side == "buy":
            ask, bid = price + near, price - far
        else:
            bid, ask = price - near, price + far
        book_sizes = self._book_sizes
        bid_size = book_sizes[int(r() * SIZE_TABLE)][1]
        ask_size = book_sizes[int(r() * SIZE_TABLE)][1]

        if price < self.low:
            self.low = price
            self._low_s = self._fmt(price)
        elif price > self.high:
            self.high = price
            self._high_s = self._fmt(price)
        self.volume_24h += total
        self.volume_30d += total
        self.last_ns = now_ns
        cache = self._pcache
        # Positional: msgspec's keyword init costs ~1 us more, and this runs every tick.
        ticker = Ticker(
            seq,  # sequence
            self.product_id,
            cache.get(price) or self._fmt(price),  # price
            self._open_s,
            fmt_size(self.volume_24h),
            self._low_s,
            self._high_s,
            fmt_size(self.volume_30d),
            cache.get(bid) or self._fmt(bid),  # best_bid
            bid_size,
            cache.get(ask) or self._fmt(ask),  # best_ask
            ask_size,
            side,
            time_s,
            self.trade_id,
            fill[1],  # last_size
        )
        self.last = ticker
        return ticker

    def _fmt(self, ticks: int) -> str:
        cache = self._pcache
        if len(cache) >= PRICE_CACHE:
            cache.clear()
        text = cache[ticks] = fmt_price(ticks, self._decimals)
        return text

    def _order_id(self, trade_id: int, role: int) -> str:
        hi = _mix64(self._id_salt ^ (trade_id * 4 + role))
        lo = _mix64(hi ^ role)
        return str(uuid.UUID(int=(hi << 64) | lo, version=4))

    def matches(self) -> list[Match]:
        """One ``match`` per fill of the last step; side is the MAKER side."""
        t = self.last
        maker_side = "sell" if t.side == "buy" else "buy"
        first = t.trade_id - len(self._cascade) + 1
        taker = self._order_id(first, 1)  # one taker order swept the cascade
        return [
            Match(
                trade_id=first + i,
                maker_order_id=self._order_id(first + i, 0),
                taker_order_id=taker,
                side=maker_side,
                size=size,
                price=t.price,
                product_id=self.product_id,
                sequence=seq,
                time=t.time,
            )
            for i, (seq, (_, size)) in enumerate(self._cascade)
        ]

    def last_match(self) -> LastMatch:
        """Sent on subscribing to ``matches``; same sequence as the snapshot ticker."""
        m = self.matches()[-1]
        return LastMatch(
            trade_id=m.trade_id,
            maker_order_id=m.maker_order_id,
            taker_order_id=m.taker_order_id,
            side=m.side,
            size=m.size,
            price=m.price,
            product_id=m.product_id,
            sequence=m.sequence,
            time=m.time,
        )

    def heartbeat(self, now_ns: int) -> Heartbeat:
        return Heartbeat(
            last_trade_id=self.trade_id,
            product_id=self.product_id,
            sequence=self.sequence,
            time=CLOCK.micros(now_ns),
        )

    def rest_ticker(self) -> dict[str, object]:
        """``GET /products/{id}/ticker`` body: the last trade, best bid/ask, 24h volume."""
        t = self.last
        return {
            "ask": t.best_ask,
            "bid": t.best_bid,
            "volume": t.volume_24h,
            "trade_id": t.trade_id,
            "price": t.price,
            "size": t.last_size,
            "time": CLOCK.nanos(self.last_ns),
            "rfq_volume": fmt_size(self.volume_24h // 1000),
        }

    def status_product(self) -> StatusProduct:
        s = self.spec
        return StatusProduct(
            id=s.product_id,
            base_currency=s.base,
            quote_currency=s.quote,
            base_increment=fmt_fixed(1, SIZE_DECIMALS),
            quote_increment=s.quote_increment,
            display_name=s.product_id,
            status="online",
            status_message="",
            min_market_funds="1",
            post_only=False,
            limit_only=False,
            cancel_only=False,
            auction_mode=False,
            type="spot",
        )


class Market:
    """All product models plus the scheduler that splits ``--rate`` across them."""

    def __init__(
        self, product_ids: list[str], *, seed: int, skew: float, now_ns: int, sequence_base: int = 0
    ) -> None:
        self.models = {
            p: ProductModel(derive_spec(p), seed, now_ns, sequence_base)
            for p in dict.fromkeys(product_ids)
        }
        self._order = list(self.models.values())
        weights = [1.0 / (i + 1) ** skew for i in range(len(self._order))]
        self._cum = list(itertools.accumulate(weights))
        self._sched = random.Random(derive_seed(seed, "schedule"))

    def pick(self, n: int) -> list[ProductModel]:
        """Which products make the next ``n`` ticks (skewed towards the first products)."""
        return self._sched.choices(self._order, cum_weights=self._cum, k=n)

    def status(self) -> tuple[list[StatusProduct], list[StatusCurrency]]:
        products = [m.status_product() for m in self._order]
        names = dict.fromkeys(c for m in self._order for c in (m.spec.base, m.spec.quote))
        currencies = [
            StatusCurrency(id=c, name=c, status="online", status_message="") for c in names
        ]
        return products, currencies
