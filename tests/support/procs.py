"""Run LedgerFlux services as real OS processes in tests, with their JSON logs on disk."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parents[2]


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process (all its threads) has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServiceProcess:
    """``python -m services.<name>`` with the given env and flags, logging to a file."""

    def __init__(
        self, name: str, env: dict[str, str], log_dir: Path, args: list[str] | None = None
    ) -> None:
        self.name = name
        self.module = f"services.{name}"
        self.args = args or []
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.log_path = log_dir / f"{name}.log"
        index = 1
        while self.log_path.exists():  # a restarted service gets a log of its own
            index += 1
            self.log_path = log_dir / f"{name}-{index}.log"
        self.log_path.touch()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line written so far."""
        if not self.log_path.exists():
            return []
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                parsed = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(parsed, dict):
                out.append(parsed)
        return out

    async def wait_for_event(self, event: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.events():
                if entry.get("event") == event:
                    return entry
            if self.proc is not None and self.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"{self.name} never logged {event!r}; log tail:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, then wait; returns the exit code (SIGKILL after ``timeout``)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait_exit(timeout)

    async def wait_exit(self, timeout: float = 10.0) -> int:
        """The exit code of a process already asked to stop (SIGKILL after ``timeout``)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name} ignored SIGTERM for {timeout}s:\n{self.tail()}")
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_to_exit(
    name: str, env: dict[str, str], args: list[str] | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run a service that is expected to exit by itself (e.g. on bad settings)."""
    return subprocess.run(
        [sys.executable, "-m", f"services.{name}", *(args or [])],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
