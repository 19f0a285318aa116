"""Normalizer benchmark: µs per frame for decode → validate → encode, and the service's
sustained MD_RAW → MD_TICKS throughput against a real nats-server.

Per frame, on the same recorded ticker frames in the same run:
- ours: ``process_batch`` (msgspec tagged-union decode, checks, canonical encode, routing)
- ours (orjson): the same checks on an ``orjson.loads`` dict, to justify msgspec
- pydantic: a plain pydantic v2 model with Decimal fields and the same checks
- cryptofeed: its Coinbase (Advanced Trade) ``message_handler`` on market_trades frames
  carrying the same trades, in its own Python 3.13 venv (``bench/cryptofeed``)

Service: frames preloaded into MD_RAW, one normalizer process drains them; the baseline in
the same run is nats-py's windowed ``publish_async`` of the same frames.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, field_validator, model_validator

from bench.frames import synthetic_products, ticker_frames, write_jsonl
from services.common.subjects import raw_subject
from services.normalizer.decode import check_time
from services.normalizer.process import RawIn, process_batch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


# -- the per-frame contenders ------------------------------------------------------------


class PydanticTicker(BaseModel):
    type: str
    sequence: int
    product_id: str
    price: Decimal
    time: str
    trade_id: int | None = None
    last_size: Decimal | None = None
    side: str | None = None
    best_bid: Decimal | None = None
    best_bid_size: Decimal | None = None
    best_ask: Decimal | None = None
    best_ask_size: Decimal | None = None
    open_24h: Decimal | None = None
    high_24h: Decimal | None = None
    low_24h: Decimal | None = None
    volume_24h: Decimal | None = None

    @field_validator("time")
    @classmethod
    def _time(cls, value: str) -> str:
        check_time(value)
        return value

    @model_validator(mode="after")
    def _checks(self) -> PydanticTicker:
        if self.price <= 0 or self.side not in ("buy", "sell"):
            raise ValueError("bad value")
        if (
            self.best_bid is not None
            and self.best_ask is not None
            and self.best_bid > self.best_ask
        ):
            raise ValueError("crossed")
        return self


class PydanticTick(BaseModel):
    type: str = "tick"
    v: int = 1
    exchange: str = "coinbase"
    product: str
    seq: int
    trade_id: int | None
    time: str
    recv_ns: int
    price: str
    size: str | None
    side: str | None
    bid: str | None
    bid_size: str | None
    ask: str | None
    ask_size: str | None
    open_24h: str | None
    high_24h: str | None
    low_24h: str | None
    volume_24h: str | None


def _s(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def pydantic_normalize(frames: list[tuple[str, bytes]]) -> int:
    out = 0
    for _product, data in frames:
        t = PydanticTicker.model_validate_json(data)
        tick = PydanticTick(
            product=t.product_id, seq=t.sequence, trade_id=t.trade_id, time=t.time, recv_ns=1,
            price=str(t.price), size=_s(t.last_size), side=t.side, bid=_s(t.best_bid),
            bid_size=_s(t.best_bid_size), ask=_s(t.best_ask), ask_size=_s(t.best_ask_size),
            open_24h=_s(t.open_24h), high_24h=_s(t.high_24h), low_24h=_s(t.low_24h),
            volume_24h=_s(t.volume_24h),
        )  # fmt: skip
        out += len(tick.model_dump_json())
    return out


def orjson_normalize(frames: list[tuple[str, bytes]]) -> int:
    from services.normalizer.decode import DECIMAL_RE  # the same decimal rule as ours

    out = 0
    for product, data in frames:
        m = orjson.loads(data)
        if m.get("type") != "ticker" or m.get("product_id") != product:
            raise ValueError("bad frame")
        for key in ("price", "last_size", "best_bid", "best_bid_size", "best_ask",
                    "best_ask_size", "open_24h", "high_24h", "low_24h", "volume_24h"):  # fmt: skip
            value = m.get(key)
            if value is not None and (type(value) is not str or not DECIMAL_RE.fullmatch(value)):
                raise ValueError(key)
        if not m["price"].strip("0.") or m.get("side") not in ("buy", "sell"):
            raise ValueError("value")
        if Decimal(m["best_bid"]) > Decimal(m["best_ask"]):
            raise ValueError("crossed")
        check_time(m["time"])
        out += len(
            orjson.dumps(
                {
                    "type": "tick",
                    "v": 1,
                    "exchange": "coinbase",
                    "product": product,
                    "seq": m["sequence"],
                    "trade_id": m.get("trade_id"),
                    "time": m["time"],
                    "recv_ns": 1,
                    "price": m["price"],
                    "size": m.get("last_size"),
                    "side": m.get("side"),
                    "bid": m.get("best_bid"),
                    "bid_size": m.get("best_bid_size"),
                    "ask": m.get("best_ask"),
                    "ask_size": m.get("best_ask_size"),
                    "open_24h": m.get("open_24h"),
                    "high_24h": m.get("high_24h"),
                    "low_24h": m.get("low_24h"),
                    "volume_24h": m.get("volume_24h"),
                }
            )
        )
    return out


def ours_normalize(frames: list[tuple[str, bytes]]) -> int:
    raw = [RawIn(raw_subject(p), d, None, i) for i, (p, d) in enumerate(frames)]
    out = 0
    for start in range(0, len(raw), 1024):  # the service's batch size
        result = process_batch(
            raw[start : start + 1024], {}, num_shards=4, owned_shards=frozenset(range(4)),
            now_ns=1,
        )  # fmt: skip
        out += len(result.outputs)
    return out


def best_us_per_frame(
    fn: Callable[[list[tuple[str, bytes]]], int], frames: list[tuple[str, bytes]], repeats: int
) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn(frames)
        best = min(best, time.perf_counter() - started)
    return best / len(frames) * 1e6


def cryptofeed_us(frames: list[tuple[str, bytes]]) -> dict[str, Any] | None:
    setup = ROOT / "bench" / "cryptofeed" / "setup.sh"
    python = ROOT / "bench" / ".venvs" / "cryptofeed" / "bin" / "python"
    if not setup.exists():
        return None
    subprocess.run(["bash", str(setup)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "frames.jsonl"
        write_jsonl(frames, sample)
        done = subprocess.run(
            [str(python), str(ROOT / "bench" / "cryptofeed" / "run.py"), str(sample)],
            check=True, capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {"runs": lines}


# -- the service ---------------------------------------------------------------------------


async def service_throughput(
    frames: list[tuple[str, bytes]], log_dir: Path, replica_counts: tuple[int, ...] = (1, 2)
) -> dict[str, Any]:
    """The baseline publish once, then for each replica count a fresh MD_RAW/MD_TICKS with
    the frames preloaded and that many normalizer processes splitting the shards
    (``NORMALIZER_SHARDS``), timed from the first replica's start until every consumer is
    idle. Two replicas is how the service scales (DESIGN §6); on this 2-core machine they
    share the cores with nats-server."""
    import nats

    from services.common import broker
    from services.common.settings import CommonSettings
    from services.devstack.servers import NatsServer

    out: dict[str, Any] = {"frames": len(frames)}
    for replicas in replica_counts:
        server = NatsServer.on_free_ports(log_dir / f"nats-{replicas}")
        server.start()
        try:
            nc = await nats.connect(server.url)
            settings = CommonSettings(nats_urls=[server.url])
            publisher = broker.Publisher(nc, settings)
            await broker.ensure_streams(publisher.js, settings)
            # the baseline is nats-py's own publish_async (our Publisher is leaner: the
            # service would otherwise be compared with its own publish path)
            js = nc.jetstream(publish_async_max_pending=4096)
            started = time.perf_counter()
            for start in range(0, len(frames), 4096):
                futures = [
                    await js.publish_async(raw_subject(p), d, headers={"Ledgerflux-Recv-Ns": "1"})
                    for p, d in frames[start : start + 4096]
                ]
                await asyncio.gather(*futures)
            if replicas == replica_counts[0]:
                out["baseline_js_publish_per_s"] = len(frames) / (time.perf_counter() - started)
            run = await _drain_with(publisher, server.url, settings.num_shards, replicas, log_dir)
            await nc.close()
        finally:
            server.stop()
        out[f"replicas_{replicas}"] = run
        if replicas == 1:
            out["ticks_stored"] = run["ticks_stored"]
            out["normalizer_ticks_per_s"] = run["ticks_per_s"]
    return out


async def _drain_with(
    publisher: Any, nats_url: str, num_shards: int, replicas: int, log_dir: Path
) -> dict[str, Any]:
    from tests.support.procs import ServiceProcess
    from tests.support.streams import wait_consumer_idle

    shards = [list(range(num_shards))[i::replicas] for i in range(replicas)]
    procs = []
    try:
        for owned in shards:
            env = {"NATS_URLS": nats_url, "METRICS_PORT": "0"}
            if replicas > 1:
                env["NORMALIZER_SHARDS"] = ",".join(map(str, owned))
            procs.append(ServiceProcess("normalizer", env, log_dir).start())
        durables = []
        started = None
        for proc in procs:
            event = await proc.wait_for_event("normalizer_started", timeout=60)
            started = started or time.perf_counter()  # the first one is already draining
            durables.append(event["durable"])
        for durable in durables:
            await wait_consumer_idle(publisher.js, "MD_RAW", durable, timeout=600)
        assert started is not None
        drain_s = time.perf_counter() - started
        stored = (await publisher.js.stream_info("MD_TICKS")).state.messages
    finally:
        for proc in procs:
            await proc.terminate()
    return {
        "replicas": replicas,
        "shards": shards,
        "ticks_stored": stored,
        "ticks_per_s": stored / drain_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--frames", type=int, default=50_000)
    parser.add_argument("--service-frames", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-cryptofeed", action="store_true")
    parser.add_argument("--no-service", action="store_true")
    args = parser.parse_args()

    frames = ticker_frames(args.frames, synthetic_products(100))
    print(f"normalize: {len(frames)} ticker frames over 100 products", flush=True)
    results: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()}
    }
    per_frame = {}
    for name, fn in (
        ("ours", ours_normalize),
        ("ours_orjson", orjson_normalize),
        ("pydantic", pydantic_normalize),
    ):
        print(f"  timing {name} ...", flush=True)
        per_frame[name] = best_us_per_frame(fn, frames, args.repeats)
    if not args.no_cryptofeed:
        print("  timing cryptofeed (own Python 3.13 venv) ...", flush=True)
        cf = cryptofeed_us(frames)
        if cf:
            results["cryptofeed"] = cf
            for run in cf["runs"]:
                per_frame[f"cryptofeed_{run.get('trades_per_frame', 1)}_trades_per_frame"] = run[
                    "us_per_frame"
                ]
                per_frame[f"cryptofeed_per_trade_{run.get('trades_per_frame', 1)}"] = run[
                    "us_per_trade"
                ]
    results["us_per_frame"] = per_frame
    ours = per_frame["ours"]
    results["ratios_vs_ours"] = {k: v / ours for k, v in per_frame.items() if k != "ours"}
    if not args.no_service:
        print(
            f"  service: {args.service_frames} frames through one, then two normalizer "
            "processes ...",
            flush=True,
        )
        service_frames = ticker_frames(args.service_frames, synthetic_products(100))
        with tempfile.TemporaryDirectory() as tmp:
            results["service"] = asyncio.run(service_throughput(service_frames, Path(tmp)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "normalize.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'contender':<40}{'µs/frame':>10}{'x ours':>9}")
    for name, value in per_frame.items():
        print(f"{name:<40}{value:>10.2f}{value / ours:>9.2f}")
    if "service" in results:
        s = results["service"]
        print(f"\nservice: {s['normalizer_ticks_per_s']:,.0f} ticks/s sustained "
              f"(nats-py publish_async {s['baseline_js_publish_per_s']:,.0f} msg/s), "
              f"{s['ticks_stored']} of {s['frames']} stored")  # fmt: skip
        if "replicas_2" in s:
            two = s["replicas_2"]
            print(f"two replicas (shards {two['shards']}): {two['ticks_per_s']:,.0f} ticks/s, "
                  f"{two['ticks_stored']} of {s['frames']} stored")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
