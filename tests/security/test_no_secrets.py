"""No secret reaches a log line or a /metrics page.

The services run as real processes with recognisable secrets ("canaries"): gateway API
keys, a NATS password (nats-server with user/password auth, in ``NATS_URLS``), a Redis
password (redis-server with ``requirepass``, in ``REDIS_URL``) and an AWS secret access key
(the snapshotter's, against a SeaweedFS S3 of this module whose credentials it is, and the
session's DynamoDB Local). They are then exercised the ways that make services talk: good
and bad API keys (query and header), a wrong Redis password, an unreachable NATS, a wrong
NATS password, settings that fail validation, a snapshot cycle, SIGTERM. Every line every
service wrote, every config-error line and every /metrics page scraped (label values
included) is then searched for each canary.

The canaries are plain ``[A-Za-z0-9-]``: URL encoding, JSON escaping and repr leave them
unchanged, so a substring search finds any of those renderings. The AWS access key id is
an identifier, not a secret, and is not searched for.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from services.devstack.ports import free_port
from services.devstack.servers import NatsServer, RedisServer, SeaweedPorts, SeaweedS3
from services.devstack.stack import DevStack
from tests.gateway.helpers import Feed
from tests.support.procs import REPO, ServiceProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NATS_USER = "ledgerflux"
SECRETS = {
    "GATEWAY_API_KEYS[0]": "gwkey-CANARY-7f3e9c41",
    "GATEWAY_API_KEYS[1]": "gwkey-CANARY-1d2b8a55",
    "a presented wrong API key": "presented-CANARY-4c5d6e",
    "NATS password": "natspw-CANARY-5e6f7a",
    "a wrong NATS password": "natspw-CANARY-wrong-93ab",
    "Redis password": "redispw-CANARY-8b9c0d",
    "a wrong Redis password": "redispw-CANARY-wrong-0d9c",
    "AWS_SECRET_ACCESS_KEY": "awssecret-CANARY-2f4e6a8c",
}
AWS_ACCESS_KEY_ID = "AKIACANARY0123456789"
PRODUCTS = ["SEC1-USD", "SEC2-USD"]


class AuthNats(NatsServer):
    """nats-server with user/password auth from a config file (not on its command line)."""

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        password = SECRETS["NATS password"]
        (self.data_dir / "auth.conf").write_text(
            f'authorization {{ user: "{NATS_USER}", password: "{password}" }}\n'
        )

    def command(self) -> list[str]:
        return [*super().command(), "-c", str(self.data_dir / "auth.conf")]

    def url_with(self, password: str) -> str:
        return f"nats://{NATS_USER}:{password}@{self.host}:{self.port}"


class AuthRedis(RedisServer):
    """redis-server with ``requirepass``."""

    def command(self) -> list[str]:
        return [*super().command(), "--requirepass", SECRETS["Redis password"]]

    def probe(self) -> bool:
        password = SECRETS["Redis password"].encode()
        with socket.create_connection((self.host, self.port), timeout=1) as sock:
            sock.sendall(b"AUTH " + password + b"\r\nPING\r\n")
            reply = b""
            while reply.count(b"\r\n") < 2:
                chunk = sock.recv(64)
                if not chunk:
                    return False
                reply += chunk
        return reply == b"+OK\r\n+PONG\r\n"

    def url_with(self, password: str) -> str:
        return f"redis://:{password}@{self.host}:{self.port}/0"


@dataclass
class Evidence:
    """Everything the services said: log files, config-error output, scraped /metrics."""

    texts: dict[str, str] = field(default_factory=dict)

    def add(self, source: str, text: str) -> None:
        self.texts[source] = self.texts.get(source, "") + text

    def leaks(self) -> list[str]:
        found = []
        for source, text in self.texts.items():
            for name, secret in SECRETS.items():
                for line in text.splitlines():
                    if secret in line:
                        found.append(f"{name} in {source}: {line[:300]}")
        return found


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AuthNats, AuthRedis]]:
    root = tmp_path_factory.mktemp("secrets")
    nats_server = AuthNats(root / "nats", free_port(), free_port())
    redis = AuthRedis(root / "redis", free_port())
    nats_server.start()
    try:
        redis.start()
        try:
            yield nats_server, redis
        finally:
            redis.stop()
    finally:
        nats_server.stop()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """An S3 whose credentials are the canary AWS keys."""
    server = SeaweedS3(
        tmp_path_factory.mktemp("secrets-s3") / "s3",
        SeaweedPorts.free(),
        access_key=AWS_ACCESS_KEY_ID,
        secret_key=SECRETS["AWS_SECRET_ACCESS_KEY"],
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def _wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await asyncio.to_thread(_get, url)
        except OSError:
            assert time.monotonic() < deadline, f"{url} never answered"
            await asyncio.sleep(0.05)
        else:
            return


async def _wait_log(proc: ServiceProcess, *needles: str, timeout: float = 30) -> None:
    """Until the process's log holds every one of ``needles``."""
    deadline = time.monotonic() + timeout
    while True:
        text = await asyncio.to_thread(proc.log_path.read_text, errors="replace")
        if all(needle in text for needle in needles):
            return
        assert time.monotonic() < deadline, f"{needles} not all logged:\n{proc.tail()}"
        await asyncio.sleep(0.1)


