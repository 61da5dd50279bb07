"""Cluster-wide connection leases: a connector's ``max_connections`` and ``max_connections_per_host``
counted over every node, not per process.

The client pool (mta.smtp.client.pool) asks :meth:`ConnectionLeases.take` before it opens a connection
and gives the lease back when the connection closes. A lease is a member of a sorted set in Redis
(``smtpgw:lease:<connector>`` and ``smtpgw:lease:<connector>:<host>:<port>``) scored with its expiry, by
Redis's own clock; the node renews its leases every :data:`RENEW_SECONDS`, so those of a node that
crashed (``kill -9``) lapse within :data:`LEASE_TTL`. While Redis does not answer, every lease is granted
and only the node's own limits apply (the degraded mode of mta.cluster.node).
"""
from __future__ import annotations

import uuid
from typing import Any, Callable

from twisted.internet import defer, task
from twisted.logger import Logger

from mta.cluster.node import PREFIX, Cluster
from mta.cluster.redis import Unavailable
from mta.config import Config

log = Logger(namespace="smtpgw.cluster")

LEASE_TTL = 10          # seconds a lease lives without renewal
RENEW_SECONDS = 3.0
LOCAL = ""              # no lease was needed, or Redis is down: the node's own limits apply

# KEYS: the limit keys; ARGV: ttl, member, then one limit per key. All or nothing.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) >= tonumber(ARGV[2 + i]) then return 0 end
end
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[2])
  redis.call('EXPIRE', key, math.ceil(ttl) + 1)
end
return 1
"""

RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  if redis.call('ZSCORE', key, ARGV[2]) then
    redis.call('ZADD', key, now + ttl, ARGV[2])
    redis.call('EXPIRE', key, math.ceil(ttl) + 1)
  end
end
return 1
"""


def lease_keys(connector: str, host: str, port: int) -> tuple[str, str]:
    return f"{PREFIX}lease:{connector}", f"{PREFIX}lease:{connector}:{host}:{port}"


class ConnectionLeases:
    """This node's leases; ``config()`` gives the configuration in force (limits follow a reload)."""

    def __init__(self, cluster: Cluster, config: Callable[[], Config]) -> None:
        self.cluster = cluster
        self.config = config
        self.held: dict[str, tuple[str, ...]] = {}          # member -> its keys
        self._renew = task.LoopingCall(self._renew_all)
        self._renew.clock = cluster.reactor
        cluster.leases_held = lambda: len(self.held)

    def start(self) -> None:
        self._renew.start(RENEW_SECONDS, now=False)

    def stop(self) -> None:
        if self._renew.running:
            self._renew.stop()

    def _limits(self, policy: Any, host: str, port: int) -> list[tuple[str, int]]:
        name = getattr(policy, "connector", None)
        connector = next((c for c in self.config().connectors if c.name == name), None)
        if connector is None:
            return []
        group, per_host = lease_keys(connector.name, host, port)
        return [(k, n) for k, n in ((group, connector.max_connections), (per_host, connector.max_connections_per_host))
                if n is not None]

    async def take(self, policy: Any, host: str, port: int) -> str | None:
        """A lease for one more connection: its token, :data:`LOCAL` when none is needed (or Redis is
        down), None while the cluster is at the connector's limit."""
        limits = self._limits(policy, host, port)
        if not limits:
            return LOCAL
        member = f"{self.cluster.name}:{uuid.uuid4().hex}"
        keys = [k for k, _ in limits]
        try:
            granted = await self.cluster.call("EVAL", TAKE, len(keys), *keys, LEASE_TTL, member,
                                              *[n for _, n in limits])
        except Unavailable:
            return LOCAL
        if not granted:
            return None
        self.held[member] = tuple(keys)
        return member

    def release(self, token: str) -> None:
        keys = self.held.pop(token, None)
        if not keys:
            return
        d = defer.gatherResults([defer.Deferred.fromCoroutine(self.cluster.call("ZREM", k, token)) for k in keys],
                                consumeErrors=True)
        d.addErrback(lambda f: None)            # not given back: it lapses within LEASE_TTL

    def _renew_all(self) -> defer.Deferred:
        jobs = [defer.Deferred.fromCoroutine(self.cluster.call("EVAL", RENEW, len(keys), *keys, LEASE_TTL, member))
                for member, keys in list(self.held.items())]
        return defer.gatherResults(jobs, consumeErrors=True).addErrback(lambda f: None)


__all__ = ["ConnectionLeases", "LEASE_TTL", "LOCAL", "lease_keys"]
