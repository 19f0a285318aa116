"""The ``Server`` base: one real server run as a child process, with readiness and stop.

Each server is launched in its own session, so a Ctrl-C in the terminal reaches
only us and we stop the children in order. ``launch`` and ``wait_ready`` are
separate so a stack can start its servers overlapping: ``start`` is both.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import datetime
import http.client
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Literal, Self

from services.common.logging import get_logger
from services.devstack.errors import (
    DevStackError,
    PortInUseError,
    ServerExitedError,
    ServerReadyTimeoutError,
)
from services.devstack.ports import LOOPBACK, is_port_free

log = get_logger(__name__)

LOG_TAIL_LINES = 20
DEFAULT_STOP_TIMEOUT_S = 10.0
_STOP_POLL_S = 0.05

# How a wait for a stopping server ended: it exited, ``timeout`` passed, or its log showed
# the stop past the point where a kill loses nothing and it then hung (see ``kill_grace_s``).
StopWait = Literal["exited", "timeout", "hung"]

_PR_SET_PDEATHSIG = 1
_prctl: Callable[..., int] | None
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except AttributeError:  # not Linux: no parent-death signal, servers outlive a killed parent
    _prctl = None


class Server(abc.ABC):
    """One server process with a data dir and a log file ``<data_dir>/../logs/<name>.log``.

    ``die_with_parent`` (Linux) has the kernel SIGTERM the server when the thread
    that launched it dies, so a SIGKILLed test run leaves nothing behind; launch
    from a long-lived thread (the main one), not from a short-lived worker.
    """

    name: ClassVar[str]
    ready_timeout: ClassVar[float]
    poll_interval: ClassVar[float] = 0.02
    # A server known to hang on stop sets this and ``kill_is_safe``: once its log shows the
    # stop is past the point where a kill loses nothing, it gets this long, then is killed.
    kill_grace_s: ClassVar[float | None] = None

    @classmethod
    def kill_is_safe(cls, log_text: str) -> bool:
        """Whether the server's log (its tail) shows a stop far enough along that a kill
        loses nothing."""
        return False

    def __init__(
        self, data_dir: Path, *, log_file: Path | None = None, die_with_parent: bool = True
    ) -> None:
        # Absolute: each server runs with its data dir as cwd.
        self.data_dir = data_dir.absolute()
        self.log_file = (log_file or self.data_dir.parent / "logs" / f"{self.name}.log").absolute()
        self.die_with_parent = die_with_parent
        self.host = LOOPBACK
        self.ready_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._launched_at = 0.0

    # -- what each server defines

    @property
    @abc.abstractmethod
    def ports(self) -> dict[str, int]:
        """Every port the server listens on, by role."""

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """Where clients connect."""

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The argv that runs the server in the foreground."""

    @abc.abstractmethod
    def probe(self) -> bool:
        """One readiness check (see ``probes``)."""

    @abc.abstractmethod
    def cmdline_markers(self) -> list[str]:
        """Substrings of ``/proc/<pid>/cmdline`` (joined by spaces) that identify this server."""

    def environment(self) -> dict[str, str] | None:
        """The child's environment; None inherits ours."""
        return None

    def prepare(self) -> None:
        """Install or locate what the command needs; may be slow the first time."""
        return

    def _bind_host(self) -> str:
        return self.host

    def _after_exit(self) -> None:
        """Clean up what the process leaves behind once it has exited."""
        return

    # -- lifecycle

    @property
    def pid(self) -> int | None:
        """The pid of the last launched process (running or not), None before a launch."""
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def check_ports_free(self) -> None:
        """Raise ``PortInUseError`` if another process already listens on one of our ports."""
        for port in sorted(set(self.ports.values())):
            if not is_port_free(port, self._bind_host()):
                raise PortInUseError(self.name, port)

    def launch(self) -> None:
        """Start the process without waiting for it to be ready."""
        if self.is_running:
            raise DevStackError(f"{self.name} is already running (pid {self.pid})")
        self.prepare()
        command = self.command()
        self.check_ports_free()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.ready_seconds = None
        with self.log_file.open("ab") as log_fd:
            now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            log_fd.write(f"--- {now} devstack: {shlex.join(command)}\n".encode())
            log_fd.flush()
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                env=self.environment(),
                start_new_session=True,
                preexec_fn=_parent_death_signal(os.getpid()) if self.die_with_parent else None,
            )
        self._launched_at = time.monotonic()
        log.info("server_launched", server=self.name, pid=self._proc.pid, **self.ports)

    def wait_ready(
        self, timeout: float | None = None, *, cancel: threading.Event | None = None
    ) -> float:
        """Poll the readiness check until it passes; return seconds since launch.

        Raises ``ServerExitedError`` as soon as the process dies and
        ``ServerReadyTimeoutError`` after ``timeout`` (default: the server's own),
        both with the tail of the log; setting ``cancel`` aborts the wait.
        """
        proc = self._require_proc()
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            returncode = proc.poll()
            if returncode is not None:
                raise ServerExitedError(self.name, returncode, self.log_file, self.log_tail())
            with contextlib.suppress(OSError, http.client.HTTPException):
                if self.probe():
                    break
            if time.monotonic() >= deadline:
                raise ServerReadyTimeoutError(self.name, timeout, self.log_file, self.log_tail())
            if cancel is not None and cancel.wait(self.poll_interval):
                raise DevStackError(f"{self.name}: start cancelled")
            if cancel is None:
                time.sleep(self.poll_interval)
        self.ready_seconds = time.monotonic() - self._launched_at
        log.info(
            "server_ready", server=self.name, pid=proc.pid, ready_s=round(self.ready_seconds, 3)
        )
        return self.ready_seconds

    def start(self, timeout: float | None = None) -> Self:
        """Launch and wait until ready; a server that fails to come up is killed."""
        self.launch()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def terminate(self) -> None:
        """Send SIGTERM without waiting (a stack signals all, then waits for each)."""
        if self.is_running and self._proc is not None:
            self._proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> int | None:
        """Wait for the process to exit, SIGKILL it after ``timeout``; its exit code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is not None:  # reaped by an earlier stop or kill
            return proc.returncode
        outcome = wait_for_stop(
            type(self), proc.pid, self.log_file, timeout, lambda s: _exits_within(proc, s)
        )
        if outcome != "exited":
            if outcome == "timeout":
                log.warning(
                    "server_stop_timeout", server=self.name, pid=proc.pid, timeout_s=timeout
                )
            self.kill()
        returncode = proc.wait()
        self._after_exit()
        log.info("server_stopped", server=self.name, pid=proc.pid, returncode=returncode)
        return returncode

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; safe to call when stopped."""
        self.terminate()
        return self.wait_stopped(timeout)

    def kill(self) -> None:
        """SIGKILL the server's whole process group at once, as a crash would."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            # Not reaped yet, so the pid still names its process group (start_new_session).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self._after_exit()

    def restart(
        self, timeout: float | None = None, *, stop_timeout: float = DEFAULT_STOP_TIMEOUT_S
    ) -> Self:
        """Stop (if running) and start again on the same ports and data dir."""
        self.stop(stop_timeout)
        return self.start(timeout)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the log file."""
        return log_tail(self.log_file, lines)

    def _require_proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise DevStackError(f"{self.name} was never launched")
        return self._proc

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<{type(self).__name__} {self.url} pid={self.pid} {state}>"


