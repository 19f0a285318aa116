"""Where the machine's CPU time went during a benchmark, from ``/proc/stat``: how busy the
cores were, and how much time the hypervisor gave to other guests (``steal``).

On a shared VM, steal is what makes two runs of the same code differ: when it is high, the
2 vCPUs are effectively fewer, and every figure of that scenario is lower for it.
"""

from __future__ import annotations

from pathlib import Path

# user nice system idle iowait irq softirq steal (guest time is already inside user)
_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_times(stat: Path = Path("/proc/stat")) -> dict[str, int] | None:
    """The aggregate ``cpu`` line in clock ticks, or None where there is no /proc/stat."""
    try:
        first = stat.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if first[0] != "cpu":
        return None
    values = [int(v) for v in first[1 : 1 + len(_FIELDS)]]
    values += [0] * (len(_FIELDS) - len(values))  # old kernels lack steal
    return dict(zip(_FIELDS, values, strict=True))


def cpu_shares(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, float]:
    """Percent of all CPU time between two readings: ``busy`` (ours), ``steal`` (other
    guests) and ``idle`` (idle + iowait). Empty when either reading is missing."""
    if before is None or after is None:
        return {}
    delta = {k: after[k] - before[k] for k in _FIELDS}
    total = sum(delta.values())
    if total <= 0:
        return {}
    idle = delta["idle"] + delta["iowait"]
    steal = delta["steal"]
    return {
        "busy_pct": round(100 * (total - idle - steal) / total, 1),
        "steal_pct": round(100 * steal / total, 1),
        "idle_pct": round(100 * idle / total, 1),
    }
