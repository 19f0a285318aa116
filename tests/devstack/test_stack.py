"""The dev stack starts real servers that really work, and leaves nothing running."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, TypedDict, cast

import botocore.session
import msgspec
import nats
import pytest
import redis
from botocore.config import Config

from services.devstack import (
    DevStack,
    NatsServer,
    PortInUseError,
    SeaweedPorts,
    SeaweedS3,
    ServerExitedError,
    StackPorts,
    free_port,
    free_port_pair,
)
from services.devstack.ports import GRPC_PORT_OFFSET, is_port_free
from services.devstack.probes import s3_lists_buckets
from services.devstack.pytest_fixtures import tools_dir
from services.devstack.servers import s3_has_stopped
from services.devstack.state import ServerRecord, StackState, read_state, stop_recorded

# botocore-stubs types sync clients as a bare BaseClient: name the calls used here.


class _DynamoDB(Protocol):
    def create_table(
        self,
        *,
        TableName: str,
        KeySchema: list[dict[str, str]],
        AttributeDefinitions: list[dict[str, str]],
        BillingMode: str,
    ) -> object: ...
    def list_tables(self) -> dict[str, list[str]]: ...
    def delete_table(self, *, TableName: str) -> object: ...
    def close(self) -> None: ...


class _Body(Protocol):
    def read(self) -> bytes: ...
    def close(self) -> None: ...


class _GetObjectOutput(TypedDict):
    Body: _Body


class _S3(Protocol):
    def create_bucket(self, *, Bucket: str) -> object: ...
    def put_object(self, *, Bucket: str, Key: str, Body: bytes) -> object: ...
    def get_object(self, *, Bucket: str, Key: str) -> _GetObjectOutput: ...
    def delete_object(self, *, Bucket: str, Key: str) -> object: ...
    def delete_bucket(self, *, Bucket: str) -> object: ...
    def close(self) -> None: ...


def _client(service: str, endpoint_url: str, env: dict[str, str]) -> object:
    return botocore.session.get_session().create_client(
        service,
        endpoint_url=endpoint_url,
        region_name=env["AWS_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        config=Config(s3={"addressing_style": "path"}),
    )


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return stat.rpartition(b")")[2].split()[0] not in (b"Z", b"X")


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[DevStack]:
    stack = DevStack(
        tmp_path_factory.mktemp("stack"), StackPorts.free(), tools_dir=tools_dir(pytestconfig)
    )
    with stack:
        yield stack


def test_free_port_never_repeats_within_process() -> None:
    """free_port hands out each port once, even if the kernel offers it again."""
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50


def test_free_port_pair_keeps_grpc_port_free() -> None:
    """free_port_pair returns P with P and P + 10000 both free (weed's gRPC rule)."""
    port = free_port_pair()
    assert is_port_free(port)
    assert is_port_free(port + GRPC_PORT_OFFSET)


def test_taken_port_fails_before_launch(tmp_path: Path) -> None:
    """A port already listened on raises PortInUseError instead of probing someone else's server."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = NatsServer(tmp_path / "nats", taken.getsockname()[1], free_port())
        with pytest.raises(PortInUseError):
            server.start()
    assert server.pid is None


_MINI_RUN = """
  Press Ctrl+C to stop all components

  Shutting down SeaweedFS Mini ...
  S3           stopped   0.0s
  Admin        stopped   0.0s
--- 2026-11-29T06:00:15+00:00 devstack: weed mini -dir=...

  Starting SeaweedFS Mini ...
  S3           starting
  S3           ready     0.2s
"""


def test_s3_stop_is_read_from_the_current_run_only() -> None:
    """weed's log is appended across restarts: an earlier run's "S3 stopped" does not count."""
    assert s3_has_stopped(_MINI_RUN.partition("---")[0])
    assert not s3_has_stopped(_MINI_RUN)
    assert not s3_has_stopped(_MINI_RUN + "\n  Press Ctrl+C to stop all components\n")
    assert s3_has_stopped(
        _MINI_RUN + "\n  Shutting down SeaweedFS Mini ...\n  S3           stopped   0.0s\n"
    )


@pytest.mark.integration
@pytest.mark.parametrize("stopped_by", ["its_server_object", "stop_recorded"])
def test_weed_hung_after_its_s3_stopped_is_killed_without_waiting_out_the_timeout(
    tmp_path: Path, stopped_by: str
) -> None:
    """weed mini can hang in a later shutdown step (upstream); once S3 is down it is killed,
    both by the stack that started it and by ``down`` from another process.

    The hang is made certain by freezing weed (SIGSTOP) as soon as it reports S3 stopped.
    """
    weed = SeaweedS3(tmp_path / "s3", SeaweedPorts.free()).start()
    assert weed.pid is not None
    deadline = time.monotonic() + 30
    while "Press Ctrl+C to stop" not in weed.log_tail():  # up: the S3 probe passes earlier
        assert time.monotonic() < deadline, weed.log_tail()
        time.sleep(0.05)
    record = ServerRecord(
        name=weed.name, pid=weed.pid, url=weed.url, ports=weed.ports,
        markers=weed.cmdline_markers(), log_file=str(weed.log_file),
    )  # fmt: skip
    state = StackState(
        root=str(tmp_path), started_at="", startup_seconds=0.0, env={}, servers=[record]
    )
    outcome: list[object] = []
    started = time.monotonic()
    stopper = threading.Thread(
        target=lambda: outcome.append(
            weed.stop(timeout=120) if stopped_by == "its_server_object"
            else stop_recorded(state, 120)
        )
    )  # fmt: skip
    stopper.start()
    while not s3_has_stopped(weed.log_tail()):
        assert time.monotonic() < deadline, weed.log_tail()
        time.sleep(0.005)
    os.kill(weed.pid, signal.SIGSTOP)
    stopper.join(timeout=120)
    assert time.monotonic() - started < 60  # the timeout path would take 120 s
    expected = -signal.SIGKILL if stopped_by == "its_server_object" else {"s3": "killed"}
    assert outcome == [expected]
    assert weed.wait_stopped(1.0) == -signal.SIGKILL


class _BrokenNats(NatsServer):
    def command(self) -> list[str]:
        return [*super().command(), "-c", "missing.conf"]


@pytest.mark.integration
def test_server_that_exits_reports_its_log(tmp_path: Path) -> None:
    """A server dying at start-up raises ServerExitedError quoting its log."""
    server = _BrokenNats.on_free_ports(tmp_path / "nats")
    with pytest.raises(ServerExitedError, match=r"(?s)exited with code 1.*missing\.conf"):
        server.start()
    assert not server.is_running


@pytest.mark.integration
def test_env_points_at_every_server(stack: DevStack) -> None:
    """env() gives the services one variable per server, plus credentials and region."""
    assert stack.redis is not None
    assert stack.env() == {
        "NATS_URLS": f"nats://127.0.0.1:{stack.ports.nats}",
        "DDB_ENDPOINT_URL": f"http://127.0.0.1:{stack.ports.dynamodb}",
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{stack.ports.s3}",
        "AWS_ACCESS_KEY_ID": "ledgerflux",
        "AWS_SECRET_ACCESS_KEY": "ledgerflux-secret",
        "AWS_REGION": "us-east-1",
        "REDIS_URL": f"redis://127.0.0.1:{stack.ports.redis}/0",
    }
    state = read_state(stack.root)
    assert state is not None
    assert [s.name for s in state.servers] == ["nats", "dynamodb", "s3", "redis"]


@pytest.mark.integration
async def test_nats_has_jetstream(stack: DevStack) -> None:
    """nats-py connects and JetStream answers account info."""
    nc = await nats.connect(stack.nats.url)
    try:
        info = await nc.jetstream().account_info()
    finally:
        await nc.close()
    assert info.limits is not None


@pytest.mark.integration
def test_dynamodb_creates_and_lists_table(stack: DevStack) -> None:
    """DynamoDB Local creates a table and lists it."""
    table = f"devstack-{uuid.uuid4().hex[:8]}"
    ddb = cast(_DynamoDB, _client("dynamodb", stack.dynamodb.endpoint_url, stack.env()))
    try:
        ddb.create_table(
            TableName=table,
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        assert table in ddb.list_tables()["TableNames"]
        ddb.delete_table(TableName=table)
    finally:
        ddb.close()


@pytest.mark.integration
def test_s3_stores_objects_with_auth_on(stack: DevStack) -> None:
    """SeaweedFS stores and returns an object for signed requests and refuses anonymous ones."""
    bucket = f"devstack-{uuid.uuid4().hex[:8]}"
    s3 = cast(_S3, _client("s3", stack.s3.endpoint_url, stack.env()))
    try:
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key="a/b.json", Body=b'{"ok":true}')
        body = s3.get_object(Bucket=bucket, Key="a/b.json")["Body"]
        try:
            assert body.read() == b'{"ok":true}'
        finally:
            body.close()
        s3.delete_object(Bucket=bucket, Key="a/b.json")
        s3.delete_bucket(Bucket=bucket)
    finally:
        s3.close()
    assert s3_lists_buckets("127.0.0.1", stack.ports.s3, "ledgerflux", "ledgerflux-secret")
    assert not s3_lists_buckets("127.0.0.1", stack.ports.s3, "ledgerflux", "wrong-secret")
    anonymous = http.client.HTTPConnection("127.0.0.1", stack.ports.s3, timeout=5)
    try:
        anonymous.request("GET", "/")
        assert anonymous.getresponse().status == 403
    finally:
        anonymous.close()


@pytest.mark.integration
def test_redis_answers(stack: DevStack) -> None:
    """redis-py pings, sets and gets."""
    assert stack.redis is not None
    client = redis.Redis.from_url(stack.redis.url)
    try:
        assert client.ping()
        client.set("devstack:key", b"value")
        assert client.get("devstack:key") == b"value"
    finally:
        client.close()


@pytest.mark.integration
async def test_nats_kill_and_restart_keeps_stream(stack: DevStack) -> None:
    """After SIGKILL and restart, a file-storage JetStream stream still holds its messages."""
    stream = f"DEVSTACK_{uuid.uuid4().hex[:8]}"
    nc = await nats.connect(stack.nats.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[f"{stream}.>"])
        for i in range(3):
            await js.publish(f"{stream}.tick", str(i).encode())
    finally:
        await nc.close()
    old_pid = stack.nats.pid
    stack.nats.kill()
    assert not stack.nats.is_running
    stack.nats.restart()
    assert stack.nats.pid != old_pid
    nc = await nats.connect(stack.nats.url)
    try:
        info = await nc.jetstream().stream_info(stream)
    finally:
        await nc.close()
    assert info.state.messages == 3


@pytest.mark.integration
def test_plugin_fixtures_start_and_stop_nats(tmp_path: Path) -> None:
    """The pytest plugin registers via pytest_plugins; nats_server runs during a test, not after."""
    (tmp_path / "conftest.py").write_text(
        'pytest_plugins = ["services.devstack.pytest_fixtures"]\n'
    )
    (tmp_path / "test_inner.py").write_text(
        textwrap.dedent(
            """
            import socket
            from pathlib import Path

            def test_inner(nats_server):
                assert nats_server.is_running
                socket.create_connection(("127.0.0.1", nats_server.port), timeout=2).close()
                (Path(__file__).parent / "pid").write_text(str(nats_server.pid))
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert not _pid_alive(int((tmp_path / "pid").read_text()))


@pytest.mark.integration
def test_down_signals_only_a_pid_running_the_recorded_server(tmp_path: Path) -> None:
    """stop_recorded leaves a pid whose cmdline does not match alone and stops one that does."""
    server = NatsServer.on_free_ports(tmp_path / "nats").start()
    try:
        assert server.pid is not None
        record = ServerRecord(
            name="nats",
            pid=server.pid,
            url=server.url,
            ports=server.ports,
            markers=server.cmdline_markers(),
            log_file=str(server.log_file),
        )
        other = msgspec.structs.replace(record, markers=["nats-server", f"-p {server.port}0"])

        def state(*records: ServerRecord) -> StackState:
            return StackState(
                root=str(tmp_path), started_at="", startup_seconds=0.0, env={}, servers=[*records]
            )

        assert stop_recorded(state(other), 5.0) == {"nats": "not running"}
        assert server.is_running
        assert stop_recorded(state(record), 5.0) == {"nats": "stopped"}
        assert server.wait_stopped(1.0) == 0
    finally:
        server.stop()


# Last in the file on purpose: it stops the module's stack.
@pytest.mark.integration
def test_stop_leaves_no_process(stack: DevStack) -> None:
    """stop() ends every server process, removes state.json, and is safe to repeat."""
    pids = [server.pid for server in stack.servers]
    assert all(pid is not None and _pid_alive(pid) for pid in pids)
    stack.stop()
    assert not any(pid is not None and _pid_alive(pid) for pid in pids)
    assert read_state(stack.root) is None
    stack.stop()