def _parent_death_signal(parent_pid: int) -> Callable[[], None]:
    def set_pdeathsig() -> None:
        if _prctl is None:
            return
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return set_pdeathsig


def log_tail(log_file: Path, lines: int = LOG_TAIL_LINES, *, start: int = 0) -> str:
    """The last ``lines`` lines of a log file, none from before byte ``start`` (where the
    current run began: logs are appended across runs)."""
    try:
        with log_file.open("rb") as log_fd:
            log_fd.seek(0, os.SEEK_END)
            log_fd.seek(max(start, log_fd.tell() - 64 * 1024))
            text = log_fd.read().decode(errors="replace")
    except OSError as exc:
        return f"<no log: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def wait_for_stop(
    server: type[Server],
    pid: int,
    log_file: Path,
    timeout: float,
    exits_within: Callable[[float], bool],
) -> StopWait:
    """Wait up to ``timeout`` for a signalled server to exit (``exits_within(s)``: whether it
    has exited, waiting at most ``s``); for a server with ``kill_grace_s``, only that long
    once its log shows the stop past its safe point (logged: the caller kills it)."""
    deadline = time.monotonic() + timeout
    safe_since: float | None = None
    while not exits_within(min(_STOP_POLL_S, max(0.0, deadline - time.monotonic()))):
        now = time.monotonic()
        if now >= deadline:
            return "timeout"
        grace = server.kill_grace_s
        if grace is None:
            continue
        if safe_since is None:
            if server.kill_is_safe(log_tail(log_file)):
                safe_since = now
        elif now - safe_since >= grace:
            log.info(
                "server_hung_on_stop",
                server=server.name,
                pid=pid,
                hung_s=round(now - safe_since, 1),
                last_step=log_tail(log_file, 1).strip(),
                action="killed: its stop was past the point where a kill loses nothing",
            )
            return "hung"
    return "exited"


def _exits_within(proc: subprocess.Popen[bytes], seconds: float) -> bool:
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        return False
    return True
