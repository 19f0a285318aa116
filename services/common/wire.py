"""Direct dispatch of hot NATS subscriptions, under nats-py's connection.

nats-py turns every incoming message into work the hot paths do not need: control lines
matched by up to two regexes, a header dict built line by line, a ``Msg`` dataclass, a
queue hop into a per-subscription task and, for pull fetches, an ``asyncio.wait_for`` per
message. That was ~40 % of the normalizer's CPU (py-spy, ARCHITECTURE.md).

:class:`DirectParser` replaces the client's protocol parser (same states, same handling
of every protocol line) and hands the messages of *registered* subscriptions straight to
a synchronous handler as raw bytes, inside the read loop. Every other subscription goes
through nats-py's own ``_process_msg`` unchanged. Subscriptions stay nats-py's: they are
re-sent on reconnect with the same sid, so their handlers keep working.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.errors import ProtocolError
from nats.protocol.parser import (
    AWAITING_CONTROL_LINE,
    AWAITING_MSG_PAYLOAD,
    ERR_RE,
    INFO_RE,
    MAX_CONTROL_LINE_SIZE,
    OK_RE,
    PING_RE,
    PONG_RE,
    Parser,
)

# (subject, reply, payload, raw header block or None); runs inside the read loop: no await
DirectHandler = Callable[[bytes, bytes, bytes, bytes | None], None]

_CRLF = b"\r\n"


class DirectParser(Parser):
    """nats-py's protocol parser with a fast path for MSG/HMSG and direct handlers."""

    def __init__(self, nc: NATS | None = None) -> None:
        super().__init__(nc)
        self.handlers: dict[int, DirectHandler] = {}

    async def parse(self, data: bytes = b"") -> None:
        """Handle every whole protocol line and message in the buffer plus ``data``.

        Messages are cut out of one immutable copy of the buffer by position, and the
        buffer is trimmed once per call: slicing the ``bytearray`` per message (the
        control line and the payload each copied twice, the buffer shifted twice, the
        arguments kept in a dict) cost ~30 % more (callgrind, ARCHITECTURE.md)."""
        buf = self.buf
        buf.extend(data)
        handlers = self.handlers
        view = bytes(buf)
        size = len(view)
        pos = 0
        # the message whose payload is awaited, if any (carried over from the last read)
        in_payload = self.state == AWAITING_MSG_PAYLOAD
        if in_payload:
            arg = self.msg_arg
            sid, subject, reply = arg["sid"], arg["subject"], arg["reply"]
            needed, header_size = self.needed, self.header_needed
        try:
            while pos < size:
                if not in_payload:
                    with_headers = view.startswith(b"HMSG ", pos)
                    if not with_headers and not view.startswith(b"MSG ", pos):
                        # a line of another kind (rare): nats-py's handling on the buffer
                        del buf[:pos]
                        pos = 0
                        if not await self._other_line():
                            return
                        view = bytes(buf)
                        size = len(view)
                        continue
                    end = view.find(_CRLF, pos)
                    if end < 0:
                        if size - pos > MAX_CONTROL_LINE_SIZE:
                            raise ProtocolError("nats: control line too long")
                        return  # a split control line: wait for the rest
                    # MSG <subject> <sid> [reply] <size> / HMSG ... [reply] <hdr> <size>
                    args = view[pos + 4 + with_headers : end].split()
                    count = len(args) - with_headers
                    if count not in (3, 4) or not args[-1].isdigit():
                        raise ProtocolError("nats: malformed MSG")
                    needed = int(args[-1])
                    header_size = 0
                    if with_headers:
                        if not args[-2].isdigit():
                            raise ProtocolError("nats: malformed MSG")
                        header_size = int(args[-2])
                    subject, sid = args[0], int(args[1])
                    reply = args[2] if count == 4 else b""
                    pos = end + 2
                    in_payload = True
                end = pos + needed
                if size - end < 2:
                    return  # wait for the whole payload (and its CRLF)
                if header_size:
                    headers: bytes | None = view[pos : pos + header_size]
                    payload = view[pos + header_size : end]
                else:
                    headers = None
                    payload = view[pos:end]
                pos = end + 2
                in_payload = False
                handler = handlers.get(sid)
                if handler is not None:
                    handler(subject, reply, payload, headers)
                else:
                    assert self.nc is not None
                    await self.nc._process_msg(sid, subject, reply, payload, headers)
        finally:
            if pos:
                del buf[:pos]
            if in_payload:
                self.state = AWAITING_MSG_PAYLOAD
                self.msg_arg.update(sid=sid, subject=subject, reply=reply)
                self.needed, self.header_needed = needed, header_size
            else:
                self.state = AWAITING_CONTROL_LINE

    async def _other_line(self) -> bool:
        """Handle one non-message control line as nats-py does; ``False``: need more bytes."""
        buf = self.buf
        nc = self.nc
        assert nc is not None
        if match := OK_RE.match(buf):
            del buf[: match.end()]
        elif match := PING_RE.match(buf):
            del buf[: match.end()]
            await nc._process_ping()
        elif match := PONG_RE.match(buf):
            del buf[: match.end()]
            await nc._process_pong()
        elif match := ERR_RE.match(buf):
            message = match.groups()[0].decode().lower()
            await nc._process_err(message)
            del buf[: match.end()]
        elif match := INFO_RE.match(buf):
            info = json.loads(match.groups()[0].decode())
            await nc._process_info(info)
            del buf[: match.end()]
        elif len(buf) < MAX_CONTROL_LINE_SIZE and _CRLF in buf:
            raise ProtocolError("nats: unknown protocol")
        else:
            return False
        return True


