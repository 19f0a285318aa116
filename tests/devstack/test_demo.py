"""``make demo`` restarts on a stack that keeps MD_TICKS: feedsim's sequences must start
above what the previous run stored, or the normalizer drops every tick as stale."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from services.devstack.demo import Child, DemoOptions, run_demo
from services.devstack.ports import free_port
from services.feedsim.market import Market
from services.feedsim.settings import clock_sequence_base


def test_a_later_demo_starts_above_everything_an_earlier_one_emitted() -> None:
    """Run 1 lasts an hour at a high rate; run 2 starts a second after it ended: every
    product's first sequence in run 2 is above its last in run 1."""
    products = ["BTC-USD", "ETH-USD", "DOGE-USD"]
    start = 1_800_000_000.0
    first = Market(products, seed=7, skew=1.0, now_ns=0, sequence_base=clock_sequence_base(start))
    for _ in range(20_000):  # ~ an hour of this product's tickers at the demo's rate
        for product in products:
            first.models[product].step(0, "2026-01-01T00:00:00.000000Z")
    later = Market(
        products, seed=7, skew=1.0, now_ns=0, sequence_base=clock_sequence_base(start + 3601)
    )
    for product in products:
        assert later.models[product].sequence > first.models[product].sequence


def test_a_taken_service_port_fails_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Port 8080 taken (a demo already running, another program): one line naming the
    port and its setting, before any server starts. It was the gateway dying with a bind
    error after the whole stack had come up, its log tail mixed with an older run's."""
    monkeypatch.delenv("GATEWAY_PORT", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        options = DemoOptions(root=tmp_path, gateway_port=port, feed_port=free_port(), duration_s=1)
        assert run_demo(options) == 1
    out, err = capsys.readouterr()
    assert f"port {port} for GATEWAY_PORT (the gateway) already in use" in err
    assert "servers stopped" not in out  # none was started
    assert not (tmp_path / "nats").exists() and not (tmp_path / "logs").exists()


def test_a_dying_service_is_reported_with_this_runs_log_lines_only(tmp_path: Path) -> None:
    """Service logs are appended across demo runs: the lines shown for a process that
    died are its own, not the end of an earlier run's."""
    log = tmp_path / "gateway.log"
    log.write_text("earlier run: stopped cleanly\n" * 20)
    offset = log.stat().st_size
    with log.open("a") as out:
        out.write('{"event": "config_error"}\n')
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(2)"])
    proc.wait()
    child = Child("gateway", proc, log, offset)
    assert child.log_tail() == '{"event": "config_error"}'
