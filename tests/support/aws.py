"""aioboto3 clients of a dev stack's DynamoDB and S3, from the stack's environment."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import aioboto3
from aiobotocore.config import AioConfig

_ENDPOINTS = {"dynamodb": "DDB_ENDPOINT_URL", "s3": "S3_ENDPOINT_URL"}


def stack_client(
    env: Mapping[str, str], service: Literal["dynamodb", "s3"], config: AioConfig | None = None
) -> Any:
    """A client (an async context manager) of ``service`` with the stack's endpoint, region
    and keys; S3 is addressed by path (the local servers have no per-bucket host names)."""
    path_style = AioConfig(s3={"addressing_style": "path"})
    return aioboto3.Session().client(
        service,
        endpoint_url=env[_ENDPOINTS[service]],
        region_name=env["AWS_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        config=path_style if config is None else path_style.merge(config),
    )
