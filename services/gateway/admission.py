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
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from services.gateway.settings import GatewaySettings, normalize_origin


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

    def origin_allowed(self, origin: str | None) -> bool:
        if not self._origins or origin is None:
            return True
        return normalize_origin(origin) in self._origins


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
