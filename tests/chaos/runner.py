"""One chaos scenario end to end: start the pipeline, inject, wait for the feed and the
catch-up, audit, print and keep the ledger, and stop everything."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tests.chaos.harness import FeedSpec, Pipeline, StoreEnv, log
from tests.chaos.ledger import Ledger, audit, gather, write_artifact

# Every ledger printed in this session, shown again in pytest's terminal summary.
REPORTS: list[str] = []

Inject = Callable[[Pipeline], Coroutine[Any, Any, None]]
Sampler = Callable[[Pipeline, asyncio.Event], Coroutine[Any, Any, dict[str, Any]]]


async def run_scenario(
    name: str,
    feed: FeedSpec,
    *,
    nats_urls: list[str],
    store: StoreEnv,
    workdir: Path,
    inject: Inject | None = None,
    allow_conflation: bool = False,
    replicas: int = 1,
    env: dict[str, str] | None = None,
    feed_timeout: float = 300.0,
    finish_timeout: float = 180.0,
    during: Sampler | None = None,
) -> Ledger:
    """Run ``feed`` through the pipeline with ``inject`` running alongside, then audit.

    ``during`` runs for the length of the feed too (the soak's sampler) until the event it
    gets is set, and returns extra figures for the artifact.
    """
    started = time.monotonic()
    pipe = Pipeline(name, feed, nats_urls, store, workdir, replicas=replicas, env=env)
    extra: dict[str, Any] = {}
    try:
        await pipe.start()
        side: list[asyncio.Task[Any]] = []
        if inject is not None:
            side.append(asyncio.create_task(inject(pipe)))
        stop_sampling = asyncio.Event()
        sampler = asyncio.create_task(during(pipe, stop_sampling)) if during else None
        await pipe.wait_feed_done(feed_timeout)
        await asyncio.gather(*side)
        if sampler is not None:
            stop_sampling.set()
            extra = await sampler
        problems = await pipe.finish(finish_timeout)
        stats = pipe.final_stats
        if stats is None:  # feedsim was gone already
            stats = await asyncio.to_thread(pipe.feed_stats)
        audit_started = time.monotonic()
        evidence = await gather(pipe.nats, store, pipe.delivery_log, pipe.client_log, stats)
        ledger = audit(evidence, name, feed.seed, allow_conflation=allow_conflation)
        pipe.timings["audit_s"] = time.monotonic() - audit_started
        for problem in problems:
            ledger.problem("converged", problem)
        for crash in pipe.crashes():
            ledger.problem("no_crashes", crash)
        codes = await pipe.close()
        for proc, code in codes.items():
            if code != 0:
                ledger.problem("clean_exit", f"{proc} exited {code} on SIGTERM")
    except BaseException:
        pipe.kill_all()
        raise
    by_kind = stats["faults"]["by_kind"]
    ledger.faults = {
        **{k: v for k, v in by_kind.items() if v},
        **({"malformed_variants": stats["faults"]["malformed_variants"]}
           if by_kind.get("malformed") else {}),
        "feed_connections": stats["clients"]["connections_total"],
        "rest_requests": stats["rest"]["requests"],
    }  # fmt: skip
    ledger.extras = extra
    pipe.timings["total_s"] = time.monotonic() - started
    ledger.context["timings"] = {k: round(v, 1) for k, v in pipe.timings.items()}
    ledger.context["backlog_max"] = pipe.backlog_max
    if pipe.recoveries:
        ledger.context["recoveries"] = [
            f"{r.service} down {r.down_s:.1f}s → "
            + (
                "killed again before it was current"
                if r.interrupted
                else f"current after {r.recovered_s:.1f}s"
                if r.recovered_s is not None
                else "NEVER current"
            )
            for r in pipe.recoveries
        ]
        for r in pipe.recoveries:
            if r.recovered_s is None and not r.interrupted:
                ledger.problem(
                    "recovered", f"{r.service} killed at {r.killed_at:.0f} never recovered"
                )
    if pipe.notes:
        ledger.context["notes"] = pipe.notes
    text = ledger.table()
    REPORTS.append(text)
    print("\n" + text, flush=True)
    path = write_artifact(
        ledger,
        {
            "feed": asdict(feed),
            "recoveries": [asdict(r) for r in pipe.recoveries],
            "timings": pipe.timings,
            "logs": str(pipe.logs),
            **extra,
        },
    )
    log(f"{name}: ledger written to {path}")
    return ledger


def assert_clean(ledger: Ledger) -> None:
    """The scenario's verdict: nothing lost, every check passed."""
    assert not ledger.problems, "\n" + ledger.table()
