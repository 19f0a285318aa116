"""Connections per API key: per process always, across replicas when ``REDIS_URL`` is set.

Redis layout (every key shares the ``{limits}`` hash tag, so scripts stay on one cluster
slot): ``<prefix>{limits}:conns:<key id>`` is a hash replica → open connections of that
API key on that replica; ``<prefix>{limits}:replicas`` maps replica → lease deadline (Redis
clock, ms). Admission is one Lua script (sum the live replicas' counts, compare, increment)
so two replicas cannot both admit the last slot. Each replica renews its lease and rewrites
its own counts every ``REDIS_LEASE_S / 3``; a replica that dies stops renewing, and once its
lease has passed its counts no longer count and are pruned: nothing leaks.

Availability over precision: when Redis is unreachable the gateway logs, counts
``ledgerflux_gateway_redis_errors_total`` and admits (fails open), still enforcing the
per-process limit; the next successful heartbeat rewrites this replica's counts.
Keys are never logged or stored: Redis and logs see a SHA-256 prefix (``key_id``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
import uuid
from collections import Counter

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from services.common.aio import sleep_or_stop
from services.common.logging import get_logger
from services.gateway import metrics
from services.gateway.settings import GatewaySettings

log = get_logger(__name__)

# after a failure, skip Redis on the connect path for this long (the heartbeat keeps probing)
_BREAKER_S = 5.0

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local counts = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #counts, 2 do
  local replica = counts[i]
  local deadline = tonumber(redis.call('HGET', KEYS[2], replica) or '0')
  if replica ~= ARGV[1] and deadline < now then
    redis.call('HDEL', KEYS[1], replica)
  else
    total = total + tonumber(counts[i + 1])
  end
end
if total >= tonumber(ARGV[2]) then
  return {0, total}
end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('HSET', KEYS[2], ARGV[1], now + tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, total + 1}
"""

_RELEASE = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return n
"""

# KEYS[1] replicas hash, KEYS[2..] counts hashes; ARGV replica, lease ms, counts...
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], now + lease)
local replicas = redis.call('HGETALL', KEYS[1])
for i = 1, #replicas, 2 do
  if tonumber(replicas[i + 1]) < now - lease then redis.call('HDEL', KEYS[1], replicas[i]) end
end
redis.call('PEXPIRE', KEYS[1], lease * 10)
for i = 2, #KEYS do
  local n = tonumber(ARGV[i + 1])
  if n > 0 then
    redis.call('HSET', KEYS[i], ARGV[1], n)
    redis.call('PEXPIRE', KEYS[i], lease)
  else
    redis.call('HDEL', KEYS[i], ARGV[1])
  end
end
return #KEYS - 1
"""


def key_id(api_key: str) -> str:
    """What logs and Redis see instead of the key."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


class KeyLimiter:
    def __init__(self, settings: GatewaySettings) -> None:
        self.limit = settings.ws_max_connections_per_key
        self.lease_ms = int(settings.redis_lease_s * 1000)
        self.heartbeat_s = settings.redis_lease_s / 3
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.local: Counter[str] = Counter()
        # keys whose counts this replica may have written since its last heartbeat
        self._touched: set[str] = set()
        self._prefix = f"{settings.redis_key_prefix}{{limits}}:"
        self._down_until = 0.0
        self._redis: aioredis.Redis | None = None
        if settings.redis_url:
            # one connection: this replica's commands reach Redis in the order issued, so
            # the heartbeat's absolute counts never overtake an earlier increment
            self._redis = aioredis.Redis.from_url(
                settings.redis_url,
                socket_timeout=settings.redis_timeout_s,
                socket_connect_timeout=settings.redis_timeout_s,
                single_connection_client=True,
                retry=Retry(NoBackoff(), 0),
            )
            self._acquire = self._redis.register_script(_ACQUIRE)
            self._release = self._redis.register_script(_RELEASE)
            self._heartbeat = self._redis.register_script(_HEARTBEAT)

    @property
    def shared(self) -> bool:
        return self._redis is not None

    def _counts_key(self, kid: str) -> str:
        return f"{self._prefix}conns:{kid}"

    def _replicas_key(self) -> str:
        return f"{self._prefix}replicas"

    async def acquire(self, kid: str) -> bool:
        """Admit one more connection of ``kid``, or ``False`` when it is at its limit."""
        if self.local[kid] >= self.limit:
            metrics.KEY_LIMIT_REJECTED.labels(scope="process").inc()
            return False
        self.local[kid] += 1  # reserved before any await: local admission is race-free
        self._touched.add(kid)
        if self._redis is None or time.monotonic() < self._down_until:
            return True
        try:
            admitted, total = await self._acquire(
                keys=[self._counts_key(kid), self._replicas_key()],
                args=[self.replica, self.limit, self.lease_ms],
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("acquire", exc)
            return True
        if not admitted:
            self._drop_local(kid)
            metrics.KEY_LIMIT_REJECTED.labels(scope="shared").inc()
            log.info("key_limit_reached", key_id=kid, open=int(total), limit=self.limit)
            return False
        return True

    async def release(self, kid: str) -> None:
        self._drop_local(kid)
        if self._redis is None or time.monotonic() < self._down_until:
            return
        try:
            await self._release(keys=[self._counts_key(kid)], args=[self.replica])
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("release", exc)

    def _drop_local(self, kid: str) -> None:
        self.local[kid] -= 1
        if self.local[kid] <= 0:
            del self.local[kid]

    async def heartbeat(self) -> None:
        """Renew this replica's lease and rewrite its counts (repairs drift after outages)."""
        if self._redis is None:
            return
        kids = sorted(self._touched | set(self.local))
        try:
            await self._heartbeat(
                keys=[self._replicas_key(), *(self._counts_key(k) for k in kids)],
                args=[self.replica, self.lease_ms, *(self.local[k] for k in kids)],
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("heartbeat", exc)
            return
        self._touched = set(self.local)
        if self._down_until:
            log.info("redis_recovered")
            self._down_until = 0.0
        metrics.REDIS_UP.set(1)

    async def run(self, stop: asyncio.Event) -> None:
        """Heartbeat until ``stop``."""
        if self._redis is None:
            return
        while not stop.is_set():
            await self.heartbeat()
            await sleep_or_stop(self.heartbeat_s, stop)

    async def close(self) -> None:
        """Hand back this replica's counts (they would expire with its lease anyway)."""
        if self._redis is None:
            return
        self.local.clear()
        await self.heartbeat()
        try:
            await self._redis.aclose()
        except (RedisError, OSError) as exc:
            log.debug("redis_close_failed", error=str(exc))

    def _failed(self, op: str, exc: BaseException) -> None:
        metrics.REDIS_ERRORS.labels(op=op).inc()
        metrics.REDIS_UP.set(0)
        first = self._down_until == 0.0 or time.monotonic() >= self._down_until
        self._down_until = time.monotonic() + _BREAKER_S
        if first:  # one line per outage window, not one per connection
            log.warning("redis_unavailable_failing_open", op=op, error=str(exc) or repr(exc))
