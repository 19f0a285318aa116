"""Subject helpers: where a product's ticks live and which filters a replica consumes."""

from __future__ import annotations

from services.common.subjects import shard_of, tick_filters, tick_subject


def test_a_replica_owning_every_shard_consumes_one_wildcard() -> None:
    """Several filter subjects make nats-server serve a consumer ~15x slower."""
    assert tick_filters(frozenset(range(4)), 4) == ["md.ticks.>"]


def test_a_replica_owning_some_shards_filters_exactly_those() -> None:
    assert tick_filters(frozenset({2, 0}), 4) == ["md.ticks.0.>", "md.ticks.2.>"]
    subject = tick_subject("BTC-USD", 4)
    assert subject == f"md.ticks.{shard_of('BTC-USD', 4)}.BTC-USD"
