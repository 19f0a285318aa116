"""``python -m services.feedsim`` as a process: bad input, SIGTERM, and the max rate."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from .helpers import http_get_raw

REPO = Path(__file__).resolve().parents[2]


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDSIM_")}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.feedsim",
        *args,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


@contextlib.asynccontextmanager
async def feedsim_process(*args: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """A feedsim process on a free port; yields it and the port from its start-up log."""
    proc = await _spawn("--port", "0", *args)
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(15):
            while True:
                line = await proc.stderr.readline()
                assert line, "feedsim exited before listening"
                event = json.loads(line)
                if event.get("event") == "feedsim_listening":
                    port = int(event["port"])
                    break
        yield proc, port
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        # Drain so the pipe transport closes cleanly.
        await proc.stderr.read()


BAD_INPUT = [
    (["--faults", "explode=0.5"], "unknown fault kind 'explode'"),
    (["--rate", "-5"], "--rate"),
    (["--replay", "/nonexistent/rec.jsonl"], "/nonexistent/rec.jsonl"),
    (["--bogus"], "unrecognized arguments"),
    (["--speed", "fast"], "--speed"),
]


async def _run_bad(args: list[str]) -> tuple[list[str], int | None, list[str]]:
    proc = await _spawn(*args)
    _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    return args, proc.returncode, stderr.decode().splitlines()


async def test_bad_input_exits_2_with_one_line() -> None:
    """Bad CLI input: exit code 2 and a single 'feedsim: error:' line, no traceback."""
    results = await asyncio.gather(*(_run_bad(args) for args, _ in BAD_INPUT))
    for (args, code, lines), (_, needle) in zip(results, BAD_INPUT, strict=True):
        assert code == 2, (args, lines)
        assert len(lines) == 1, (args, lines)
        assert lines[0].startswith("feedsim: error: "), (args, lines)
        assert needle in lines[0], (args, lines)


async def test_sigterm_closes_clients_1001_and_exits_0() -> None:
    """SIGTERM: every client gets a 1001 close, the process exits 0."""
    async with feedsim_process("--products", "BTC-USD", "--rate", "50") as (proc, port):
        async with connect(f"ws://127.0.0.1:{port}/any/path") as ws:
            await ws.send(
                json.dumps(
                    {"type": "subscribe", "product_ids": ["BTC-USD"], "channels": ["ticker"]}
                )
            )
            assert json.loads(await ws.recv())["type"] == "subscriptions"
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(5):
                    while True:
                        await ws.recv()
            assert ws.close_code == 1001
        assert await asyncio.wait_for(proc.wait(), 10) == 0


async def _measure(port: int, products: list[str], compression: str, seconds: float) -> float:
    async with connect(
        f"ws://127.0.0.1:{port}",
        compression="deflate" if compression == "deflate" else None,
        max_queue=None,
    ) as ws:
        await ws.send(
            json.dumps({"type": "subscribe", "product_ids": products, "channels": ["ticker"]})
        )
        warmup = time.monotonic() + 0.3
        while time.monotonic() < warmup:
            await ws.recv()
        n, start = 0, time.monotonic()
        end = start + seconds
        while time.monotonic() < end:
            await ws.recv()
            n += 1
        return n / (time.monotonic() - start)


async def test_report_max_rate_100_products(capsys: pytest.CaptureFixture[str]) -> None:
    """Measures (does not assert tightly) the ticks/s one client gets over 100 products,
    without and with permessage-deflate (the server offers it; the client chooses)."""
    products = [f"SIM{i:04d}-USD" for i in range(1, 101)]
    rates: dict[str, float] = {}
    async with feedsim_process("--num-products", "100", "--rate", "1000000") as (proc, port):
        for compression in ("none", "deflate"):
            rates[compression] = await _measure(port, products, compression, seconds=1.0)
        status, body = await http_get_raw("127.0.0.1", port, "/sim/stats")
        assert status == 200
        drops = json.loads(body)["clients"]["slow_client_drops"]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    with capsys.disabled():
        for compression, rate in rates.items():
            label = f"1 client, 100 products, compression {compression}"
            print(f"\n[feedsim] max rate to {label}: {rate:,.0f} ticks/s")
    assert drops == 0
    assert min(rates.values()) > 2_000  # sanity only: absolute numbers are noisy here
