"""Prometheus metrics, read from the simulator's own counters at scrape time.

Nothing is incremented per tick on a Prometheus object (that would cost a lock and a
label lookup per message); a custom collector turns ``FeedSim.stats()`` into metric
families when scraped. Each simulator has its own registry, so several can run in one
process (tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class FeedSimCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        s = self._stats()
        ticks = CounterMetricFamily(
            "feedsim_ticks", "Tickers generated per product", labels=["product_id"]
        )
        faults = CounterMetricFamily(
            "feedsim_faults", "Injected faults by kind and product", labels=["kind", "product_id"]
        )
        for pid, p in s["products"].items():
            ticks.add_metric([pid], p["ticks"])
            for kind, n in p["faults"].items():
                faults.add_metric([kind, pid], n)
        for kind in ("disconnect", "stall"):
            faults.add_metric([kind, ""], s["faults"]["by_kind"][kind])
        malformed = CounterMetricFamily(
            "feedsim_malformed_frames", "Malformed frames sent by variant", labels=["variant"]
        )
        for variant, n in s["faults"]["malformed_variants"].items():
            malformed.add_metric([variant], n)
        c = s["clients"]
        yield ticks
        yield faults
        yield malformed
        yield GaugeMetricFamily("feedsim_clients_connected", "Open ws connections", c["connected"])
        yield CounterMetricFamily(
            "feedsim_connections", "ws connections accepted", c["connections_total"]
        )
        yield CounterMetricFamily(
            "feedsim_slow_client_drops", "Clients closed as slow consumers", c["slow_client_drops"]
        )
        yield CounterMetricFamily("feedsim_frames_sent", "ws frames written", s["frames_sent"])
        yield CounterMetricFamily("feedsim_bytes_sent", "ws bytes written", s["bytes_sent"])
        yield CounterMetricFamily(
            "feedsim_rest_requests", "HTTP requests answered", s["rest"]["requests"]
        )
        yield CounterMetricFamily(
            "feedsim_rest_rate_limited", "HTTP 429 answers", s["rest"]["rate_limited"]
        )


def make_registry(stats: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FeedSimCollector(stats))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
