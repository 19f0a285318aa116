"""The Kubernetes settings are ones the services accept, and the stream Job agrees with them.

Offline: the ConfigMap env file and each Deployment's ``args`` go through the services' own
settings classes (the same parsing as at pod start), and the stream definitions of the
nats-streams Job are compared with what ``ensure_streams`` would create from those settings.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from dotenv import dotenv_values

from services.common.broker import stream_configs
from services.common.settings import CommonSettings
from services.gateway.settings import GatewaySettings
from services.ingestor.settings import IngestorSettings
from services.normalizer.settings import NormalizerSettings
from services.snapshotter.settings import SnapshotterSettings

K8S = Path(__file__).resolve().parents[2] / "k8s"
SETTINGS: dict[str, type[CommonSettings]] = {
    "ingestor": IngestorSettings,
    "normalizer": NormalizerSettings,
    "snapshotter": SnapshotterSettings,
    "gateway": GatewaySettings,
}
# Read by botocore's credential chain, not by the settings classes.
AWS_SDK = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"})


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines, parsed like pydantic-settings parses a .env file (python-dotenv)."""
    return {key: value or "" for key, value in dotenv_values(path).items()}


def deployments() -> Iterator[tuple[str, dict[str, Any]]]:
    """(Deployment name, its only container) of every Deployment in k8s/services/."""
    for path in sorted((K8S / "services").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document["kind"] == "Deployment":
                (container,) = document["spec"]["template"]["spec"]["containers"]
                yield document["metadata"]["name"], container


@pytest.fixture
def cluster_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """The process environment of a pod: ConfigMap + Secret, nothing from this machine."""
    env = read_env_file(K8S / "config" / "settings.env")
    env |= read_env_file(K8S / "config" / "secrets.env")
    monkeypatch.chdir(tmp_path)  # no stray .env in the working directory
    for cls in SETTINGS.values():
        for field in cls.model_fields:
            monkeypatch.delenv(field.upper(), raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def test_every_setting_is_read_by_a_service(cluster_env: dict[str, str]) -> None:
    """No key of settings.env/secrets.env is a typo that the services would silently ignore."""
    fields = {field.upper() for cls in SETTINGS.values() for field in cls.model_fields}
    unread = sorted(set(cluster_env) - fields - AWS_SDK)
    assert not unread, f"not a setting of any service: {unread}"


def test_deployment_args_are_valid_settings(cluster_env: dict[str, str]) -> None:
    """Each Deployment's env + args load in its service's settings, as `python -m` would."""
    seen = set()
    for name, container in deployments():
        service = container["name"]
        settings = SETTINGS[service].load(container.get("args", []), prog=name)
        assert settings.nats_urls == cluster_env["NATS_URLS"].split(","), name
        seen.add(service)
    assert seen == set(SETTINGS)


@pytest.mark.parametrize("service", ["normalizer", "snapshotter"])
def test_shard_replicas_own_every_shard_once(cluster_env: dict[str, str], service: str) -> None:
    """The shard sets of a service's Deployments partition 0..NUM_SHARDS-1."""
    owned: list[int] = []
    for name, container in deployments():
        if container["name"] == service:
            settings = SETTINGS[service].load(container["args"], prog=name)
            assert isinstance(settings, NormalizerSettings | SnapshotterSettings)
            owned.extend(settings.owned_shards)
    assert sorted(owned) == list(range(int(cluster_env["NUM_SHARDS"])))


def _plain(value: object) -> object:
    return value.value if isinstance(value, Enum) else value


def test_stream_job_matches_the_services_stream_config(cluster_env: dict[str, str]) -> None:
    """nats/streams/*.json = what ensure_streams() creates from the cluster settings."""
    expected = {c.name: c.as_dict() for c in stream_configs(CommonSettings())}
    files = {p.stem: json.loads(p.read_text()) for p in (K8S / "nats" / "streams").glob("*.json")}
    assert set(files) == set(expected)
    for name, job_config in files.items():
        service_config = {k: _plain(v) for k, v in expected[name].items()}
        differing = {
            key: (value, service_config[key])
            for key, value in job_config.items()
            if key in service_config and value != service_config[key]
        }
        assert not differing, f"{name}: (Job, services) differ: {differing}"
        # the keys the services leave to the server's defaults must be those defaults
        assert job_config.get("retention", "limits") == "limits"
        assert job_config.get("max_msgs", -1) == -1
        assert job_config.get("max_consumers", -1) == -1
