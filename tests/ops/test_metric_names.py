"""Every metric the dashboards, alert rules and rule tests query is one a service exposes.

Offline version of the check: the exposed names come from the Prometheus registry the
services register their metrics in (importing ``services.common.metrics`` and every
``services.<svc>.metrics``), not from scraping running services. A labelled metric that has
no child yet emits no samples, so the sample names are derived from each family's name and
type (counter -> ``_total``, histogram -> ``_bucket``/``_sum``/``_count``, ...). The check
against really scraped ``/metrics`` belongs to an end-to-end run of the stack.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil

import pytest
from prometheus_client import REGISTRY

import services
from tests.ops.promql import Query, all_queries, metric_names

# Series Prometheus adds to every scrape target itself.
PROMETHEUS_BUILTINS = frozenset({"up"})

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "gauge": ("",),
    "unknown": ("",),
}


def service_metric_modules() -> list[str]:
    """``services.common.metrics`` and ``services.<svc>.metrics`` for every service package."""
    modules = []
    for package in pkgutil.iter_modules(services.__path__):
        if package.ispkg and importlib.util.find_spec(f"services.{package.name}.metrics"):
            modules.append(f"services.{package.name}.metrics")
    return sorted(modules)


def exposed_metric_names() -> set[str]:
    """Sample names the default registry would expose, children or not."""
    for module in service_metric_modules():
        importlib.import_module(module)
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return names


@pytest.fixture(scope="module")
def queries() -> list[Query]:
    found = all_queries()
    # an empty list would pass vacuously: a moved file or a changed format must fail here
    assert len(found) >= 20, f"only {len(found)} PromQL expressions found under monitoring/"
    return found


def test_service_metric_modules_are_found() -> None:
    """The four deployed services and the common module register metrics."""
    modules = service_metric_modules()
    for name in ("common", "ingestor", "normalizer", "snapshotter", "gateway"):
        assert f"services.{name}.metrics" in modules


def test_every_queried_metric_is_exposed(queries: list[Query]) -> None:
    """Dashboards, alerts and rule tests use only metric names the services expose."""
    known = exposed_metric_names() | PROMETHEUS_BUILTINS
    unknown = sorted(
        f"{query.location()}: unknown metric {name!r}"
        for query in queries
        for name in metric_names(query.expr) - known
    )
    assert not unknown, "metrics not exposed by any service:\n" + "\n".join(unknown)


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'histogram_quantile(0.99, sum by (le) (rate(a_bucket{job=~"x.*", le!="1"}[5m])))',
            {"a_bucket"},
        ),
        ("sum(rate(a_total[$__rate_interval])) / on(job) group_left(x) b > 1e3", {"a_total", "b"}),
        ("time() - max by (product) (c_seconds) > bool 30 offset 5m", {"c_seconds"}),
        ('x unless ignoring(kind) y{kind="and or by"} or up', {"x", "y", "up"}),
        ("sum without (instance) (rate(d_total[5m:1m]))", {"d_total"}),
    ],
)
def test_metric_names_skips_functions_labels_and_keywords(expr: str, names: set[str]) -> None:
    """The extractor returns metric names only."""
    assert metric_names(expr) == names