def direct_parser(nc: NATS) -> DirectParser:
    """The client's :class:`DirectParser`, installed first if needed.

    Installing between two reads is safe: ``parse`` never awaits anything that waits on
    the network, so the read loop is never suspended inside it; the state is carried over.
    """
    current = nc._ps
    if isinstance(current, DirectParser):
        return current
    parser = DirectParser(nc)
    parser.buf = current.buf
    parser.state = current.state
    parser.needed = current.needed
    parser.header_needed = current.header_needed
    parser.msg_arg = current.msg_arg
    nc._ps = parser
    return parser


async def subscribe_direct(nc: NATS, subject: str, handler: DirectHandler) -> Subscription:
    """Subscribe ``subject`` with ``handler`` called in the read loop for each message.

    The handler is registered before the SUB goes out, so no message can miss it.
    """
    parser = direct_parser(nc)
    sid = nc._sid + 1  # what nc.subscribe assigns next (nothing can run in between)
    parser.handlers[sid] = handler
    try:
        sub = await nc.subscribe(subject)
    except BaseException:
        parser.handlers.pop(sid, None)
        raise
    if sub._id != sid:  # a nats-py change in sid assignment: move the handler over
        parser.handlers[sub._id] = parser.handlers.pop(sid)
    return sub


async def unsubscribe_direct(nc: NATS, sub: Subscription) -> None:
    direct_parser(nc).handlers.pop(sub._id, None)
    await sub.unsubscribe()


def parse_headers(raw: bytes) -> dict[str, str]:
    """A NATS header block as nats-py's ``Msg.headers`` has it: the inline status (``NATS/1.0
    408 Request Timeout``) as ``Status``/``Description``, then ``Name: Value`` lines."""
    lines = raw.decode("utf-8", "replace").split("\r\n")  # one decode, then str work
    headers: dict[str, str] = {}
    status_line = lines[0][8:].strip()  # after "NATS/1.0"
    if status_line:
        code, _, description = status_line.partition(" ")
        headers["Status"] = code
        if description:
            headers["Description"] = description
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep and name:
            headers[name.strip()] = value.strip()
    return headers


def status_of(raw: bytes | None) -> bytes | None:
    """The inline status code of a header block (``b"408"``), ``None`` for a plain one."""
    if raw is None or len(raw) < 12 or raw[8:9] != b" ":
        return None
    return raw[9:12]
