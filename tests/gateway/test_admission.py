"""Who may connect: API keys (403 before accept), the Origin allowlist (403), and the
per-key connection limit (1013) — enforced per process when Redis is unreachable, which
fails open."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from services.common.logthrottle import DEFAULT_BURST, DEFAULT_PER_S
from services.devstack.ports import free_port
from tests.gateway.conftest import StartGateway
from tests.gateway.helpers import Client, Stack, stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

KEYS = ("key-one-9f2c", "key-two-77ab")


@pytest.fixture(scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with stack(
        tmp_path_factory.mktemp("admission"),
        GATEWAY_API_KEYS=",".join(KEYS),
        WS_ALLOWED_ORIGINS="https://good.example, http://localhost:8080",
        WS_MAX_CONNECTIONS_PER_KEY="2",
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        REDIS_TIMEOUT_S="0.2",
    ) as shared:
        yield shared


async def _refused(url: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    with pytest.raises(InvalidStatus) as caught:
        async with websockets.connect(url, **kwargs):
            pass
    response = caught.value.response
    return response.status_code, json.loads(response.body or b"{}")


async def test_a_missing_or_wrong_api_key_is_refused_with_403_before_accept(gw: Stack) -> None:
    """No key, a wrong key or a malformed header: HTTP 403 with an ``unauthorized`` error
    body, no WebSocket; the failures are counted by reason."""
    url = gw.gateway.url
    cases: list[tuple[str, dict[str, Any]]] = [
        (url, {}),
        (url + "?token=nope", {}),
        (url, {"additional_headers": {"Authorization": "Bearer nope"}}),
        (url, {"additional_headers": {"Authorization": f"Basic {KEYS[0]}"}}),
        (url + "?token=" + KEYS[0][:-1], {}),
    ]
    for target, kwargs in cases:
        status, body = await _refused(target, **kwargs)
        assert status == 403, target
        assert body["type"] == "error" and body["code"] == "unauthorized", body
    assert await gw.gateway.wait_metric(
        "ledgerflux_gateway_auth_failures_total", 2, reason="missing"
    )
    assert await gw.gateway.wait_metric(
        "ledgerflux_gateway_auth_failures_total", 3, reason="invalid"
    )


async def test_a_valid_key_by_query_or_bearer_header_is_served(gw: Stack) -> None:
    """``?token=`` (what browsers can send) and ``Authorization: Bearer`` both work."""
    for url, headers in (
        (gw.gateway.url + f"?token={KEYS[0]}", {}),
        (gw.gateway.url, {"Authorization": f"Bearer {KEYS[1]}"}),
    ):
        async with websockets.connect(url, additional_headers=headers) as ws:
            assert json.loads(await ws.recv())["type"] == "welcome"


async def test_an_origin_outside_the_allowlist_is_refused_with_403(gw: Stack) -> None:
    """A browser Origin not in WS_ALLOWED_ORIGINS → 403; listed ones (compared
    case-insensitively) and clients sending no Origin are served."""
    url = gw.gateway.url + f"?token={KEYS[0]}"
    for origin in ("https://evil.example", "https://good.example.evil", "null"):
        status, body = await _refused(url, additional_headers={"Origin": origin})
        assert (status, body["code"]) == (403, "unauthorized"), origin
    for origin in ("https://good.example", "HTTP://LOCALHOST:8080"):
        async with websockets.connect(url, additional_headers={"Origin": origin}) as ws:
            assert json.loads(await ws.recv())["type"] == "welcome"
    assert await gw.gateway.wait_metric("ledgerflux_gateway_origin_rejected_total", 3)


async def test_the_per_key_limit_holds_per_process_while_redis_is_down(gw: Stack) -> None:
    """Redis unreachable: the gateway admits (fails open, counted), yet still enforces
    WS_MAX_CONNECTIONS_PER_KEY within the process: the third socket of a key gets 1013,
    another key is unaffected, and a freed slot is reusable."""
    url = gw.gateway.url + "?token="
    first = [await Client.connect(url + KEYS[0]) for _ in range(2)]
    for client in first:
        assert (await client.recv())["type"] == "welcome"
    third = await Client.connect(url + KEYS[0])
    assert await third.close_code() == 1013
    assert third.ws.close_reason == "too many connections for this API key"
    assert await gw.gateway.wait_metric(
        "ledgerflux_gateway_connections_refused_total", 1, cause="key_limit"
    )
    other = await Client.connect(url + KEYS[1])
    assert (await other.recv())["type"] == "welcome"
    # the start-up heartbeat already found Redis down: the connect path then skips it
    assert await gw.gateway.wait_metric("ledgerflux_gateway_redis_errors_total", 1, op="heartbeat")
    assert await gw.gateway.wait_metric("ledgerflux_gateway_redis_up", 0) == 0
    assert "redis_unavailable_failing_open" in gw.gateway.proc.log_path.read_text()
    assert await gw.gateway.wait_metric(
        "ledgerflux_gateway_key_limit_rejected_total", 1, scope="process"
    )
    await first.pop().close()
    deadline = time.monotonic() + 5
    while True:
        retry = await Client.connect(url + KEYS[0])
        # until the server has seen the close, the slot is still taken: 1013 again
        with contextlib.suppress(websockets.ConnectionClosed):
            if (await retry.recv())["type"] == "welcome":
                break
        assert time.monotonic() < deadline, "the freed slot was never reusable"
        await asyncio.sleep(0.05)
    for client in [*first, other, retry]:
        await client.close()


async def test_api_keys_never_reach_the_logs(gw: Stack) -> None:
    """Neither valid nor presented keys appear in the gateway's log."""
    await _refused(gw.gateway.url + "?token=presented-secret-123")
    await asyncio.sleep(0.2)
    log = gw.gateway.proc.log_path.read_text()
    assert "auth_failed" in log
    for secret in (*KEYS, "presented-secret-123"):
        assert secret not in log


