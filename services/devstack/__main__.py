"""``python -m services.devstack up|down|status|env|install|demo``: the dev stack from a terminal.

``up`` starts the servers on the default ports, detached, and returns; ``down``
(from any process) stops what ``<root>/state.json`` lists; ``install`` fetches DynamoDB
Local; ``demo`` runs the servers, feedsim and the four services until Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from services.common.logging import configure_logging
from services.devstack.demo import DemoOptions, run_demo
from services.devstack.errors import DevStackError
from services.devstack.install import ensure_dynamodb_local, find_binary
from services.devstack.process import DEFAULT_STOP_TIMEOUT_S
from services.devstack.stack import DevStack
from services.devstack.state import is_alive, read_state, remove_state, stop_recorded

DEFAULT_ROOT = Path(".devstack")


def _up(args: argparse.Namespace) -> int:
    stack = DevStack(args.root, with_redis=not args.no_redis, detach=True)
    stack.start(args.timeout)
    for server in stack.servers:
        print(f"{server.name:<9} ready in {server.ready_seconds or 0.0:5.2f} s  {server.url}")
    print(f"dev stack up in {stack.startup_seconds or 0.0:.2f} s under {stack.root}")
    print(f'env: eval "$(python -m services.devstack env --root {shlex.quote(str(args.root))})"')
    return 0


def _down(args: argparse.Namespace) -> int:
    state = read_state(args.root)
    if state is None:
        print(f"no dev stack recorded under {args.root.absolute()}")
        return 0
    for name, outcome in stop_recorded(state, args.timeout).items():
        print(f"{name:<9} {outcome}")
    remove_state(args.root)
    return 0


def _status(args: argparse.Namespace) -> int:
    state = read_state(args.root)
    if state is None:
        print(f"no dev stack recorded under {args.root.absolute()}")
        return 1
    all_alive = True
    for record in state.servers:
        alive = is_alive(record)
        all_alive &= alive
        status = f"running  pid {record.pid}" if alive else "stopped"
        print(f"{record.name:<9} {status:<18} {record.url}")
    return 0 if all_alive else 1


def _env(args: argparse.Namespace) -> int:
    state = read_state(args.root)
    if state is None:
        print(f"no dev stack recorded under {args.root.absolute()}", file=sys.stderr)
        return 1
    for key, value in state.env.items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def _install(args: argparse.Namespace) -> int:
    lib = ensure_dynamodb_local(args.root / "tools" / "dynamodb")
    print(f"DynamoDB Local ready in {lib}")
    for name in ("nats-server", "weed", "redis-server", "java"):
        print(f"{name:<13} {find_binary(name)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    products = [p.strip() for p in args.products.split(",") if p.strip()]
    options = DemoOptions(
        root=args.root,
        rate=args.rate,
        faults=args.faults,
        products=products,
        live=args.live,
        gateway_port=int(os.environ.get("GATEWAY_PORT", "8080")),
        duration_s=args.duration,
    )
    return run_demo(options)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.devstack", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start the stack in the background on the default ports")
    up.add_argument("--no-redis", action="store_true", help="start without Redis")
    up.add_argument("--timeout", type=float, default=None, help="readiness timeout per server (s)")
    up.set_defaults(run=_up)

    down = commands.add_parser("down", help="stop the stack that state.json lists")
    down.add_argument(
        "--timeout", type=float, default=DEFAULT_STOP_TIMEOUT_S, help="SIGKILL after (s)"
    )
    down.set_defaults(run=_down)

    status = commands.add_parser("status", help="show which servers run (exit 1 if any is down)")
    status.set_defaults(run=_status)

    env = commands.add_parser("env", help="print export lines for the services' env vars")
    env.set_defaults(run=_env)

    install = commands.add_parser("install", help="install DynamoDB Local; check the binaries")
    install.set_defaults(run=_install)

    demo = commands.add_parser("demo", help="servers + feedsim + all services until Ctrl-C")
    demo.add_argument("--rate", type=float, default=200.0, help="simulated ticks/s in total")
    demo.add_argument("--faults", default="", help="feedsim --faults, e.g. gap=0.01,dup=0.01")
    demo.add_argument("--products", default="BTC-USD,ETH-USD", help="comma separated")
    demo.add_argument("--live", action="store_true", help="use the real Coinbase feed")
    demo.add_argument("--duration", type=float, default=None, help="stop after N seconds")
    demo.set_defaults(run=_demo)

    for sub in (up, down, status, env, install, demo):
        sub.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="state, logs and data dir")
        sub.add_argument("--log-level", default="WARNING", help="structured log level (stderr)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level, service="devstack")
    try:
        code: int = args.run(args)
    except DevStackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # DevStack.start has already stopped whatever it had started.
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
