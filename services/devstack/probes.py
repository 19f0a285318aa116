"""One-shot readiness checks: each answers "ready yet?" once, with a short timeout.

They return False, or raise OSError / ``http.client.HTTPException``, while a
server is still coming up; ``Server.wait_ready`` polls them.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import http.client
import socket

# A probe that hangs would hold up the whole wait loop; loopback answers in ms.
PROBE_TIMEOUT_S = 2.0

# DynamoDB Local refuses a request without an Authorization header
# (MissingAuthenticationToken, 400) but, with -sharedDb, never checks the signature.
_DDB_DUMMY_AUTH = (
    "AWS4-HMAC-SHA256 Credential=devstack/20240101/us-east-1/dynamodb/aws4_request, "
    "SignedHeaders=host, Signature=0"
)
# The region in the signing scope: the one the stack's env gives every client.
_S3_REGION = "us-east-1"


def http_status(
    host: str,
    port: int,
    path: str = "/",
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> int:
    """The status code of one plain HTTP request."""
    conn = http.client.HTTPConnection(host, port, timeout=PROBE_TIMEOUT_S)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def nats_healthy(host: str, monitor_port: int) -> bool:
    """nats-server's monitor says JetStream is up."""
    return http_status(host, monitor_port, "/healthz?js-enabled-only=true") == 200


def dynamodb_lists_tables(host: str, port: int) -> bool:
    """DynamoDB Local answers a real ``ListTables`` call."""
    status = http_status(
        host,
        port,
        method="POST",
        body=b"{}",
        headers={
            "X-Amz-Target": "DynamoDB_20120810.ListTables",
            "Content-Type": "application/x-amz-json-1.0",
            "Authorization": _DDB_DUMMY_AUTH,
        },
    )
    return status == 200


def s3_lists_buckets(host: str, port: int, access_key: str, secret_key: str) -> bool:
    """A SigV4-signed ``ListBuckets`` (``GET /``) succeeds, so S3 and its auth are up.

    Signed by hand rather than with botocore: importing botocore costs ~0.7 s of
    CPU that would otherwise compete with the JVM and weed starting on 2 cores.
    """
    now = datetime.datetime.now(datetime.UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    scope = f"{now:%Y%m%d}/{_S3_REGION}/s3/aws4_request"
    payload_hash = hashlib.sha256(b"").hexdigest()
    headers = {"x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
    signed = "host;x-amz-content-sha256;x-amz-date"
    canonical = "\n".join(
        [
            "GET",
            "/",
            "",  # no query string
            f"host:{host}:{port}",  # http.client sends Host with the port
            f"x-amz-content-sha256:{payload_hash}",
            f"x-amz-date:{amz_date}",
            "",
            signed,
            payload_hash,
        ]
    )
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = f"AWS4{secret_key}".encode()
    for part in scope.split("/"):
        key = hmac.digest(key, part.encode(), "sha256")
    signature = hmac.new(key, to_sign.encode(), "sha256").hexdigest()
    headers["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )
    return http_status(host, port, headers=headers) == 200


def redis_pongs(host: str, port: int) -> bool:
    """Redis answers ``PING`` with ``+PONG`` (not ``-LOADING`` while it reads its dataset)."""
    with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as sock:
        sock.sendall(b"PING\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(64)
            if not chunk:
                return False
            reply += chunk
    return reply == b"+PONG\r\n"
