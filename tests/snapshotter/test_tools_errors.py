"""restore and verify facing servers that are down: one line saying what failed, exit 1."""

from __future__ import annotations

import time

import pytest

from services.devstack.ports import free_port
from services.devstack.servers import NatsServer
from tests.support.procs import run_to_exit

pytestmark = pytest.mark.integration

NOWHERE = {
    "DDB_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
    "S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_REGION": "us-east-1",
}


def test_nats_unreachable_is_an_answer_not_a_hang() -> None:
    """nats-py retries a first connect for ever: the tools gave no answer at all (and a
    traceback on Ctrl-C). They give up after NATS_CONNECT_TIMEOUT_S and say where. (verify
    asks NATS first; restore reads the snapshot from S3 first.)"""
    url = f"nats://127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = run_to_exit(
        "snapshotter", {**NOWHERE, "NATS_URLS": url, "NATS_CONNECT_TIMEOUT_S": "2"}, ["verify"]
    )
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 20
    assert f"verify failed: NATS not reachable at {url} within 2 s" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", ["verify", "restore"])
def test_dynamodb_or_s3_unreachable_is_one_line(command: str, nats_server: NatsServer) -> None:
    done = run_to_exit("snapshotter", {**NOWHERE, "NATS_URLS": nats_server.url}, [command])
    assert done.returncode == 1, done.stderr
    assert f"{command} failed: Could not connect to the endpoint URL" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "form", [["--snapshot", "snapshots/k.json.gz"], ["--snapshot=snapshots/k.json.gz"]]
)
def test_both_forms_of_the_snapshot_flag_are_accepted(form: list[str]) -> None:
    """``--snapshot KEY`` and ``--snapshot=KEY`` (the second was 'invalid command line')."""
    url = f"nats://127.0.0.1:{free_port()}"
    done = run_to_exit(
        "snapshotter",
        {**NOWHERE, "NATS_URLS": url, "NATS_CONNECT_TIMEOUT_S": "1"},
        ["verify", *form],
    )
    assert done.returncode == 1, done.stderr
    assert "verify failed: NATS not reachable" in done.stderr  # got past the flags
