"""``<root>/state.json``: what a running stack is, so another process can stop it.

Pids are checked against ``/proc/<pid>/cmdline`` before any signal: a pid
recorded days ago may belong to an unrelated process by now.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from functools import partial
from pathlib import Path

import msgspec

from services.common.logging import get_logger
from services.devstack.process import Server, wait_for_stop
from services.devstack.servers import SERVER_TYPES

log = get_logger(__name__)

STATE_FILE = "state.json"
_POLL_S = 0.05
_KILL_WAIT_S = 2.0


class ServerRecord(msgspec.Struct, frozen=True):
    name: str
    pid: int
    url: str
    ports: dict[str, int]
    # Substrings of the process's cmdline (joined by spaces) that identify it.
    markers: list[str]
    log_file: str


class StackState(msgspec.Struct, frozen=True):
    root: str
    started_at: str
    startup_seconds: float
    env: dict[str, str]
    servers: list[ServerRecord]


def state_path(root: Path) -> Path:
    return root / STATE_FILE


def write_state(root: Path, state: StackState) -> None:
    """Write atomically: a concurrent ``status`` never reads half a file."""
    path = state_path(root)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(state)))
    tmp.replace(path)


def read_state(root: Path) -> StackState | None:
    """The recorded state, or None when there is none."""
    try:
        data = state_path(root).read_bytes()
    except FileNotFoundError:
        return None
    return msgspec.json.decode(data, type=StackState)


def remove_state(root: Path) -> None:
    state_path(root).unlink(missing_ok=True)


def _cmdline(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # The state letter follows the ")" closing the command name; Z = zombie, X = dead.
            if stat.read().rpartition(b")")[2].split()[0] in (b"Z", b"X"):
                return None
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError):
        return None


def is_alive(record: ServerRecord) -> bool:
    """The recorded pid is alive and still runs the recorded server."""
    cmdline = _cmdline(record.pid)
    if cmdline is None:
        return False
    # Each marker must end at a word boundary: "-p 4222" must not match "-p 42220".
    return all(f"{marker} " in f"{cmdline} " for marker in record.markers)


def live_pids(state: StackState) -> list[int]:
    return [record.pid for record in state.servers if is_alive(record)]


def stop_recorded(state: StackState, timeout: float) -> dict[str, str]:
    """Stop the servers ``state`` lists (not our children): SIGTERM all, then wait for each.

    Each gets ``timeout`` seconds before a SIGKILL of its process group (a server known to
    hang on stop less: ``Server.kill_grace_s``). Returns what happened per server:
    ``stopped``, ``killed`` or ``not running``.
    """
    outcome: dict[str, str] = {}
    signalled: list[ServerRecord] = []
    for record in reversed(state.servers):
        if not is_alive(record):
            outcome[record.name] = "not running"
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGTERM)
        signalled.append(record)
    for record in signalled:
        server = SERVER_TYPES.get(record.name, Server)
        waited = wait_for_stop(
            server, record.pid, Path(record.log_file), timeout, partial(_wait_dead, record)
        )
        if waited != "exited":
            if waited == "timeout":
                log.warning(
                    "server_stop_timeout", server=record.name, pid=record.pid, timeout_s=timeout
                )
            # Each server leads its own process group (start_new_session).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(record.pid, signal.SIGKILL)
            _wait_dead(record, _KILL_WAIT_S)
            outcome[record.name] = "killed"
        else:
            outcome[record.name] = "stopped"
        log.info("server_stopped", server=record.name, pid=record.pid, outcome=outcome[record.name])
    return outcome


def _wait_dead(record: ServerRecord, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while is_alive(record):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)
    return True
