"""The whole dev stack: NATS, DynamoDB Local, SeaweedFS S3 and Redis under one root dir.

Layout of ``root``::

    state.json          pids/ports/env of the running stack (read by ``down``/``status``)
    logs/<name>.log     each server's stdout+stderr (weed's glog files in logs/s3-glog/)
    nats/ dynamodb/ s3/ redis/   data dirs
    tools/dynamodb/     the npm-installed DynamoDB Local, unless ``tools_dir`` says otherwise
"""

from __future__ import annotations

import contextvars
import datetime
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from services.common.logging import get_logger
from services.devstack.errors import DevStackError, StackAlreadyRunningError
from services.devstack.ports import free_port
from services.devstack.process import DEFAULT_STOP_TIMEOUT_S
from services.devstack.servers import (
    DEFAULT_ACCESS_KEY,
    DEFAULT_SECRET_KEY,
    DynamoDBLocal,
    NatsServer,
    RedisServer,
    SeaweedPorts,
    SeaweedS3,
    Server,
)
from services.devstack.state import (
    ServerRecord,
    StackState,
    live_pids,
    read_state,
    remove_state,
    write_state,
)

log = get_logger(__name__)

AWS_REGION = "us-east-1"


@dataclass(frozen=True, slots=True)
class StackPorts:
    """Ports of every server; the defaults are the ones DESIGN.md gives for local dev."""

    nats: int = 4222
    nats_monitor: int = 8222
    dynamodb: int = 8000
    seaweed: SeaweedPorts = field(default_factory=SeaweedPorts)
    redis: int = 6379

    @property
    def s3(self) -> int:
        return self.seaweed.s3

    @classmethod
    def free(cls) -> StackPorts:
        """Every port a fresh free one (for tests running beside a dev stack)."""
        return cls(
            nats=free_port(),
            nats_monitor=free_port(),
            dynamodb=free_port(),
            seaweed=SeaweedPorts.free(),
            redis=free_port(),
        )


class DevStack:
    """Start, stop and describe the four servers; a context manager too.

    ``detach=True`` lets the servers outlive this process (``up``); otherwise the
    kernel stops them if the thread that started them dies.
    """

    def __init__(
        self,
        root: Path,
        ports: StackPorts | None = None,
        *,
        with_redis: bool = True,
        tools_dir: Path | None = None,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        detach: bool = False,
    ) -> None:
        self.root = root.absolute()
        self.ports = ports or StackPorts()
        self.access_key = access_key
        self.secret_key = secret_key
        die = not detach
        self.nats = NatsServer(
            self.root / "nats", self.ports.nats, self.ports.nats_monitor, die_with_parent=die
        )
        self.dynamodb = DynamoDBLocal(
            self.root / "dynamodb",
            self.ports.dynamodb,
            tools_dir=tools_dir or self.root / "tools" / "dynamodb",
            die_with_parent=die,
        )
        self.s3 = SeaweedS3(
            self.root / "s3",
            self.ports.seaweed,
            access_key=access_key,
            secret_key=secret_key,
            die_with_parent=die,
        )
        self.redis = (
            RedisServer(self.root / "redis", self.ports.redis, die_with_parent=die)
            if with_redis
            else None
        )
        self.startup_seconds: float | None = None

    @property
    def servers(self) -> list[Server]:
        """In start order; stop goes the other way."""
        servers: list[Server] = [self.nats, self.dynamodb, self.s3]
        if self.redis is not None:
            servers.append(self.redis)
        return servers

    @property
    def ready_times(self) -> dict[str, float]:
        """Seconds from launch to ready, per server, of the last start."""
        return {s.name: s.ready_seconds for s in self.servers if s.ready_seconds is not None}

    def start(self, timeout: float | None = None) -> Self:
        """Start every server, overlapping, and return once all are ready.

        All are launched first, then their readiness is polled in threads; the
        DynamoDB Local install (npm, first run only) overlaps the others' start-up.
        If any fails, the ones started are stopped and the first error is raised.
        ``timeout`` overrides each server's own readiness timeout.
        """
        state = read_state(self.root)
        if state is not None and (pids := live_pids(state)):
            raise StackAlreadyRunningError(self.root, pids)
        self.root.mkdir(parents=True, exist_ok=True)
        # Up front: a taken port fails in ms here instead of after starting the others.
        for server in self.servers:
            server.check_ports_free()
        started_at = time.monotonic()
        cancel = threading.Event()
        try:
            with ThreadPoolExecutor(len(self.servers) + 1, thread_name_prefix="devstack") as pool:
                try:
                    self._launch_all(pool, timeout, cancel)
                except BaseException:
                    cancel.set()  # else the pool's exit waits out the other readiness timeouts
                    raise
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started_at
        write_state(self.root, self._state())
        log.info(
            "stack_ready",
            root=str(self.root),
            startup_s=round(self.startup_seconds, 3),
            **{f"{name}_ready_s": round(t, 3) for name, t in self.ready_times.items()},
        )
        return self

    def _launch_all(
        self, pool: ThreadPoolExecutor, timeout: float | None, cancel: threading.Event
    ) -> None:
        # Servers are launched from this thread, never a pool thread: their
        # parent-death signal fires when the launching thread exits.
        waits: list[Future[float]] = []

        def wait_ready(server: Server) -> Future[float]:
            # Run in a copy of our context so log lines keep the bound ``service``.
            context = contextvars.copy_context()
            return pool.submit(context.run, server.wait_ready, timeout, cancel=cancel)

        install = pool.submit(contextvars.copy_context().run, self.dynamodb.prepare)
        for server in self.servers:
            if server is not self.dynamodb:
                server.launch()
                waits.append(wait_ready(server))
        install.result()
        self.dynamodb.launch()
        waits.append(wait_ready(self.dynamodb))
        done, _ = wait(waits, return_when=FIRST_EXCEPTION)
        for future in done:
            if (error := future.exception()) is not None:
                raise error

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """Stop every server, newest first; safe to call twice.

        All get SIGTERM first and are then waited for one by one (SIGKILL after
        ``timeout`` each): the servers don't depend on each other, and weed alone
        takes ~3 s to shut down, so waiting in turn would only add up.
        """
        servers = list(reversed(self.servers))
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait_stopped(timeout)
        state = read_state(self.root)
        if state is not None and not live_pids(state):
            remove_state(self.root)

    def env(self) -> dict[str, str]:
        """The environment variables the services read to reach this stack."""
        env = {
            "NATS_URLS": self.nats.url,
            "DDB_ENDPOINT_URL": self.dynamodb.endpoint_url,
            "S3_ENDPOINT_URL": self.s3.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": AWS_REGION,
        }
        if self.redis is not None:
            env["REDIS_URL"] = self.redis.url
        return env

    def _state(self) -> StackState:
        records = []
        for server in self.servers:
            if server.pid is None:
                raise DevStackError(f"{server.name} has no pid after start")
            records.append(
                ServerRecord(
                    name=server.name,
                    pid=server.pid,
                    url=server.url,
                    ports=server.ports,
                    markers=server.cmdline_markers(),
                    log_file=str(server.log_file),
                )
            )
        return StackState(
            root=str(self.root),
            started_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            startup_seconds=self.startup_seconds or 0.0,
            env=self.env(),
            servers=records,
        )

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<DevStack {self.root} {self.servers!r}>"
