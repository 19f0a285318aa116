"""``make demo``: the embedded stack, feedsim and the four services, on the default ports.

Every process is started in its own session (a terminal Ctrl-C reaches only us) with a
parent-death signal, so even a ``kill -9`` of the demo leaves no orphans; on Ctrl-C or
SIGTERM the services stop in pipeline order (ingestor first, gateway last), then the
servers. Logs go to ``<root>/logs/<name>.log``.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.devstack.ports import is_port_free
from services.devstack.process import log_tail
from services.devstack.stack import DevStack
from services.ingestor.settings import IngestorSettings
from services.normalizer.settings import NormalizerSettings
from services.snapshotter.settings import SnapshotterSettings

_PR_SET_PDEATHSIG = 1
SERVICE_ORDER = ("ingestor", "normalizer", "snapshotter", "gateway")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class DemoOptions:
    root: Path
    rate: float = 200.0
    faults: str = ""
    products: list[str] = field(default_factory=lambda: ["BTC-USD", "ETH-USD"])
    live: bool = False
    feed_port: int = 8765
    gateway_port: int = 8080
    duration_s: float | None = None  # stop by itself after this long (tests, CI smoke)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    log_offset: int  # where this run's lines start: the log is appended across runs

    def log_tail(self, lines: int = 15) -> str:
        return log_tail(self.log, lines, start=self.log_offset)


class Demo:
    def __init__(self, options: DemoOptions) -> None:
        self.options = options
        self.logs = options.root / "logs"
        self.children: list[Child] = []
        self.stack = DevStack(options.root)

    # -- processes -------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> Child:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}", *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        child = Child(name, proc, log_path, offset)
        self.children.append(child)
        return child

    def service_env(self) -> dict[str, str]:
        o = self.options
        env = {**os.environ, **self.stack.env(), "PYTHONUNBUFFERED": "1"}
        env.setdefault("COINBASE_PRODUCTS", ",".join(o.products))
        if not o.live:
            env["COINBASE_WS_URL"] = f"ws://127.0.0.1:{o.feed_port}"
            env["COINBASE_REST_URL"] = f"http://127.0.0.1:{o.feed_port}"
        env["GATEWAY_PORT"] = str(o.gateway_port)  # the port the demo polls and prints
        # one METRICS_PORT for three services would make two of them fail to bind: in the
        # demo each keeps its own (9101-9103)
        env.pop("METRICS_PORT", None)
        return env

    def service_ports(self, env: dict[str, str]) -> list[tuple[str, int]]:
        """The ports the demo's own processes will listen on, with the setting naming each."""
        ports = [("GATEWAY_PORT (the gateway)", int(env["GATEWAY_PORT"]))]
        if not self.options.live:
            ports.append(("feedsim (the simulated Coinbase feed)", self.options.feed_port))
        for name, settings_cls in (
            ("ingestor", IngestorSettings),
            ("normalizer", NormalizerSettings),
            ("snapshotter", SnapshotterSettings),
        ):
            port = settings_cls.model_fields["metrics_port"].default
            ports.append((f"the {name}'s /metrics", port))
        return ports

    def check_ports_free(self, env: dict[str, str]) -> None:
        """Fail before starting anything if one of the services' ports is taken (a demo
        already running, another program on 8080): one line naming port and setting, not
        a service dying with a bind error after the stack came up."""
        taken = [
            f"{port} for {what}"
            for what, port in self.service_ports(env)
            if not is_port_free(port, "0.0.0.0")
        ]
        if taken:
            raise DemoError(
                f"port {', '.join(taken)} already in use: stop what listens there "
                "(another `make demo`?) or choose other ports"
            )

    def start(self) -> None:
        o = self.options
        env = self.service_env()
        self.check_ports_free(env)
        started = time.monotonic()
        print(f"starting the embedded stack under {o.root} ...", flush=True)
        self.stack.start()
        print(f"  servers ready in {time.monotonic() - started:.1f} s", flush=True)
        if not o.live:
            feed_args = ["--host", "127.0.0.1", "--port", str(o.feed_port),
                         "--products", env["COINBASE_PRODUCTS"], "--rate", str(o.rate),
                         "--sequence-base", "clock"]  # fmt: skip
            if o.faults:
                feed_args += ["--faults", o.faults]
            self._spawn("feedsim", feed_args, env)
        for name in reversed(SERVICE_ORDER):  # consumers first, so nothing waits on them
            self._spawn(name, [], env)
        self._wait_ready(started)

    def _wait_ready(self, started: float) -> None:
        deadline = time.monotonic() + 60
        url = f"http://127.0.0.1:{self.options.gateway_port}"
        while time.monotonic() < deadline:
            self.check_alive()
            products = _get_json(f"{url}/v1/products")
            if products and any(p.get("seq") is not None for p in products["products"]):
                print(
                    f"  first ticks at the gateway {time.monotonic() - started:.1f} s after start"
                )
                return
            time.sleep(0.2)
        raise DemoError(
            "no tick reached the gateway within 60 s; see the logs under " + str(self.logs)
        )

    def check_alive(self) -> None:
        for child in self.children:
            code = child.proc.poll()
            if code is not None:
                raise DemoError(
                    f"{child.name} exited with {code}; last log lines:\n{child.log_tail()}"
                )

    def stop(self) -> None:
        order = [c for n in ("feedsim", *SERVICE_ORDER) for c in self.children if c.name == n]
        for child in order:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
                try:
                    code = child.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    code = child.proc.wait()
                print(f"  {child.name:<12} stopped (exit {code})", flush=True)
        self.children.clear()
        started = [server.name for server in self.stack.servers if server.pid is not None]
        self.stack.stop()
        if started:  # a demo refused before start (a port taken) started none
            print(f"  servers stopped ({', '.join(started)})", flush=True)

    # -- the terminal view -----------------------------------------------------------

    def print_urls(self) -> None:
        o = self.options
        gw = f"http://localhost:{o.gateway_port}"
        lines = [
            "",
            "LedgerFlux demo is running"
            + (
                " on the LIVE Coinbase feed"
                if o.live
                else f" on a simulated feed ({o.rate:g} ticks/s)"
            ),
            f"  web page        {gw}/",
            f"  WebSocket       ws://localhost:{o.gateway_port}/ws",
            f"  REST            {gw}/v1/products   {gw}/v1/ticks/BTC-USD/latest",
            f"  gateway metrics {gw}/metrics",
            "  service metrics http://localhost:9101/metrics (ingestor) :9102 (normalizer) "
            ":9103 (snapshotter)",
            f"  NATS monitor    {self.stack.nats.monitor_url}",
        ]
        if not o.live:
            lines.append(f"  feedsim stats   http://localhost:{o.feed_port}/sim/stats")
        lines += [
            f"  logs            {self.logs}/",
            "  try             python test_client.py --products BTC-USD --duration 5",
            "Ctrl-C stops everything.",
            "",
        ]
        print("\n".join(lines), flush=True)

    def progress_line(self) -> str:
        data = _get_json(f"http://127.0.0.1:{self.options.gateway_port}/v1/products")
        if not data:
            return "gateway not answering"
        parts = []
        for p in data["products"][:6]:
            parts.append(f"{p['product']} {p['price'] or '-'}")
        return time.strftime("%H:%M:%S ") + "  ".join(parts)


class DemoError(Exception):
    """The demo could not start or a process died."""


def _get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def run_demo(options: DemoOptions) -> int:
    demo = Demo(options)

    def on_term(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        demo.start()
        demo.print_urls()
        ends = time.monotonic() + options.duration_s if options.duration_s else None
        next_line = time.monotonic() + 5
        while ends is None or time.monotonic() < ends:
            demo.check_alive()
            if time.monotonic() >= next_line:
                print(demo.progress_line(), flush=True)
                next_line += 5
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    except DemoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr, flush=True)
        _stop_undisturbed(demo)
        return 1
    _stop_undisturbed(demo)
    return 0


def _stop_undisturbed(demo: Demo) -> None:
    """Stop everything even if more signals come: a terminal's Ctrl-C reaches make, uv and
    us, so a second SIGINT arriving mid-shutdown is normal and must not cut it short."""

    def already_stopping(_sig: int, _frame: object) -> None:
        print("  (already stopping: every process is being shut down in order)", flush=True)

    signal.signal(signal.SIGINT, already_stopping)
    signal.signal(signal.SIGTERM, already_stopping)
    demo.stop()