async def _refused(url: str, **kwargs: Any) -> int:
    with pytest.raises(InvalidStatus) as caught:
        async with websockets.connect(url, open_timeout=10, **kwargs):
            pass
    return caught.value.response.status_code


def _service(
    name: str, env: dict[str, str], logs: Path, spawn: list[ServiceProcess]
) -> ServiceProcess:
    proc = ServiceProcess(name, env, logs)
    spawn.append(proc)
    return proc.start()


CONFIG_ERRORS: list[tuple[dict[str, str], list[str]]] = [
    # (env, flags) of the gateway: each must end in one config_error line and exit code 2
    ({"REDIS_URL": f"http://:{SECRETS['Redis password']}@127.0.0.1:1/0"}, []),
    ({}, ["--redis-url", f"rediss//:{SECRETS['Redis password']}@127.0.0.1:1"]),
    ({"NATS_URLS": f"nats://{NATS_USER}:{SECRETS['NATS password']}@h:99999"}, []),
    ({"WS_BURST": "0"}, ["--gateway-api-keys", SECRETS["GATEWAY_API_KEYS[0]"]]),
]

# The gateway's entry point (run_service with its settings) on each bad configuration in
# turn, in one process: a process per case would cost seconds of imports each. A config
# error returns before ``main`` runs, so a stand-in spares importing the web stack.
_CONFIG_ERROR_RUNNER = """
import json, os, sys
from services.common.lifecycle import run_service
from services.gateway.settings import GatewaySettings

async def main(settings, stop):
    raise SystemExit(f"not a config error: {sorted(os.environ)}")

base = dict(os.environ)
for env, flags in json.loads(sys.argv[1]):
    os.environ.clear()
    os.environ.update({**base, **env})
    code = run_service("gateway", GatewaySettings, main, flags)
    print(f"exit code {code}", file=sys.stderr, flush=True)
"""


