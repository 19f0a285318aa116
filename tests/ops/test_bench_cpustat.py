"""The benchmark's CPU accounting: busy, steal and idle shares between two /proc/stat
readings, which the report prints per scenario."""

from __future__ import annotations

from pathlib import Path

from bench.cpustat import cpu_shares, cpu_times


def _stat(tmp_path: Path, name: str, line: str) -> Path:
    path = tmp_path / name
    path.write_text(f"{line}\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 12345\n")
    return path


def test_shares_split_all_cpu_time_into_busy_steal_and_idle(tmp_path: Path) -> None:
    #                     user nice system idle iowait irq softirq steal guest guest_nice
    before = cpu_times(_stat(tmp_path, "a", "cpu  1000 0 200 5000 100 0 50 300 0 0"))
    after = cpu_times(_stat(tmp_path, "b", "cpu  1500 0 300 5300 100 0 100 700 0 0"))
    # deltas: user 500, system 100, idle 300, softirq 50, steal 400: 1,350 ticks in all
    assert cpu_shares(before, after) == {
        "busy_pct": round(100 * 650 / 1350, 1),
        "steal_pct": round(100 * 400 / 1350, 1),
        "idle_pct": round(100 * 300 / 1350, 1),
    }


def test_a_kernel_without_steal_counts_none_and_a_missing_reading_gives_nothing(
    tmp_path: Path,
) -> None:
    before = cpu_times(_stat(tmp_path, "a", "cpu  10 0 10 80"))
    after = cpu_times(_stat(tmp_path, "b", "cpu  60 0 10 110"))
    assert cpu_shares(before, after) == {"busy_pct": 62.5, "steal_pct": 0.0, "idle_pct": 37.5}
    assert cpu_shares(None, after) == {}
    assert cpu_times(tmp_path / "absent") is None
