"""Hostile clients against the gateway while 100 well-behaved clients measure their latency
(issue #10, scenario 5).

One gateway process on its own nats-server (``tests.gateway.helpers.stack``); this test
process publishes the feed to MD_TICKS and samples the gateway's RSS and open file
descriptors from /proc; the 100 well-behaved clients run in one OS process and every
attacker in another (``tests/chaos/hostile.py``). All of them share the machine's two
cores: the gateway, nats-server, the good clients, the attackers and this process. The
attacker process runs at nice 10: in production attackers sit on other hosts, so their own
CPU should not be charged to the gateway, while the gateway's work on their behalf is what
is measured. The attack volumes actually reached are asserted, so a starved attacker
cannot make the test pass vacuously.

The feed runs at a fixed rate throughout; quiet windows and attack windows alternate (all
attackers at once in each attack window, paused in between; a quiet window starts once
every attacker has finished its cycle), ending with a quiet one. Quiet windows are the
baseline: interleaved, they see the same outside noise as the attack windows. Asserted:

- the gateway stays up (``/healthz`` answers every second throughout);
- every attacker gets the documented answer (DESIGN §8), seen from both ends: what the
  attackers observed and the gateway's own counters agree exactly;
- nothing of theirs stays: connections and subscriptions back to the good clients', the
  storm's API key gets all its per-key slots back, file descriptors back to the baseline,
  RSS peak and plateau within budgets and not growing from one window to the next;
- the good clients: never disconnected, seq strictly increasing, every published tick
  received or announced by ``skipped``;
- their p99 latency (now - ``recv_ns``) under attack within 2x the quiet windows' (+ a 5 ms
  floor, see ``LATENCY_FLOOR_MS``): a test of its own on the same run, because it fails
  today (``LATENCY_BUG``).

Bugs this suite found in single behaviours (invalid UTF-8 in a binary frame killed the
session; connections that never finished the HTTP upgrade were held forever) have tests at
the end that pin their fixes.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from array import array
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.hostile import AttackPlan
from tests.gateway.helpers import Client, Feed, Gateway, Stack, stack
from tests.support.procs import REPO, cpu_seconds

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

ARTIFACTS = REPO / "test-artifacts" / "chaos"
GOOD_KEY = "good-clients-key-5c1e"
ATTACK_KEYS = {
    kind: f"{kind}-attacker-key-{n:02d}"
    for n, kind in enumerate(
        ("flood", "oversized", "bad_utf8", "bad_input", "churn", "slow", "storm"), 1
    )
}
HOT = ["HOT1-USD", "HOT2-USD", "HOT3-USD", "HOT4-USD"]  # what the good clients watch
BIG = ["BIG1-USD", "BIG2-USD"]  # 4 KB ticks: megabytes of backfill for the slow readers
BIG_VOLUME = "1" * 4000 + ".5"
KEY_LIMIT = 150  # per API key: the 100 good clients fit, the storm's ~250 at once do not
FLOOD_STRIKES = 50  # the default WS_FLOOD_STRIKES
SLOW_CONSUMER_S = 2.0
ENV = {
    "COINBASE_PRODUCTS": ",".join(HOT + BIG),
    "GATEWAY_API_KEYS": ",".join([GOOD_KEY, *ATTACK_KEYS.values()]),
    "WS_MAX_CONNECTIONS_PER_KEY": str(KEY_LIMIT),
    "WS_FLOOD_STRIKES": str(FLOOD_STRIKES),
    # default 5 s; 2 s keeps a slow-reader cycle short. A good client would need to stall
    # for seconds with megabytes unread to meet it, and none is slower than ~100 ms here.
    "WS_SLOW_CONSUMER_S": str(SLOW_CONSUMER_S),
}

# p99 is allowed 2x the baseline plus this floor. Baseline p99 here is a few milliseconds;
# on two cores shared by five busy processes a single scheduler slice given to another
# runnable process (CFS hands out slices of ~3-6 ms) delays a tick by that much whatever the
# attack does, so 2x of a 2 ms p99 would flag noise. What a real regression produces (the
# event loop stalled by attack handling, head-of-line blocking behind a slow reader, the
# fan-out starved) costs tens to hundreds of milliseconds, far above the floor.
LATENCY_FLOOR_MS = 5.0


@dataclass
class Scenario:
    """Quiet and attack windows alternate: ``quiet_s``, then ``attack_s`` of every attacker
    at once, ``windows`` times, then a last quiet window. The baseline is every quiet window
    (the first ``settle_s`` of each left out), so noise from outside the test (other
    processes, CPU steal) falls on both sides of the comparison alike."""

    name: str
    clients: int = 100
    rate: float = 100.0  # ticks/s over the hot products
    windows: int = 3
    quiet_s: float = 3.0
    attack_s: float = 5.0
    settle_s: float = 0.5
    big_ticks: int = 1_000  # per BIG product: 4 MB of backfill each
    # RSS budgets (MiB), see _check_memory
    peak_budget_mib: float = 96.0
    after_budget_mib: float = 48.0
    growth_budget_mib: float = 16.0
    plan: dict[str, Any] = field(default_factory=dict)
    # least activity each attacker must reach, so a starved attacker fails the test
    minimum: dict[str, int] = field(default_factory=dict)


FAST = Scenario(
    name="fast",
    # three windows do not reach the allocator's plateau (measured: up to +10 MiB from the
    # first quiet window after an attack to the last); the full run's eight windows do
    growth_budget_mib=24.0,
    plan={"churn_target": 2_000, "churners": 10},
    minimum={
        "flood": 10, "oversized": 10, "bad_utf8": 10, "bad_input": 2, "churn": 1_000,
        "slow": 3, "storm": 400, "bad_keys": 16,
    },
)  # fmt: skip

FULL = Scenario(
    name="full",
    rate=200.0,
    windows=8,
    quiet_s=4.0,
    attack_s=10.0,
    peak_budget_mib=128.0,
    plan={
        "churn_target": 10_000, "churners": 16, "flooders": 4, "oversized": 2, "bad_utf8": 2,
        "bad_input": 4, "storm_rate": 120.0,
    },
    minimum={
        "flood": 50, "oversized": 50, "bad_utf8": 50, "bad_input": 6, "churn": 10_000,
        "slow": 8, "storm": 3_000, "bad_keys": 100,
    },
)  # fmt: skip


def log(message: str) -> None:
    print(f"[hostile {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- processes and sampling ----------------------------------------------------------------


class Child:
    """``python -m tests.chaos.hostile ...`` speaking JSON lines on stdout."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name

    @classmethod
    async def start(cls, name: str, args: list[str], stderr: Path) -> Child:
        with stderr.open("ab") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.chaos.hostile", *args,
                cwd=REPO, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=err, limit=2**26,
            )  # fmt: skip
        return cls(proc, name)

    async def expect(self, event: str, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{self.name} never reported {event!r}"
            line = await asyncio.wait_for(self.proc.stdout.readline(), remaining)
            assert line, f"{self.name} exited (rc={await self.proc.wait()}) before {event!r}"
            message: dict[str, Any] = json.loads(line)
            if message.get("event") == event:
                return message

    async def tell(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        await self.proc.stdin.drain()

    async def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


def proc_status(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open file descriptors) of a process."""
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Sampler:
    """The gateway's RSS and fds every 0.25 s, and whether /healthz answers every second."""

    gateway: Gateway
    samples: list[tuple[int, int, int]] = field(default_factory=list)  # (ns, rss KiB, fds)
    health_failures: list[str] = field(default_factory=list)
    health_checks: int = 0

    async def run(self) -> None:
        pid = self.gateway.proc.pid
        tick = 0
        while True:
            rss, fds = proc_status(pid)
            self.samples.append((time.time_ns(), rss, fds))
            if tick % 4 == 0:
                await self._health()
            tick += 1
            await asyncio.sleep(0.25)

    async def _health(self) -> None:
        self.health_checks += 1
        try:
            status, _ = await asyncio.to_thread(self.gateway.get, "/healthz")
        except OSError as exc:
            self.health_failures.append(f"{time.strftime('%H:%M:%S')} {exc!r}")
        else:
            if status != 200:
                self.health_failures.append(f"{time.strftime('%H:%M:%S')} HTTP {status}")

    def window(self, start_ns: int, end_ns: int) -> list[tuple[int, int, int]]:
        return [s for s in self.samples if start_ns <= s[0] <= end_ns]


_E2E = "ledgerflux_gateway_e2e_latency_seconds"
_LAG = "ledgerflux_event_loop_lag_seconds"


@dataclass
class GatewayView:
    """Bucket counts of the gateway's e2e hand-off latency (``recv_ns`` to the socket) and
    event-loop lag histograms, summed over windows of one kind: whether what the good
    clients measure happens inside the gateway's loop or outside it (sockets, scheduling)."""

    e2e: dict[float, float] = field(default_factory=dict)
    lag: dict[float, float] = field(default_factory=dict)

    @classmethod
    async def read(cls, gateway: Gateway) -> GatewayView:
        return cls(
            await asyncio.to_thread(gateway.histogram, _E2E),
            await asyncio.to_thread(gateway.histogram, _LAG),
        )

    def add(self, end: GatewayView, start: GatewayView) -> None:
        for mine, a, b in ((self.e2e, end.e2e, start.e2e), (self.lag, end.lag, start.lag)):
            for le, count in a.items():
                mine[le] = mine.get(le, 0.0) + count - b.get(le, 0.0)

    def summary(self) -> dict[str, Any]:
        return {"e2e_p99_le_ms": _quantile_le(self.e2e, 0.99),
                "lag_p99_le_ms": _quantile_le(self.lag, 0.99),
                "lag_max_le_ms": _quantile_le(self.lag, 1.0)}  # fmt: skip


def _quantile_le(cumulative: dict[float, float], q: float) -> float | None:
    """The upper bound (ms) of the bucket holding quantile ``q``."""
    total = cumulative.get(float("inf"), 0.0)
    if not total:
        return None
    for le in sorted(cumulative):
        if cumulative[le] >= q * total:
            return le * 1000
    return None


async def run_feed(feed: Feed, rate: float, seqs: dict[str, int], stop: asyncio.Event) -> None:
    """``rate`` ticks/s round-robin over the hot products, each stamped at its publication."""
    interval = len(HOT) / rate  # one tick of every hot product per interval
    next_at = time.monotonic()
    while not stop.is_set():
        for product in HOT:
            seqs[product] += 1
        await feed.publish(((p, seqs[p]) for p in HOT), window=len(HOT))
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


# -- gateway counters ----------------------------------------------------------------------

COUNTERS = {
    "close_1008": ("ledgerflux_gateway_disconnects_total", {"code": "1008"}),
    "close_1009": ("ledgerflux_gateway_disconnects_total", {"code": "1009"}),
    "close_1007": ("ledgerflux_gateway_disconnects_total", {"code": "1007"}),
    "close_4008": ("ledgerflux_gateway_disconnects_total", {"code": "4008"}),
    "close_1013": ("ledgerflux_gateway_disconnects_total", {"code": "1013"}),
    "slow_consumers": ("ledgerflux_gateway_slow_consumers_total", {}),
    "auth_missing": ("ledgerflux_gateway_auth_failures_total", {"reason": "missing"}),
    "auth_invalid": ("ledgerflux_gateway_auth_failures_total", {"reason": "invalid"}),
    "key_limit": ("ledgerflux_gateway_key_limit_rejected_total", {"scope": "process"}),
    "rate_limited": ("ledgerflux_gateway_errors_sent_total", {"code": "rate_limited"}),
    "bad_request": ("ledgerflux_gateway_errors_sent_total", {"code": "bad_request"}),
    "unknown_product": ("ledgerflux_gateway_errors_sent_total", {"code": "unknown_product"}),
    "too_many_subscriptions": (
        "ledgerflux_gateway_errors_sent_total",
        {"code": "too_many_subscriptions"},
    ),
}


async def counters(gateway: Gateway) -> dict[str, float]:
    return {
        name: await asyncio.to_thread(gateway.metric, metric, **labels)
        for name, (metric, labels) in COUNTERS.items()
    }


def expected_counters(attackers: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """What the gateway must have counted (at least, at most), from what the attackers saw.

    Exact, except for the per-key refusals: an upgrade the storm abandons mid-handshake
    may still reach the gateway whole and be refused with 1013 with nobody left to see it.
    """

    def seen(kind: str, outcome: str) -> int:
        return int(attackers[kind]["counts"].get(outcome, 0))

    def exactly(n: int) -> tuple[int, int]:
        return n, n

    oversized = sum(
        int(n) for k, n in attackers["oversized"]["counts"].items() if k.endswith(":close:1009")
    )
    refused = seen("storm", "close:1013")
    refused_range = (refused, refused + seen("storm", "abandoned_handshake"))
    return {
        "close_1008": exactly(seen("flood", "close:1008")),
        "close_1009": exactly(oversized),
        "close_1007": exactly(seen("bad_utf8", "close:1007")),
        "close_4008": exactly(seen("slow", "close:4008")),
        "slow_consumers": exactly(seen("slow", "close:4008")),
        "close_1013": refused_range,
        "key_limit": refused_range,
        "auth_missing": exactly(seen("bad_keys", "http:403:missing")),
        "auth_invalid": exactly(seen("bad_keys", "http:403:invalid")),
        "rate_limited": exactly(seen("flood", "error:rate_limited")),
        "bad_request": exactly(seen("bad_input", "error:bad_request")),
        "unknown_product": exactly(seen("bad_input", "error:unknown_product")),
        "too_many_subscriptions": exactly(seen("bad_input", "error:too_many_subscriptions")),
    }


def activity(kind: str, tally: dict[str, Any]) -> int:
    """The volume an attacker reached (cycles, commands or connections)."""
    if kind == "churn":
        return int(tally.get("commands", 0))
    if kind == "bad_keys":
        return sum(int(n) for n in tally["counts"].values())
    return int(tally["cycles"])


# -- latency -------------------------------------------------------------------------------


def p(values: list[int], q: float) -> float:
    """The q-quantile of nanosecond values, in milliseconds."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6


def latency_stats(
    born: array[int], lat: array[int], windows: list[tuple[int, int]]
) -> dict[str, float]:
    """p50/p99/max of the ticks published (``recv_ns``) within any of ``windows``."""
    values = [
        lat[i] for i in range(len(born)) if any(start <= born[i] <= end for start, end in windows)
    ]
    assert len(values) >= 100, f"only {len(values)} ticks in {windows}"
    return {
        "n": len(values),
        "p50_ms": round(p(values, 0.50), 3),
        "p99_ms": round(p(values, 0.99), 3),
        "max_ms": round(max(values) / 1e6, 3),
    }


# -- the scenario --------------------------------------------------------------------------


async def wait_gauge(gateway: Gateway, name: str, value: float, timeout: float) -> float:
    """Until the gauge equals ``value``; returns what it was last."""
    deadline = time.monotonic() + timeout
    while (now := await asyncio.to_thread(gateway.metric, name)) != value:
        if time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.1)
    return now


async def key_slots_free(gateway: Gateway, key: str, n: int) -> int:
    """How many of ``n`` simultaneous connections with ``key`` get a welcome."""

    async def one() -> tuple[Client, bool]:
        client = await Client.connect(f"{gateway.url}?token={key}")
        return client, (await client.recv(timeout=20)).get("type") == "welcome"

    opened = await asyncio.gather(*(one() for _ in range(n)))
    await asyncio.gather(*(c.close() for c, _ in opened), return_exceptions=True)
    return sum(welcomed for _, welcomed in opened)


async def run_scenario(root: Path, scenario: Scenario) -> dict[str, Any]:
    report: dict[str, Any] = {"scenario": asdict(scenario)}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with stack(root, **ENV) as shared:
        gateway = shared.gateway
        children: list[Child] = []
        feed_stop = asyncio.Event()
        sampler = Sampler(gateway)
        sampling = asyncio.create_task(sampler.run())
        try:
            return await _phases(root, scenario, shared, sampler, children, feed_stop, report)
        finally:
            feed_stop.set()
            sampling.cancel()
            for child in children:
                child.kill()
            (ARTIFACTS / f"hostile-clients-{scenario.name}.json").write_text(
                json.dumps(report, indent=2, default=str)
            )


async def _phases(
    root: Path,
    scenario: Scenario,
    shared: Stack,
    sampler: Sampler,
    children: list[Child],
    feed_stop: asyncio.Event,
    report: dict[str, Any],
) -> dict[str, Any]:
    gateway, feed = shared.gateway, shared.feed
    pid = gateway.proc.pid
    seqs = dict.fromkeys(HOT, 1)
    await feed.publish((p, 1) for p in HOT)
    await feed.publish(
        ((p, s) for s in range(1, scenario.big_ticks + 1) for p in BIG), volume_24h=BIG_VOLUME
    )
    for product in HOT:
        await gateway.wait_latest(product, 1)
    for product in BIG:
        await gateway.wait_latest(product, scenario.big_ticks)

    samples_path = root / "good-latency.bin"
    good = await Child.start(
        "good clients",
        [
            "good", "--url", gateway.url, "--key", GOOD_KEY, "--clients", str(scenario.clients),
            "--products", ",".join(HOT), "--out", str(samples_path),
        ],
        root / "good.stderr",
    )  # fmt: skip
    children.append(good)
    plan = AttackPlan(
        url=gateway.url,
        keys=ATTACK_KEYS,
        valid_key=GOOD_KEY,
        hot_products=HOT,
        big_products=BIG,
        key_limit=KEY_LIMIT,
        flood_strikes=FLOOD_STRIKES,
        slow_backfill=scenario.big_ticks,
        **scenario.plan,
    )
    attack = await Child.start(
        "attackers", ["attack", "--plan", json.dumps(asdict(plan))], root / "attack.stderr"
    )
    children.append(attack)
    await good.expect("ready", timeout=120)
    ready = await attack.expect("ready", timeout=120)
    assert ready["idle"], ready
    connected = await asyncio.to_thread(gateway.metric, "ledgerflux_gateway_connections")
    # the good clients, plus the long-lived bad-input and churn connections of the attackers
    persistent = scenario.clients + plan.bad_input + plan.churners
    assert connected == persistent
    feeding = asyncio.create_task(run_feed(feed, scenario.rate, seqs, feed_stop))
    await asyncio.sleep(2.0)  # warm-up
    before = await counters(gateway)
    log(
        f"{scenario.clients} good clients subscribed; {scenario.windows} x "
        f"({scenario.quiet_s:g}s quiet, {scenario.attack_s:g}s attack)"
    )

    quiet: list[tuple[int, int]] = []
    attacked: list[tuple[int, int]] = []
    cpu = {"quiet": 0.0, "attack": 0.0}
    # the gateway's own view per kind of window: its hand-off latency and its loop's lag
    inside = {kind: GatewayView() for kind in ("quiet", "attack")}
    quiet_start = time.time_ns()
    for number in range(1, scenario.windows + 2):
        cpu0 = cpu_seconds(pid)
        view0 = await GatewayView.read(gateway)
        await asyncio.sleep(scenario.quiet_s)
        cpu["quiet"] += cpu_seconds(pid) - cpu0
        inside["quiet"].add(await GatewayView.read(gateway), view0)
        quiet.append((quiet_start + int(scenario.settle_s * 1e9), time.time_ns()))
        if number > scenario.windows:
            break
        cpu0 = cpu_seconds(pid)
        view0 = await GatewayView.read(gateway)
        await attack.say("resume")
        start = (await attack.expect("resumed", timeout=30))["time_ns"]
        await asyncio.sleep(scenario.attack_s)
        await attack.say("pause")
        paused = await attack.expect("paused", timeout=90)
        assert paused["idle"], f"attackers still busy 60 s after window {number}'s pause"
        cpu["attack"] += cpu_seconds(pid) - cpu0
        inside["attack"].add(await GatewayView.read(gateway), view0)
        attacked.append((start, paused["time_ns"]))
        quiet_start = paused["time_ns"]
    quiet_s = sum(end - start for start, end in quiet) / 1e9
    attack_s = sum(end - start for start, end in attacked) / 1e9
    report["gateway_view"] = {kind: view.summary() for kind, view in inside.items()}
    report["gateway_cpu"] = {
        "quiet": round(cpu["quiet"] / quiet_s, 3),
        "attack": round(cpu["attack"] / attack_s, 3),
    }
    report["windows"] = {"quiet": quiet, "attack": attacked, "attack_s": round(attack_s, 1)}

    await attack.say("stop")
    result = await attack.expect("result", timeout=120)
    await attack.proc.wait()
    report["attackers"] = result["attackers"]
    # every attacker socket gone: only the good clients' state is left
    report["connections_after"] = await wait_gauge(
        gateway, "ledgerflux_gateway_connections", scenario.clients, timeout=30
    )
    report["subscriptions_after"] = await wait_gauge(
        gateway, "ledgerflux_gateway_subscriptions", scenario.clients, timeout=10
    )
    after = await counters(gateway)
    report["counters"] = {"before": before, "after": after}
    # the storm's key: none of its slots leaked (abrupt drops and refusals all released)
    report["storm_key_slots_free"] = await key_slots_free(gateway, ATTACK_KEYS["storm"], KEY_LIMIT)

    feed_stop.set()
    await feeding
    for product in HOT:
        await gateway.wait_latest(product, seqs[product])
    await good.tell({"stop": seqs})
    good_result = await good.expect("result", timeout=120)
    await good.proc.wait()
    raw = array("q")
    raw.frombytes(samples_path.read_bytes())
    half = len(raw) // 2
    born, lat = raw[:half], raw[half:]
    report["latency_quiet"] = latency_stats(born, lat, quiet)
    report["latency_attack"] = latency_stats(born, lat, attacked)
    report["latency_by_window"] = {
        "quiet": [latency_stats(born, lat, [w])["p99_ms"] for w in quiet],
        "attack": [latency_stats(born, lat, [w])["p99_ms"] for w in attacked],
    }
    report["health"] = {"checks": sampler.health_checks, "failures": sampler.health_failures}
    rss_end, fds_end = proc_status(pid)

    def rss(samples: list[tuple[int, int, int]]) -> float:
        return round(max(s[1] for s in samples) / 1024, 1)

    report["memory"] = {
        "baseline_rss_mib": rss(sampler.window(*quiet[0])),
        "baseline_fds": max(s[2] for s in sampler.window(*quiet[0])),
        "peak_rss_mib": rss([s for w in attacked for s in sampler.window(*w)]),
        "peak_fds": max(s[2] for w in attacked for s in sampler.window(*w)),
        "quiet_rss_mib": [rss(sampler.window(*w)) for w in quiet],
        # the last sample of each quiet window: the good clients are all still connected
        "quiet_fds": [sampler.window(*w)[-1][2] for w in quiet],
        "end_rss_mib": round(rss_end / 1024, 1),
        "end_fds": fds_end,
    }
    report["good_clients"] = good_result["clients"]
    report["published"] = dict(feed.published)
    return report


def check_contained(report: dict[str, Any], scenario: Scenario) -> None:
    """The gateway stayed up, answered every attacker as documented, kept nothing of theirs,
    and the good clients lost nothing."""
    health = report["health"]
    assert health["checks"] > 0 and not health["failures"], health

    # every attacker got the documented answer, and reached its volume
    attackers = report["attackers"]
    for kind, tally in attackers.items():
        assert tally["unexpected_total"] == 0, (kind, tally)
        assert activity(kind, tally) >= scenario.minimum[kind], (kind, tally)
    storm = attackers["storm"]
    pileups = len(range(1, scenario.windows + 1, AttackPlan.storm_pileup_every))
    assert storm["pileups"] == pileups, storm
    assert storm["counts"].get("close:1013", 0) >= pileups, storm
    assert 0 < storm["max_admitted_at_once"] <= KEY_LIMIT, storm
    # ... the gateway counted exactly what the attackers saw
    before, after = report["counters"]["before"], report["counters"]["after"]
    for name, (low, high) in expected_counters(attackers).items():
        counted = int(after[name] - before[name])
        assert low <= counted <= high, f"gateway counted {name}={counted}, attackers saw {low}"
    # ... and holds nothing of theirs any more
    assert report["connections_after"] == scenario.clients, report["connections_after"]
    assert report["subscriptions_after"] == scenario.clients, report["subscriptions_after"]
    assert report["storm_key_slots_free"] == KEY_LIMIT

    # the good clients: connected throughout, in order, nothing lost
    published = report["published"]
    for client in report["good_clients"]:
        assert client["closed"] is None, client
        assert client["regressions"] == 0, client
        assert "error" not in client["others"], client
        after_snapshot = [s for s in published[client["product"]] if s > client["snapshot_seq"]]
        assert client["count"] + client["skipped"] == len(after_snapshot), client
        assert client["last"] == after_snapshot[-1], client

    _check_memory(report["memory"], scenario)


def check_latency(report: dict[str, Any]) -> None:
    """The good clients' p99 latency under attack is within 2x (+ the floor) of the quiet
    windows'. Each side's p99 is the median of its windows' p99s: one window hit by
    something outside the test (a CPU-steal burst, another process) moves neither side,
    while an attack that slows the gateway does so in every attack window."""
    quiet = statistics.median(report["latency_by_window"]["quiet"])
    attacked = statistics.median(report["latency_by_window"]["attack"])
    assert attacked <= 2 * quiet + LATENCY_FLOOR_MS, report["latency_by_window"]


def _check_memory(memory: dict[str, Any], scenario: Scenario) -> None:
    """RSS bounds in MiB over the baseline (the max RSS of the first quiet window).

    Peak: under attack the gateway legitimately holds the slow readers' backfills (a read
    of 2 x 4 MB from JetStream, then at most two 500-tick chunks = 4 MB queued, per reader)
    and ~250 storm connections at a time: ~30 MB in the fast plan (measured: +27 MiB),
    ~45 MB in the full one. ``peak_budget_mib`` is that with room for the allocator; an
    unbounded buffer (a slow reader's queue growing with every tick, sessions never freed)
    exceeds it within the attack.

    After: CPython keeps freed arenas and the allocator its high-water mark, so RSS does
    not return to the baseline exactly: ``after_budget_mib`` bounds that plateau. Between
    the quiet window after the first attack window and the last one, RSS may grow by
    ``growth_budget_mib`` at most: fragmentation plateaus after one window, a leak grows
    with every window of the same attack. Open file descriptors at the end of the last quiet
    window (good clients still connected) are those of the first (+ a few for the test's own
    scrapes): a socket leaked per dropped connection would add thousands.
    """
    base = memory["baseline_rss_mib"]
    assert memory["peak_rss_mib"] <= base + scenario.peak_budget_mib, memory
    assert memory["end_rss_mib"] <= base + scenario.after_budget_mib, memory
    after_first, last = memory["quiet_rss_mib"][1], memory["quiet_rss_mib"][-1]
    assert last <= after_first + scenario.growth_budget_mib, memory
    assert memory["quiet_fds"][-1] <= memory["quiet_fds"][0] + 8, memory


def summarize(report: dict[str, Any]) -> None:
    log(f"latency quiet {report['latency_quiet']} attack {report['latency_attack']}")
    log(f"p99 by window {report['latency_by_window']}; gateway cpu {report['gateway_cpu']}")
    log(f"inside the gateway (bucket bounds, ms): {report['gateway_view']}")
    for kind, tally in report["attackers"].items():
        counts = ", ".join(f"{k}={v}" for k, v in sorted(tally["counts"].items()))
        extra = {k: v for k, v in tally.items() if k not in ("counts", "unexpected", "cycles")}
        log(f"  {kind}: cycles={tally['cycles']} {counts} {extra}")
        for line in tally["unexpected"][:3]:
            log(f"    unexpected: {line}")
    log(f"memory {report['memory']}")


async def _report(tmp_path_factory: pytest.TempPathFactory, scenario: Scenario) -> dict[str, Any]:
    started = time.monotonic()
    report = await run_scenario(tmp_path_factory.mktemp(f"hostile-{scenario.name}"), scenario)
    summarize(report)
    log(f"{scenario.name} scenario took {time.monotonic() - started:.1f}s")
    return report


# One run of a scenario serves two tests: what must hold (contained) and the latency bound,
# which fails today (see its xfail) and is kept apart so that it cannot mask the rest.
@pytest.fixture(scope="module")
async def fast_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return await _report(tmp_path_factory, FAST)


@pytest.fixture(scope="module")
async def full_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return await _report(tmp_path_factory, FULL)


LATENCY_BUG = (
    "BUG: under the attack mix the good clients' p99 is 2-4x the quiet windows' (fast "
    "scenario: ~7-20 ms quiet, ~30-45 ms under attack, gateway at ~55 % of a core). Fixed so "
    "far: the cyclic-GC stalls (sessions leave no reference cycles, pinned by "
    "tests/gateway/test_session_garbage.py); bad API keys refused by the WebSocket protocol "
    "before the ASGI app (-43 % instructions per refusal; bad keys alone no longer move the "
    "p99); a session yields after every 16 commands of a burst; WebSocket upgrades are paced "
    "(WS_HANDSHAKES_PER_SEC: under a 1,500-connection reconnect storm the good clients' p99 "
    "went from 212-364 ms to 66-246 ms), which does not touch this mix (its storm is 100/s, "
    "under the pace). One attacker kind at a time, "
    "the connection storm costs most (~1.9x): an admitted handshake is ~2.1M instructions "
    "of h11, websockets and Starlette. The report's gateway_view puts the rest inside the "
    "gateway's process (loop lag p99 <= 10 ms quiet, <= 20-50 ms under attack), mostly "
    "waiting for a core that the attackers, the good clients and nats-server share. Not "
    "strict: a latency bound on a shared 2-core machine can pass by luck (in 8 runs on "
    "2026-11-29 the ratio was 1.5-4.0x, passing in 4, with the hypervisor taking 40-59 % of "
    "the CPU time while the stack ran)."
)


@pytest.mark.chaos_fast
@pytest.mark.timeout(150)
async def test_hostile_clients_are_answered_and_contained_fast(
    fast_report: dict[str, Any],
) -> None:
    """Under every kind of hostile client at once (floods, oversized frames, invalid JSON
    and UTF-8, subscribe churn, slow readers, a connection storm, bad keys), in three 5 s
    windows: the gateway stays up, each attacker gets its documented error or close code
    (and the gateway's counters agree), memory, descriptors and per-key slots come back,
    and 100 good clients stay connected with every tick in order."""
    check_contained(fast_report, FAST)


@pytest.mark.chaos_fast
@pytest.mark.timeout(150)
@pytest.mark.xfail(reason=LATENCY_BUG, strict=False)
async def test_good_clients_latency_under_attack_fast(fast_report: dict[str, Any]) -> None:
    """The 100 good clients' p99 latency (now - recv_ns) in the attack windows is within 2x
    (+5 ms) of the quiet windows'."""
    check_latency(fast_report)


@pytest.mark.timeout(900)
async def test_hostile_clients_are_answered_and_contained_full(
    full_report: dict[str, Any],
) -> None:
    """The same at full size: eight 10 s attack windows with a 10,000-command
    subscribe/unsubscribe churn and ~10,000 connections opened and dropped; RSS after the
    last window has not grown past its plateau after the first (no leak)."""
    check_contained(full_report, FULL)


@pytest.mark.timeout(900)
@pytest.mark.xfail(reason=LATENCY_BUG, strict=False)
async def test_good_clients_latency_under_attack_full(full_report: dict[str, Any]) -> None:
    """The full scenario's p99 latency bound, as in the fast one."""
    check_latency(full_report)


# -- bugs this suite found, pinned by their fixes ------------------------------------------


@pytest.fixture(scope="module")
async def plain(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """A gateway with default limits (no API keys) for the single-behaviour checks below."""
    async with stack(
        tmp_path_factory.mktemp("hostile-plain"),
        COINBASE_PRODUCTS=",".join(HOT),
        WS_HANDSHAKE_TIMEOUT_S="1",
    ) as shared:
        yield shared


@pytest.mark.chaos_fast
async def test_a_binary_frame_with_invalid_utf8_gets_bad_request(plain: Stack) -> None:
    """Bad input never kills the connection on its own (DESIGN §8): a binary frame whose
    JSON string is not UTF-8 gets ``bad_request`` and the connection stays usable (a text
    frame that is not UTF-8 is the WebSocket layer's 1007, covered above)."""
    client = await Client.connect(plain.gateway.url)
    assert (await client.recv())["type"] == "welcome"
    await client.ws.send(b'{"op": "ping", "id": "\xff"}')
    reply = await client.recv()
    assert (reply["type"], reply["code"]) == ("error", "bad_request"), reply
    await client.send({"op": "ping", "id": "still-here"})
    assert (await client.expect("pong"))["id"] == "still-here"
    await client.close()


@pytest.mark.chaos_fast
async def test_connections_that_never_finish_the_handshake_are_dropped(plain: Stack) -> None:
    """Sockets that send nothing, or an upgrade request that never ends, are closed by the
    gateway after a handshake deadline (WS_HANDSHAKE_TIMEOUT_S, 1 s here) instead of holding
    a file descriptor each for ever."""
    host, port = "127.0.0.1", plain.gateway.port
    streams = []
    for n in range(40):
        reader, writer = await asyncio.open_connection(host, port)
        if n % 2:
            writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        streams.append((reader, writer))
    deadline = time.monotonic() + 4
    still_open = len(streams)
    while still_open and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        still_open = 0
        for reader, _ in streams:
            if not reader.at_eof():
                try:
                    await asyncio.wait_for(reader.read(4096), 0.01)
                except TimeoutError:
                    still_open += 1
                except ConnectionError:
                    pass
    for _, writer in streams:
        writer.close()
    assert still_open == 0, f"{still_open} of {len(streams)} handshakes still held after 4 s"
