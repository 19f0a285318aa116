"""``scripts/validate.sh`` passes: every offline validator of the ops files is green.

The script checks Dockerfiles, the compose file, Kubernetes manifests, GitHub workflows,
Prometheus/Grafana files, YAML style and shell scripts (see its header). A missing tool is a
failure with the install command, never a skip: CI installs promtool (Debian/Ubuntu package
``prometheus``) and kubectl is on its runners.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYSTEM_TOOLS = {
    "promtool": "install the Debian/Ubuntu package 'prometheus' (apt-get install -y prometheus)",
    "kubectl": "install kubectl (it provides `kubectl kustomize`)",
}


def test_system_tools_are_installed() -> None:
    """The validators that do not come with `uv sync` are on PATH."""
    missing = [
        f"{tool} not found: {hint}" for tool, hint in SYSTEM_TOOLS.items() if not shutil.which(tool)
    ]
    if missing:
        pytest.fail("\n".join(missing))


def test_validate_script_passes() -> None:
    """scripts/validate.sh exits 0; on failure its summary names each failed check and file."""
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "validate.sh")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"scripts/validate.sh failed:\n{result.stdout}\n{result.stderr}"
