"""Free TCP ports on loopback, never the same one twice within a process.

The kernel may hand a port we just probed to another ``bind(0)`` in this
process before the server binds it; remembering what we handed out closes that
gap for our own allocations (stacks and per-test servers started side by side).
"""

from __future__ import annotations

import socket
import threading

from services.devstack.errors import DevStackError

LOOPBACK = "127.0.0.1"
# SeaweedFS derives a gRPC port from each HTTP port by adding this offset (the
# admin worker dials admin.port + 10000 even when told otherwise).
GRPC_PORT_OFFSET = 10_000

_ATTEMPTS = 200
_lock = threading.Lock()
_handed_out: set[int] = set()


def is_port_free(port: int, host: str = LOOPBACK) -> bool:
    """True if nothing listens on ``host:port`` (a TIME_WAIT leftover does not count).

    SO_REUSEADDR mirrors what nats-server, Java, weed and Redis set on their
    listeners, so a port counts as free exactly when they could bind it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _kernel_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def free_port(host: str = LOOPBACK) -> int:
    """A port free on ``host`` now and not returned before by this process."""
    with _lock:
        for _ in range(_ATTEMPTS):
            port = _kernel_port(host)
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise DevStackError(f"no free port on {host} after {_ATTEMPTS} attempts")


def free_port_pair(offset: int = GRPC_PORT_OFFSET, host: str = LOOPBACK) -> int:
    """A free port P such that P + ``offset`` is free too; both are reserved.

    For SeaweedFS, whose gRPC listener for an HTTP port P is P + 10000.
    """
    with _lock:
        for _ in range(_ATTEMPTS):
            port = _kernel_port(host)
            partner = port + offset
            if partner > 65_535 or port in _handed_out or partner in _handed_out:
                continue
            if is_port_free(partner, host):
                _handed_out.update((port, partner))
                return port
    raise DevStackError(f"no free port pair (P, P+{offset}) on {host} after {_ATTEMPTS} attempts")
