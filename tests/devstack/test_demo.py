"""``make demo`` restarts on a stack that keeps MD_TICKS: feedsim's sequences must start
above what the previous run stored, or the normalizer drops every tick as stale."""

from __future__ import annotations

from services.devstack.demo import demo_sequence_base
from services.feedsim.market import Market


def test_a_later_demo_starts_above_everything_an_earlier_one_emitted() -> None:
    """Run 1 lasts an hour at a high rate; run 2 starts a second after it ended: every
    product's first sequence in run 2 is above its last in run 1."""
    products = ["BTC-USD", "ETH-USD", "DOGE-USD"]
    start = 1_800_000_000.0
    first = Market(products, seed=7, skew=1.0, now_ns=0, sequence_base=demo_sequence_base(start))
    for _ in range(20_000):  # ~ an hour of this product's tickers at the demo's rate
        for product in products:
            first.models[product].step(0, "2026-01-01T00:00:00.000000Z")
    later = Market(
        products, seed=7, skew=1.0, now_ns=0, sequence_base=demo_sequence_base(start + 3601)
    )
    for product in products:
        assert later.models[product].sequence > first.models[product].sequence
