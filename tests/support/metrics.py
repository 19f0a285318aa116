"""Reading Prometheus metrics: a service's ``/metrics`` from outside its process, or this
process's own registry (code under test running in-process)."""

from __future__ import annotations

import urllib.request

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families


def metric_total(text: str, name: str) -> float:
    """The sum of the samples named ``name`` over all their label sets in an exposition."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


def scrape_total(url: str, name: str, timeout: float = 5.0) -> float:
    """:func:`metric_total` of what ``url`` serves now."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return metric_total(response.read().decode(), name)


def local_value(name: str, **labels: str) -> float:
    """A sample of this process's registry (0 when the series does not exist yet)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0
