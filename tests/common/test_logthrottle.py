"""The log throttle: a burst of lines per event, then its rate; what it leaves out is
counted and reported on the next line of that event that passes."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from services.common.logthrottle import THROTTLED_EVENTS, LogThrottle
from tests.support.metrics import local_value


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_passes_then_the_rate_and_the_next_line_counts_what_was_left_out() -> None:
    clock = Clock()
    throttle = LogThrottle(per_s=2.0, burst=3, clock=clock)
    lines: list[tuple[str, dict[str, Any]]] = []

    def sink(event: str, **fields: Any) -> None:
        lines.append((event, fields))

    event = "unit_throttled_event"
    before = local_value("ledgerflux_log_lines_suppressed_total", event=event)
    written = [throttle.emit(sink, event, n=n) for n in range(10)]
    assert written == [True] * 3 + [False] * 7
    assert [fields["n"] for _, fields in lines] == [0, 1, 2]
    assert "suppressed" not in lines[-1][1]
    assert local_value("ledgerflux_log_lines_suppressed_total", event=event) - before == 7

    clock.now += 0.5  # one token back at 2 lines/s
    assert throttle.emit(sink, event, n=10)
    assert not throttle.emit(sink, event, n=11)
    assert lines[-1] == (event, {"n": 10, "suppressed": 7})

    clock.now += 10  # the bucket refills to its burst, not beyond
    assert [throttle.emit(sink, event, n=n) for n in range(4)] == [True, True, True, False]
    assert lines[-3][1] == {"n": 0, "suppressed": 1}


def test_each_event_has_its_own_budget() -> None:
    throttle = LogThrottle(per_s=1.0, burst=1, clock=Clock())
    lines: list[str] = []

    def sink(event: str, **fields: Any) -> None:
        lines.append(event)

    assert throttle.emit(sink, "unit_a") and not throttle.emit(sink, "unit_a")
    assert throttle.emit(sink, "unit_b")
    assert lines == ["unit_a", "unit_b"]


def test_every_throttled_event_is_declared_so_its_series_exists_from_the_start() -> None:
    """A labelled counter shows nothing until its first child: an event not declared in
    THROTTLED_EVENTS has no ``..._suppressed_total`` series until a line of it is left
    out, and the dashboard's query of it found nothing (the e2e test's metric check)."""
    root = Path(__file__).resolve().parents[2] / "services"
    used = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "emit"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "throttle"
            ):
                event = node.args[1]
                assert isinstance(event, ast.Constant), f"{path}: event must be a literal"
                used.add(event.value)
    assert used, "no throttle.emit call found"
    assert used == set(THROTTLED_EVENTS)
