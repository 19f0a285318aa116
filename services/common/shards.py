"""Shard ownership of a replica (``NORMALIZER_SHARDS``, ``SNAPSHOTTER_SHARDS``)."""

from __future__ import annotations

from services.common.settings import split_csv


def parse_shards(value: object) -> object:
    """``"0,1"`` → ``["0", "1"]`` for pydantic to type; empty or ``all`` → ``None``."""
    if value in ("", "all", None):
        return None
    return split_csv(value)


def check_shards(shards: list[int] | None, num_shards: int, env: str) -> list[int] | None:
    """Sorted, unique, each within ``0..NUM_SHARDS-1``; ``None`` means every shard."""
    if shards is None:
        return None
    bad = [s for s in shards if not 0 <= s < num_shards]
    if bad or not shards:
        raise ValueError(f"{env} must be within 0..{num_shards - 1} (got {bad})")
    return sorted(set(shards))


def owned_shards(shards: list[int] | None, num_shards: int) -> frozenset[int]:
    return frozenset(shards if shards is not None else range(num_shards))


def shard_tag(shards: list[int] | None, num_shards: int) -> str:
    """``""`` for a replica owning every shard, else ``s0-1``: part of its durable name."""
    owned = owned_shards(shards, num_shards)
    if len(owned) == num_shards:
        return ""
    return "s" + "-".join(str(s) for s in sorted(owned))