def _config_errors(env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-c", _CONFIG_ERROR_RUNNER, json.dumps(CONFIG_ERRORS)],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    lines = result.stderr.splitlines()
    assert result.returncode == 0, result.stderr
    assert lines.count("exit code 2") == len(CONFIG_ERRORS), result.stderr
    assert sum('"config_error"' in line for line in lines) == len(CONFIG_ERRORS), lines
    return result.stdout + result.stderr


async def test_no_secret_reaches_a_log_line_or_a_metrics_page(
    servers: tuple[AuthNats, AuthRedis],
    s3: SeaweedS3,
    devstack: DevStack,
    service_logs: Path,
    spawn: list[ServiceProcess],
) -> None:
    """API keys (valid and presented), NATS and Redis passwords (right and wrong) and the AWS
    secret key appear in no service log line, no config-error line and no /metrics page
    (label values included), whatever the services went through."""
    nats_server, redis = servers
    keys = [SECRETS["GATEWAY_API_KEYS[0]"], SECRETS["GATEWAY_API_KEYS[1]"]]
    presented = SECRETS["a presented wrong API key"]
    # every service gets every secret, as from one shared Secret: none may echo its env
    common = {
        "NATS_URLS": nats_server.url_with(SECRETS["NATS password"]),
        "REDIS_URL": redis.url_with(SECRETS["Redis password"]),
        "GATEWAY_API_KEYS": ",".join(keys),
        "AWS_ACCESS_KEY_ID": AWS_ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRETS["AWS_SECRET_ACCESS_KEY"],
        "AWS_REGION": "us-east-1",
        "COINBASE_PRODUCTS": ",".join(PRODUCTS),
        "GATEWAY_HOST": "127.0.0.1",
        "METRICS_HOST": "127.0.0.1",
        "DRAIN_TIMEOUT_S": "2",
        "LOG_LEVEL": "DEBUG",  # the most a service ever says
    }
    ports = {name: free_port() for name in ("gw", "gw_bad_redis", "gw_nats_down")}
    snap_metrics = free_port()
    tag = uuid.uuid4().hex[:8]
    gateway = _service("gateway", {**common, "GATEWAY_PORT": str(ports["gw"])}, service_logs, spawn)
    bad_redis = _service(
        "gateway",
        {
            **common,
            "GATEWAY_PORT": str(ports["gw_bad_redis"]),
            "REDIS_URL": redis.url_with(SECRETS["a wrong Redis password"]),
            "REDIS_TIMEOUT_S": "0.3",
        },
        service_logs,
        spawn,
    )
    # NATS away (nothing listens on the first URL) and a wrong password (the second)
    nats_down = _service(
        "gateway",
        {
            **common,
            "GATEWAY_PORT": str(ports["gw_nats_down"]),
            "NATS_URLS": (
                f"nats://{NATS_USER}:{SECRETS['NATS password']}@127.0.0.1:{free_port()},"
                + nats_server.url_with(SECRETS["a wrong NATS password"])
            ),
            "NATS_CONNECT_TIMEOUT_S": "0.5",
        },
        service_logs,
        spawn,
    )
    snapshotter = _service(
        "snapshotter",
        {
            **common,
            "DDB_ENDPOINT_URL": devstack.dynamodb.endpoint_url,
            "S3_ENDPOINT_URL": s3.endpoint_url,
            "DDB_TABLE": f"secrets-{tag}",
            "S3_BUCKET": f"secrets-{tag}",
            "SNAPSHOT_PERIOD_MS": "300",
            "METRICS_PORT": str(snap_metrics),
        },
        service_logs,
        spawn,
    )
    evidence = Evidence()
    # config errors, while the services start
    evidence.add("config errors", await asyncio.to_thread(_config_errors, common))

    await gateway.wait_for_event("gateway_started", timeout=60)
    http = f"http://127.0.0.1:{ports['gw']}"
    ws = f"ws://127.0.0.1:{ports['gw']}/ws"
    await _wait_http(f"{http}/healthz")
    feed = await Feed.connect(common["NATS_URLS"])  # the gateway's NATS, authenticated
    try:
        async with websockets.connect(f"{ws}?token={keys[0]}") as client:
            assert json.loads(await client.recv())["type"] == "welcome"
            await client.send(json.dumps({"op": "subscribe", "products": PRODUCTS}))
            await feed.publish((p, s) for s in range(1, 21) for p in PRODUCTS)
            ticks = 0
            while ticks < 10:
                message = json.loads(await asyncio.wait_for(client.recv(), 10))
                ticks += message.get("type") == "tick"
        headers = {"Authorization": f"Bearer {keys[1]}"}
        async with websockets.connect(ws, additional_headers=headers) as client:
            assert json.loads(await client.recv())["type"] == "welcome"
        assert await _refused(f"{ws}?token={presented}") == 403
        assert (
            await _refused(ws, additional_headers={"Authorization": f"Bearer {presented}"}) == 403
        )
        assert await _refused(f"{ws}?token={keys[0]}x") == 403
    finally:
        await feed.close()
    for path in ("/v1/products", f"/v1/ticks/{PRODUCTS[0]}/latest", "/readyz"):
        status, _ = await asyncio.to_thread(_get, http + path)
        assert status == 200, path

    # a wrong Redis password: the gateway fails open (and says so), keys still work
    await bad_redis.wait_for_event("gateway_started", timeout=60)
    await _wait_http(f"http://127.0.0.1:{ports['gw_bad_redis']}/healthz")
    url = f"ws://127.0.0.1:{ports['gw_bad_redis']}/ws?token={keys[1]}"
    async with websockets.connect(url) as client:
        assert json.loads(await client.recv())["type"] == "welcome"
    await bad_redis.wait_for_event("redis_unavailable_failing_open", timeout=20)
    # NATS unreachable, or the wrong password: retried, logged
    await _wait_log(nats_down, "Connection refused", "Authorization Violation")
    # the snapshotter writes DynamoDB and S3 with the canary AWS keys
    await snapshotter.wait_for_event("snapshot_written", timeout=60)

    scraped = {
        "gateway": f"{http}/metrics",
        "gateway with a wrong Redis password": (
            f"http://127.0.0.1:{ports['gw_bad_redis']}/metrics"
        ),
        "snapshotter": f"http://127.0.0.1:{snap_metrics}/metrics",
    }
    for name, url in scraped.items():
        status, text = await asyncio.to_thread(_get, url)
        assert status == 200, name
        evidence.add(f"/metrics of the {name}", text)
    status, text = await asyncio.to_thread(_get, scraped["gateway"])
    assert "ledgerflux_gateway_redis_up 1.0" in text, "the gateway never used Redis"
    assert 'ledgerflux_gateway_auth_failures_total{reason="invalid"} 3.0' in text

    # shutdown lines are searched too. (A gateway that never reached NATS ignores SIGTERM:
    # its start-up waits in nats-py's own endless connect loop. Not this test's subject.)
    nats_down.kill()
    for proc in spawn:
        if proc is not nats_down:
            assert await proc.terminate(timeout=20) == 0, proc.tail()
    for log in await asyncio.to_thread(lambda: sorted(service_logs.glob("*.log"))):
        evidence.add(f"log {log.name}", await asyncio.to_thread(log.read_text, errors="replace"))
    logs = "".join(t for source, t in evidence.texts.items() if source.startswith("log "))
    for event in ("auth_failed", "redis_unavailable_failing_open", "nats_error"):
        assert f'"{event}"' in logs, f"nothing exercised {event}"

    leaks = evidence.leaks()
    assert not leaks, "secrets leaked:\n" + "\n".join(leaks)
