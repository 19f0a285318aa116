"""PromQL found in the monitoring files, and the metric names it refers to.

Used by ``test_metric_names.py`` (every name must be exposed by a service) and by
``scripts/validate.sh``, which runs ``python -m tests.ops.promql rules OUT`` to turn the
dashboard queries into a rule file so ``promtool check rules`` parses each of them.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "monitoring" / "grafana" / "dashboards"
PROMETHEUS = REPO / "monitoring" / "prometheus"

# Words that look like identifiers in PromQL but are not metric names.
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
    | {"group_left", "group_right", "inf", "nan", "atan2"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
# An identifier not preceded by a word character or a dot (so not the "e3" of 1e3 or the
# "5m" of a duration), with an optional "(" after it: a function call, not a metric.
_IDENT = re.compile(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?")
_LABEL_VALUES = re.compile(r"\s*label_values\((.+),\s*\w+\s*\)\s*", re.S)
_LABEL_VALUES_ONLY = re.compile(r"\s*label_values\(\s*\w+\s*\)\s*")
_QUERY_RESULT = re.compile(r"\s*query_result\((.+)\)\s*", re.S)
# Grafana's built-in interval variables, replaced by a fixed range for promtool.
_GRAFANA_RANGES = re.compile(r"\$\{?__(?:rate_interval|interval|range)\b\}?")


@dataclass(frozen=True, slots=True)
class Query:
    """One PromQL expression and where it was found (file, then panel/rule/test)."""

    file: Path
    where: str
    expr: str

    def location(self) -> str:
        return f"{self.file.relative_to(REPO)}: {self.where}"


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (functions, labels, keywords removed)."""
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VAR.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def series_name(series: str) -> str:
    """The metric name of a promtool input series such as ``foo_total{job="x"}``."""
    return series.split("{", 1)[0].strip()


def _walk_panels(panels: list[dict[str, Any]], path: str) -> Iterator[tuple[str, str]]:
    for panel in panels:
        title = f"{path}panel {panel.get('title', panel.get('id'))!r}"
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if isinstance(expr, str) and expr.strip():
                yield f"{title} target {target.get('refId', '?')}", expr
        # collapsed rows keep their panels inside the row
        yield from _walk_panels(panel.get("panels", []), f"{title} > ")


def dashboard_queries(path: Path) -> Iterator[Query]:
    dashboard = json.loads(path.read_text())
    for where, expr in _walk_panels(dashboard.get("panels", []), ""):
        yield Query(path, where, expr)
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") != "query" or not isinstance(query, str):
            continue
        # label_values(metric, label) and query_result(expr) wrap PromQL; label_values(label)
        # names no metric at all
        if inner := _LABEL_VALUES.fullmatch(query) or _QUERY_RESULT.fullmatch(query):
            yield Query(path, f"variable {variable.get('name')!r}", inner.group(1))
        elif not _LABEL_VALUES_ONLY.fullmatch(query):
            yield Query(path, f"variable {variable.get('name')!r}", query)


def rule_queries(path: Path) -> Iterator[Query]:
    document = yaml.safe_load(path.read_text()) or {}
    for group in document.get("groups", []):
        for rule in group.get("rules", []):
            name = rule.get("alert") or rule.get("record")
            yield Query(path, f"group {group.get('name')!r} rule {name!r}", rule["expr"])


def rule_test_queries(path: Path) -> Iterator[Query]:
    """Input series and PromQL of a ``promtool test rules`` file (tests must use real names)."""
    document = yaml.safe_load(path.read_text()) or {}
    for number, test in enumerate(document.get("tests", []), start=1):
        label = f"test {test.get('name', number)!r}"
        for series in test.get("input_series", []):
            yield Query(path, f"{label} input series", series_name(series["series"]))
        for case in test.get("promql_expr_test", []):
            yield Query(path, f"{label} promql_expr_test", case["expr"])


def all_queries() -> list[Query]:
    """Every PromQL expression of the dashboards, alert rules and rule tests."""
    queries: list[Query] = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        queries.extend(dashboard_queries(path))
    for path in sorted(PROMETHEUS.glob("*.yml")):
        document = yaml.safe_load(path.read_text()) or {}
        if "groups" in document:
            queries.extend(rule_queries(path))
        elif "tests" in document:
            queries.extend(rule_test_queries(path))
    return queries


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's interval variables so promtool can parse a dashboard query."""
    return _GRAFANA_RANGES.sub("5m", expr)


def write_dashboard_rules(out: Path) -> int:
    """Write every dashboard query as a recording rule; promtool then checks their syntax."""
    rules = []
    for number, query in enumerate(
        (q for path in sorted(DASHBOARDS.glob("*.json")) for q in dashboard_queries(path)),
        start=1,
    ):
        rules.append(
            {
                "record": f"dashboard:query_{number}",
                "expr": grafana_to_promql(query.expr),
                "labels": {"source": query.location()},
            }
        )
    out.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    return len(rules)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "rules":
        print("usage: python -m tests.ops.promql rules OUT.yml", file=sys.stderr)
        return 2
    count = write_dashboard_rules(Path(argv[1]))
    print(f"{count} dashboard queries written to {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
