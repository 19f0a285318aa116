"""Who may open a WebSocket: the Origin allowlist and API keys, checked before accept.

Both failures answer the upgrade request with HTTP 403 and never open a socket (DESIGN §8
allows 403 before accept instead of close 4401): nothing is spent on a peer we refuse,
and the 403 body is the protocol's own ``error`` object with code ``unauthorized``.

API keys come from ``?token=`` (browsers cannot set headers on a WebSocket) or
``Authorization: Bearer``. They are compared as SHA-256 digests with
``hmac.compare_digest`` against every configured key, so timing reveals neither which
key matched nor a key's length; keys are never logged.

The Origin check stops other web sites from opening sockets with a visitor's browser.
Clients that send no Origin (non-browsers, which could forge it anyway) pass it.

:meth:`Gatekeeper.denial` runs in the gateway's WebSocket protocol (``frames.py``), on the
parsed upgrade request, before any ASGI work: a refused handshake then costs no scope, task,
middleware stack or Starlette response. Under a bad-key storm that halved the gateway's CPU
per refusal (ARCHITECTURE.md). The endpoint calls it too, for a server without our protocol.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from services.common.logging import get_logger
from services.common.logthrottle import throttle
from services.gateway import metrics
from services.gateway.protocol import encode
from services.gateway.settings import GatewaySettings, normalize_origin

log = get_logger(__name__)


def presented_key(query: Mapping[str, str], headers: Mapping[str, str]) -> str | None:
    """The API key a client presents, from ``?token=`` or ``Authorization: Bearer``."""
    token = query.get("token")
    if token:
        return token
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


class Gatekeeper:
    def __init__(self, settings: GatewaySettings) -> None:
        self._digests = [_digest(k.get_secret_value()) for k in settings.gateway_api_keys]
        self._origins = frozenset(settings.ws_allowed_origins)

    @property
    def keys_required(self) -> bool:
        return bool(self._digests)

    def key_valid(self, key: str | None) -> bool:
        if not self._digests:
            return True
        if key is None:
            return False
        candidate = _digest(key)
        matched = False
        for digest in self._digests:  # no early exit: the time does not depend on the match
            matched |= hmac.compare_digest(candidate, digest)
        return matched

    def denial(
        self, query: Mapping[str, str], headers: Mapping[str, str], client: str
    ) -> str | None:
        """Why a WebSocket upgrade is refused (counted and logged here), or ``None``.
        ``headers`` must look names up case-insensitively (Starlette's and websockets' do)."""
        origin = headers.get("origin")
        if not self.origin_allowed(origin):
            metrics.ORIGIN_REJECTED.inc()
            throttle.emit(log.info, "origin_rejected", origin=(origin or "")[:200], client=client)
            return "origin not allowed"
        key = presented_key(query, headers)
        if not self.key_valid(key):
            reason = "missing" if key is None else "invalid"
            metrics.AUTH_FAILURES.labels(reason=reason).inc()
            throttle.emit(log.info, "auth_failed", reason=reason, client=client)
            return f"{reason} API key"
        return None

    def origin_allowed(self, origin: str | None) -> bool:
        if not self._origins or origin is None:
            return True
        return normalize_origin(origin) in self._origins


def peer_name(client: tuple[str, int] | None) -> str:
    """``host:port`` of a peer (uvicorn's tuple or Starlette's ``Address``) for log lines."""
    return "unknown" if client is None else f"{client[0]}:{client[1]}"


def denial_body(reason: str) -> bytes:
    """The 403 body of a refused upgrade: the protocol's ``error`` with code ``unauthorized``."""
    return encode({"type": "error", "code": "unauthorized", "message": reason, "id": None})


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
