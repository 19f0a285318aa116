"""``make bench``: every benchmark scenario in turn, then the report.

    python -m bench.run            # full (about 15 minutes on 2 cores)
    python -m bench.run --quick    # smaller runs (about 3 minutes)
    python -m bench.run --only pipeline fanout

Each scenario runs as its own process (its servers, services, clients and load generators
are separate processes too) and writes ``bench/results/<scenario>.json``; a progress line
is printed as each starts and ends. A scenario that fails is reported and the rest still
run; the report then marks its figures as not measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from bench.cpustat import cpu_shares, cpu_times
from bench.report import CPU_SHARES, RESULTS, load_cpu_shares, write_report

# (scenario, full arguments, quick arguments)
SCENARIOS: list[tuple[str, list[str], list[str]]] = [
    ("normalize", [], ["--frames", "10000", "--service-frames", "20000", "--repeats", "3"]),
    ("snapshotter", [], ["--ticks", "100000", "--naive-s", "3"]),  # quick: the ramp dominates
    ("pipeline", [], ["--rates", "1000", "5000", "--seconds", "5"]),
    ("fanout", [], ["--quick"]),
    ("recovery", [], ["--quick"]),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller runs (about 3 minutes)")
    parser.add_argument("--only", nargs="+", choices=[s[0] for s in SCENARIOS])
    args = parser.parse_args()
    chosen = [s for s in SCENARIOS if not args.only or s[0] in args.only]
    started = time.monotonic()
    failed: list[str] = []
    # a run of some scenarios (--only) keeps the figures of the others
    shares = load_cpu_shares()
    for index, (name, full, quick) in enumerate(chosen, 1):
        print(f"[{index}/{len(chosen)}] {name} ... ({time.monotonic() - started:.0f} s so far)",
              flush=True)  # fmt: skip
        # a stale result must not pass for this run's figure
        (RESULTS / f"{name}.json").unlink(missing_ok=True)
        step, cpu_before = time.monotonic(), cpu_times()
        command = [sys.executable, "-m", f"bench.{name}", *(quick if args.quick else full)]
        done = subprocess.run(command, check=False)
        shares[name] = cpu_shares(cpu_before, cpu_times())
        verdict = "ok" if done.returncode == 0 else f"FAILED (exit {done.returncode})"
        steal = shares[name].get("steal_pct")
        print(f"[{index}/{len(chosen)}] {name} {verdict} in {time.monotonic() - step:.0f} s"
              + ("" if steal is None else f"; CPU time stolen by the hypervisor: {steal:.0f} %"),
              flush=True)  # fmt: skip
        if done.returncode != 0:
            failed.append(name)
    RESULTS.mkdir(parents=True, exist_ok=True)
    CPU_SHARES.write_text(json.dumps(shares, indent=2))
    print(
        f"all scenarios done in {time.monotonic() - started:.0f} s; writing the report", flush=True
    )
    table = write_report(
        quick=args.quick, duration_s=time.monotonic() - started, failed=failed, only=args.only
    )
    print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
