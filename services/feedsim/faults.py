"""Fault injection: the ``--faults`` spec, per-ticker decisions, broken frames and counters.

Per-ticker faults (gap, dup, malformed, reorder) are drawn from a per-product RNG seeded
from ``--seed`` and the product id, so for the same seed they hit the same tickers of a
product whatever the rate, timing or the set of other products. Connection faults
(disconnect, stall) are time-scheduled by the simulator; this module only parses and
counts them.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgspec

from services.feedsim.errors import FaultSpecError


class Fault(StrEnum):
    GAP = "gap"
    DUP = "dup"
    MALFORMED = "malformed"
    REORDER = "reorder"
    DISCONNECT = "disconnect"
    STALL = "stall"


TICK_FAULTS = (Fault.GAP, Fault.DUP, Fault.MALFORMED, Fault.REORDER)
MALFORMED_VARIANTS = ("non_json", "no_product_id", "bad_price")
DEFAULT_STALL_EVERY_S = 30.0

_DURATION = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(ms|s|m)?$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}


def parse_duration(text: str) -> float:
    """``"30s"``, ``"500ms"``, ``"2m"`` or a bare number of seconds → seconds (> 0)."""
    m = _DURATION.match(text.strip())
    if m is None:
        raise ValueError(f"bad duration {text!r} (use e.g. 30s, 500ms, 2m)")
    seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be > 0")
    return seconds


def _fmt_duration(seconds: float) -> str:
    return f"{seconds:g}s"


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """Parsed ``--faults``; probabilities are per ticker, durations in seconds."""

    gap: float = 0.0
    dup: float = 0.0
    malformed: float = 0.0
    reorder: float = 0.0
    disconnect_every_s: float | None = None
    stall_s: float | None = None
    stall_every_s: float = DEFAULT_STALL_EVERY_S

    @property
    def tick_faults(self) -> bool:
        return (self.gap + self.dup + self.malformed + self.reorder) > 0

    def __str__(self) -> str:
        parts = [f"{k}={getattr(self, k):g}" for k in TICK_FAULTS if getattr(self, k) > 0]
        if self.disconnect_every_s is not None:
            parts.append(f"disconnect={_fmt_duration(self.disconnect_every_s)}")
        if self.stall_s is not None:
            parts.append(f"stall={_fmt_duration(self.stall_s)}@{_fmt_duration(self.stall_every_s)}")
        return ",".join(parts)


def _parse_item(spec: str, key: str, value: str) -> dict[str, float]:
    if key in TICK_FAULTS:
        try:
            p = float(value)
        except ValueError:
            raise FaultSpecError(spec, f"{key}: {value!r} is not a probability") from None
        if not 0.0 <= p <= 1.0:
            raise FaultSpecError(spec, f"{key}: probability {value} is not within [0, 1]")
        return {key: p}
    try:
        if key == Fault.DISCONNECT:
            return {"disconnect_every_s": parse_duration(value)}
        if key == Fault.STALL:
            length, _, every = value.partition("@")
            out = {"stall_s": parse_duration(length)}
            if every:
                out["stall_every_s"] = parse_duration(every)
            return out
    except ValueError as exc:
        raise FaultSpecError(spec, f"{key}: {exc}") from None
    known = ", ".join(f.value for f in Fault)
    raise FaultSpecError(spec, f"unknown fault kind {key!r} (known: {known})")


def parse_faults(spec: str) -> FaultSpec:
    """Parse ``gap=P,dup=P,malformed=P,reorder=P,disconnect=30s,stall=5s[@30s]``."""
    values: dict[str, Any] = {}
    seen: set[str] = set()
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or not value:
            raise FaultSpecError(spec, f"{item!r} is not KIND=VALUE")
        if key in seen:
            raise FaultSpecError(spec, f"{key} given twice")
        seen.add(key)
        values.update(_parse_item(spec, key, value))
    total = sum(values.get(k, 0.0) for k in TICK_FAULTS)
    if total > 1.0:
        raise FaultSpecError(spec, f"gap+dup+malformed+reorder = {total:g} > 1")
    stall_s, every = values.get("stall_s"), values.get("stall_every_s", DEFAULT_STALL_EVERY_S)
    if stall_s is not None and stall_s >= every:
        raise FaultSpecError(spec, "a stall must be shorter than its period (stall=LEN@EVERY)")
    return FaultSpec(**values)


def derive_seed(*parts: object) -> int:
    """A stable 64-bit seed from any parts (Python's ``hash`` is salted per process)."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


@dataclass(slots=True)
class FaultCounters:
    """Every injected fault, by kind and by product (connection faults have no product)."""

    by_kind: dict[str, int] = field(default_factory=lambda: dict.fromkeys(Fault, 0))
    by_product: dict[str, dict[str, int]] = field(default_factory=dict)
    malformed_variants: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(MALFORMED_VARIANTS, 0)
    )
    clients_disconnected: int = 0
    clients_stalled: int = 0

    def count(self, kind: Fault, product_id: str | None = None) -> None:
        self.by_kind[kind] += 1
        if product_id is not None:
            per = self.by_product.get(product_id)
            if per is None:
                per = self.by_product[product_id] = {}
            per[kind] = per.get(kind, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "by_kind": {str(k): v for k, v in self.by_kind.items()},
            "malformed_variants": dict(self.malformed_variants),
            "clients_disconnected": self.clients_disconnected,
            "clients_stalled": self.clients_stalled,
        }


_json_decode = msgspec.json.Decoder().decode
_json_encode = msgspec.json.Encoder().encode


class FaultInjector:
    """Decides, per ticker, which fault (if any) applies, and builds broken frames."""

    def __init__(self, spec: FaultSpec, seed: int) -> None:
        self.spec = spec
        self._seed = seed
        self._rngs: dict[str, random.Random] = {}
        self._variant_rr: dict[str, int] = {}
        # Cumulative thresholds over one uniform draw: at most one fault per ticker.
        acc = 0.0
        self._thresholds: list[tuple[float, Fault]] = []
        for kind in TICK_FAULTS:
            p = float(getattr(spec, kind))
            if p > 0:
                acc += p
                self._thresholds.append((acc, kind))

    def _rng(self, product_id: str) -> random.Random:
        rng = self._rngs.get(product_id)
        if rng is None:
            rng = self._rngs[product_id] = random.Random(
                derive_seed(self._seed, product_id, "faults")
            )
        return rng

    def decide(self, product_id: str) -> Fault | None:
        """Draw the fault for the product's next ticker (one draw per ticker, always)."""
        u = self._rng(product_id).random()
        for threshold, kind in self._thresholds:
            if u < threshold:
                return kind
        return None

    def malformed(self, product_id: str, frame: bytes) -> tuple[str, bytes]:
        """A broken stand-in for ``frame``; variants rotate per product (deterministic)."""
        n = self._variant_rr.get(product_id, 0)
        self._variant_rr[product_id] = n + 1
        variant = MALFORMED_VARIANTS[n % len(MALFORMED_VARIANTS)]
        if variant == "non_json":
            # A frame cut short mid-object, as a truncated write would leave it (still UTF-8).
            return variant, frame[: max(1, len(frame) // 2)]
        msg = _json_decode(frame)
        if variant == "no_product_id":
            msg.pop("product_id", None)
        else:
            msg["price"] = "not-a-number"
        return variant, _json_encode(msg)