async def test_denied_handshakes_and_invalid_utf8_log_no_errors(gw: Stack) -> None:
    """A denied key or origin is one ``auth_failed``/``origin_rejected`` line, not uvicorn's
    "connection rejected" plus an ERROR "ASGI callable returned without completing
    handshake." per attempt; a client's invalid UTF-8 is a WARNING without a traceback
    (closed 1007), not an ERROR."""
    log_path = gw.gateway.proc.log_path
    start = len(log_path.read_bytes())
    for _ in range(3):
        await _refused(gw.gateway.url + "?token=wrong-key-1")
        await _refused(gw.gateway.url + f"?token={KEYS[0]}", origin="https://evil.example")
    client = await Client.connect(gw.gateway.url + f"?token={KEYS[1]}")
    await client.expect("welcome")
    # bytes sent as a text frame: websockets sends them as they are (RFC 6455 §8.1: 1007)
    await client.ws.send(b'{"op": "ping", "id": "\xff\xfe\xc3\x28"}', text=True)
    assert await client.close_code() == 1007
    await asyncio.sleep(0.3)
    lines = [json.loads(line) for line in log_path.read_bytes()[start:].splitlines()]
    events = [line["event"] for line in lines]
    assert events.count("auth_failed") == 3 and events.count("origin_rejected") == 3, events
    assert not [line for line in lines if line["level"] in ("error", "critical")], lines
    (utf8,) = [line for line in lines if line["event"].startswith("Invalid UTF-8")]
    assert utf8["level"] == "warning" and "exc_info" not in utf8, utf8
    assert not [e for e in events if e.startswith("connection rejected")], events


async def test_a_storm_of_bad_keys_is_counted_in_full_but_logged_at_a_bounded_rate(
    start_gateway: StartGateway,
) -> None:
    """400 handshakes with a wrong key: every one is refused and counted in
    ``auth_failures_total``, but ``auth_failed`` lines stop after the throttle's burst plus
    its rate (a client must not be able to make logging the gateway's bottleneck); what was
    left out is counted, and the next line that passes says how many were left out since the
    last one."""
    gateway = await start_gateway(GATEWAY_API_KEYS=KEYS[0])
    attempts = 400
    started = time.monotonic()
    for _ in range(attempts // 50):
        results = await asyncio.gather(
            *(_refused(gateway.url + "?token=storm-key") for _ in range(50))
        )
        assert {status for status, _ in results} == {403}
    elapsed = time.monotonic() - started
    assert await gateway.wait_metric("ledgerflux_gateway_auth_failures_total", attempts) == attempts
    lines = [e for e in gateway.proc.events() if e["event"] == "auth_failed"]
    assert DEFAULT_BURST <= len(lines) <= DEFAULT_BURST + DEFAULT_PER_S * elapsed + 1
    suppressed = attempts - len(lines)
    assert (
        await gateway.wait_metric(
            "ledgerflux_log_lines_suppressed_total", suppressed, event="auth_failed"
        )
        == suppressed
    )
    await asyncio.sleep(2 / DEFAULT_PER_S)  # a token back
    await _refused(gateway.url + "?token=one-more")
    async with asyncio.timeout(5):
        while len(after := [e for e in gateway.proc.events() if e["event"] == "auth_failed"]) == (
            len(lines)
        ):
            await asyncio.sleep(0.05)
    # every attempt is a line or is counted on a later line
    assert after[-1]["suppressed"] > 0
    assert len(after) + sum(e.get("suppressed", 0) for e in after) == attempts + 1


async def test_requests_that_are_not_http_are_counted_in_full_and_logged_at_a_bounded_rate(
    start_gateway: StartGateway,
) -> None:
    """300 requests that are not HTTP: each is answered 400 and closed, counted in
    ``invalid_http_requests_total``, and logged as ``invalid_http_request`` through the log
    throttle; uvicorn's own line for each (unthrottled) is gone."""
    gateway = await start_gateway()
    attempts = 300

    async def garbage() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(b"\x16\x03\x01 not http at all\r\n\r\n")
        try:
            return await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()

    started = time.monotonic()
    for _ in range(attempts // 50):
        answers = await asyncio.gather(*(garbage() for _ in range(50)))
        assert all(a.startswith(b"HTTP/1.1 400 ") for a in answers), answers[:3]
    elapsed = time.monotonic() - started
    metric = "ledgerflux_gateway_invalid_http_requests_total"
    assert await gateway.wait_metric(metric, attempts) == attempts
    events = [e["event"] for e in gateway.proc.events()]
    logged = events.count("invalid_http_request")
    assert DEFAULT_BURST <= logged <= DEFAULT_BURST + DEFAULT_PER_S * elapsed + 1, logged
    assert not [e for e in events if e.startswith("Invalid HTTP request")], events[-5:]
