"""``test_client.py`` against a real gateway: backfill, batch frames and its summary."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from tests.gateway.helpers import Stack, fresh_seqs
from tests.support.procs import REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_cli_client_reads_backfill_and_batch_frames_and_summarises(
    default_gw: Stack,
) -> None:
    """``--backfill 5 --batch``: the summary counts the snapshot, 5 backfilled ticks and the
    live ticks, with no seq regression (exit 0)."""
    await default_gw.feed.publish(("BTC-USD", s) for s in fresh_seqs(20))
    backfills = await asyncio.to_thread(
        default_gw.gateway.metric, "ledgerflux_gateway_backfill_ticks_count"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(REPO / "test_client.py"),
        "--url", default_gw.gateway.url, "--products", "BTC-USD",
        "--backfill", "5", "--batch", "--duration", "3", "--quiet",
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    # live ticks only once its backfill is read (else they could be the backfill's last 5)
    await default_gw.gateway.wait_metric("ledgerflux_gateway_backfill_ticks_count", backfills + 1)
    live = fresh_seqs(7)
    await default_gw.feed.publish(("BTC-USD", s) for s in live)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, stderr.decode()
    line = next(x for x in stdout.decode().splitlines() if x.startswith("summary "))
    summary = json.loads(line.removeprefix("summary "))
    assert summary["snapshots"] == 1
    assert summary["backfilled"] == 5
    assert summary["ticks"] == len(live)
    assert summary["seq_regressions"] == 0
    assert summary["errors"] == []
