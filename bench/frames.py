"""Realistic Coinbase ticker frames for benchmarks, from feedsim's deterministic market."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec

from services.feedsim.market import CLOCK, ProductModel, derive_spec

_encoder = msgspec.json.Encoder()


def ticker_frames(n: int, products: list[str], seed: int = 7) -> list[tuple[str, bytes]]:
    """``n`` (product, raw ticker bytes) pairs, products round-robin, as Coinbase sends them."""
    now = time.time_ns()
    models = [ProductModel(derive_spec(p), seed, now) for p in products]
    out = []
    for i in range(n):
        model = models[i % len(models)]
        ns = now + i * 1000
        out.append((model.product_id, _encoder.encode(model.step(ns, CLOCK.micros(ns)))))
    return out


def synthetic_products(n: int) -> list[str]:
    return [f"SIM{i:04d}-USD" for i in range(n)]


def write_jsonl(frames: list[tuple[str, bytes]], path: Path) -> None:
    path.write_bytes(b"\n".join(data for _product, data in frames) + b"\n")
