"""Settings: env and flags parse into typed values; bad values fail at boot with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.settings import ConfigError
from services.ingestor.settings import IngestorSettings
from services.normalizer.settings import NormalizerSettings
from tests.support.procs import run_to_exit


def test_env_lists_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    """NATS_URLS and COINBASE_PRODUCTS take the comma lists of the reference README."""
    monkeypatch.setenv("NATS_URLS", "nats://a:4222, nats://b:4222")
    monkeypatch.setenv("COINBASE_PRODUCTS", "btc-usd,ETH-USD,BTC-USD")
    settings = IngestorSettings.load([])
    assert settings.nats_urls == ["nats://a:4222", "nats://b:4222"]
    assert settings.coinbase_products == ["BTC-USD", "ETH-USD"]


def test_flags_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CLI flag mirrors its env var and wins over it."""
    monkeypatch.setenv("NUM_SHARDS", "4")
    settings = NormalizerSettings.load(["--num-shards", "8", "--normalizer-shards", "1,3"])
    assert settings.num_shards == 8
    assert settings.owned_shards == frozenset({1, 3})
    assert settings.durable_name == "normalizer-s1-3"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"NATS_URLS": "http://nowhere"}, "NATS_URLS"),
        ({"NATS_URLS": "nats://host:notaport"}, "NATS_URLS"),
        ({"COINBASE_CHANNELS": "ticker,level9"}, "COINBASE_CHANNELS"),
        ({"WATCHDOG_TIMEOUT_S": "-1"}, "WATCHDOG_TIMEOUT_S"),
        ({"COINBASE_PRODUCTS": "BTC.USD"}, "COINBASE_PRODUCTS"),
        # accepted once, then a traceback per resync or a hot reconnect loop
        ({"COINBASE_REST_URL": "notaurl"}, "COINBASE_REST_URL"),
        ({"COINBASE_WS_URL": "https://ws-feed.exchange.coinbase.com"}, "COINBASE_WS_URL"),
        ({"COINBASE_REST_TIMEOUT_S": "inf"}, "COINBASE_REST_TIMEOUT_S"),
        ({"COINBASE_REST_TIMEOUT_S": "1e300"}, "COINBASE_REST_TIMEOUT_S"),
        ({"RECONNECT_MAX_S": "0.000001"}, "RECONNECT_MAX_S"),
        ({"RECONNECT_INITIAL_S": "5", "RECONNECT_MAX_S": "1"}, "RECONNECT_MAX_S"),
        ({"NATS_CONNECT_TIMEOUT_S": "nan"}, "NATS_CONNECT_TIMEOUT_S"),
    ],
)
def test_bad_values_raise_one_readable_error(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], needle: str
) -> None:
    """Each bad value names its env var in a single-line ConfigError."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as excinfo:
        IngestorSettings.load([])
    message = str(excinfo.value)
    assert needle in message
    assert "\n" not in message


def test_shards_must_exist() -> None:
    """A replica cannot own a shard beyond NUM_SHARDS."""
    with pytest.raises(ConfigError, match="NORMALIZER_SHARDS"):
        NormalizerSettings.load(["--normalizer-shards", "0,7"])


@pytest.mark.parametrize(
    ("service", "env"),
    [
        ("ingestor", {"NATS_URLS": "not a url"}),
        ("ingestor", {"COINBASE_CHANNELS": "ticker,unknown"}),
        ("gateway", {"WS_MAX_MSGS_PER_SEC": "-5"}),
        ("snapshotter", {"SNAPSHOT_PERIOD_MS": "0"}),
        ("normalizer", {"NUM_SHARDS": "zero"}),
    ],
)
def test_service_exits_2_with_one_line_and_no_traceback(service: str, env: dict[str, str]) -> None:
    """Bad settings stop a service at start-up: exit code 2, one JSON error line, no traceback."""
    result = run_to_exit(service, env)
    assert result.returncode == 2, result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    entry = json.loads(lines[0])
    assert entry["event"] == "config_error"
    assert entry["service"] == service
    assert next(iter(env)) in entry["error"]


def test_env_example_documents_every_setting() -> None:
    """Each settings field of each service has its env var, with a comment, in .env.example."""
    from pathlib import Path

    from services.gateway.settings import GatewaySettings
    from services.snapshotter.settings import SnapshotterSettings

    text = (Path(__file__).resolve().parents[2] / ".env.example").read_text()
    lines = text.splitlines()
    missing = []
    for model in (IngestorSettings, NormalizerSettings, SnapshotterSettings, GatewaySettings):
        for name in model.model_fields:
            env = name.upper()
            hits = [i for i, line in enumerate(lines) if line.lstrip("# ").startswith(env + "=")]
            if not hits or not any(lines[i - 1].startswith("#") for i in hits):
                missing.append(env)
    assert not missing, f"undocumented in .env.example: {sorted(set(missing))}"


def test_empty_env_values_mean_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """`DDB_ENDPOINT_URL=` copied from .env.example means 'unset' (AWS), not an empty URL."""
    from services.snapshotter.settings import SnapshotterSettings

    monkeypatch.setenv("DDB_ENDPOINT_URL", "")
    monkeypatch.setenv("SNAPSHOTTER_SHARDS", "")
    settings = SnapshotterSettings.load([])
    assert settings.ddb_endpoint_url is None
    assert settings.snapshotter_shards is None


def test_config_errors_never_echo_urls_or_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad NATS_URLS (which may hold credentials) is named, its value is not printed."""
    monkeypatch.setenv("NATS_URLS", "http://user:hunter2@host:4222")
    with pytest.raises(ConfigError) as excinfo:
        IngestorSettings.load([])
    assert "NATS_URLS" in str(excinfo.value)
    assert "hunter2" not in str(excinfo.value)


def test_a_check_across_settings_never_echoes_the_other_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NORMALIZER_SHARDS beyond NUM_SHARDS fails a check of the settings as a whole, whose
    input is every setting: the line printed them all, NATS credentials included."""
    from services.normalizer.settings import NormalizerSettings

    monkeypatch.setenv("NATS_URLS", "nats://user:hunter2@host:4222")
    monkeypatch.setenv("NORMALIZER_SHARDS", "9")
    with pytest.raises(ConfigError) as excinfo:
        NormalizerSettings.load([])
    assert "NORMALIZER_SHARDS" in str(excinfo.value)
    assert "hunter2" not in str(excinfo.value), str(excinfo.value)


def test_aws_keys_in_a_dotenv_file_reach_the_clients(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """README: copy .env.example to .env. Its AWS keys were read by nobody (boto reads the
    process environment only), so DynamoDB and S3 calls went out unsigned or with other
    keys. They are settings now, passed to both clients; unset, boto's chain applies."""
    from services.snapshotter.settings import SnapshotterSettings
    from services.snapshotter.tools import ddb_client_kwargs, s3_client_kwargs

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    assert "aws_access_key_id" not in ddb_client_kwargs(SnapshotterSettings.load([]))
    (tmp_path / ".env").write_text("AWS_ACCESS_KEY_ID=local-id\nAWS_SECRET_ACCESS_KEY=s3cr3t\n")
    settings = SnapshotterSettings.load([])
    for kwargs in (ddb_client_kwargs(settings), s3_client_kwargs(settings)):
        assert (kwargs["aws_access_key_id"], kwargs["aws_secret_access_key"]) == (
            "local-id",
            "s3cr3t",
        )
    assert "s3cr3t" not in repr(settings)
