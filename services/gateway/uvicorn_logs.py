"""What uvicorn logs on ``uvicorn.error``, made fit for operators.

- Its WebSocket lines carry the path with its query string, ``?token=<API key>``
  included: redacted.
- Its per-connection open/close lines are dropped; ours carry the same with ``conn_id``
  (``client_connected``/``client_disconnected``). ``__main__`` also sets the logger to
  WARNING, so those INFO records are not even made (~10 % of a handshake's CPU); the filter
  stays for the lines above that level and in case the level is lowered.
- A handshake we deny on purpose (bad API key, origin not allowed: 403, logged by us as
  ``auth_failed``/``origin_rejected``) made it log "connection rejected (403 Forbidden)"
  and, at ERROR, "ASGI callable returned without completing handshake.": an error line for
  every bad key of an attack. Both are dropped for denied handshakes only.
- A request that is not HTTP made it log "Invalid HTTP request received." for every one,
  at whatever rate a client sends them: counted in
  ``ledgerflux_gateway_invalid_http_requests_total`` and logged as our
  ``invalid_http_request`` through the log throttle instead.
- A text frame that is not UTF-8 is the client's fault: uvicorn closes it with 1007
  (counted in ``ledgerflux_gateway_disconnects_total{code="1007"}``) but logged it at ERROR
  with a traceback. Logged at WARNING, without the traceback.
"""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar

from services.common.logging import get_logger
from services.common.logthrottle import throttle
from services.gateway import metrics

log = get_logger(__name__)

_DENIED = ContextVar("ledgerflux_handshake_denied", default=False)
_TOKEN = re.compile(r"(token=)[^&\s\"]*")
_CHATTER = frozenset({"connection open", "connection closed"})
_DENIAL_LINES = frozenset(
    {"connection rejected (403 Forbidden)", "ASGI callable returned without completing handshake."}
)
_INVALID_UTF8 = "Invalid UTF-8 sequence received from client."
_INVALID_REQUEST = "Invalid HTTP request received."


def mark_handshake_denied() -> None:
    """Called by the endpoint before it denies a handshake: the connection's task (uvicorn
    logs from the same one) then drops uvicorn's lines about it."""
    _DENIED.set(True)


class UvicornLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in _CHATTER or message.endswith("[accepted]"):
            return False
        if message in _DENIAL_LINES and _DENIED.get():
            return False
        if message == _INVALID_REQUEST:  # answered 400 by uvicorn
            metrics.INVALID_HTTP_REQUESTS.inc()
            throttle.emit(log.warning, "invalid_http_request")
            return False
        if message == _INVALID_UTF8:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        if "token=" in message:
            record.msg, record.args = _TOKEN.sub(r"\1[redacted]", message), None
        return True
