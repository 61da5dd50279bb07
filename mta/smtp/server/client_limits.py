"""A virtual server's per-client limits, Postfix anvil-style: open connections and connections per
minute from one address (``limits.max_connections_per_client``, ``limits.max_connection_rate``), and
failed AUTH attempts from one address across its connections (``auth.max_failures_per_client``).

The figures live in the gateway's per-client table (mta/workers/clients.py), shared by the workers,
so each limit holds for the whole gateway however the kernel spreads the connections.
"""
from __future__ import annotations

from typing import Any

from twisted.internet import defer

from mta.model.netaddr import client_ip
from mta.smtp import replies as R
from mta.smtp.reply import Reply
from mta.workers import clients


class ClientLimits:
    """One virtual server's view of the per-client table (its position in the configuration keeps
    its clients apart from other virtual servers')."""

    def __init__(self, gateway: Any, vs: Any) -> None:
        self.gateway = gateway
        self.vs = vs
        self.scope = next((i for i, v in enumerate(gateway.config.virtual_servers) if v is vs), 0)
        self._table: clients.ClientCounts | None = None

    @property
    def table(self) -> clients.ClientCounts:
        """Opened at the first connection: after ``twistd -u`` dropped privileges and after the
        worker's identity is known."""
        if self._table is None:
            self._table = clients.for_gateway(self.gateway)
        return self._table

    def admit(self, host: str) -> tuple[int, Reply | None]:
        """``(bucket, None)`` for a connection admitted (and counted open), or ``(bucket, refusal)``.
        Every attempt counts towards the rate, refused ones too, as Postfix's anvil counts them."""
        table = self._table if self._table is not None else self.table
        bucket = table.bucket(self.scope, host)
        limits = self.vs.limits
        if self.exempt(host):
            table.opened(bucket)
            return bucket, None
        if limits.max_connection_rate and table.attempt(bucket) > limits.max_connection_rate:
            return bucket, R.connection_rate_exceeded(host)
        if table.connections(bucket) >= limits.max_connections_per_client:
            return bucket, R.too_many_connections_from(host)
        table.opened(bucket)
        return bucket, None

    def exempt(self, host: str) -> bool:
        """Clients in ``relay.allow`` (the site's own servers: Postfix's $mynetworks) are not held to
        the per-connection limits, as Postfix's ``smtpd_client_event_limit_exceptions`` has it: an
        internal Exchange or an application server may open many connections at once."""
        ip = client_ip(host)
        return ip is not None and any(ip in net for net in self.vs.relay.allow)

    def closed(self, bucket: int) -> None:
        (self._table if self._table is not None else self.table).closed(bucket)

    def auth_locked(self, host: str) -> bool | defer.Deferred:
        """Has ``host`` used up its failed AUTH attempts for the window? Over every worker, and with
        ``gateway.cluster.redis`` over every node (then the answer is a Deferred)."""
        limit = self.vs.auth.max_failures_per_client
        if not limit.count:
            return False
        windows = getattr(self.gateway, "client_windows", None)
        if windows is None:
            return self.table.auth_failures(self.table.bucket(self.scope, host), limit.per) >= limit.count
        seen = windows.count("auth", self.scope, host, limit.per)
        if isinstance(seen, defer.Deferred):
            return seen.addCallback(lambda n: n >= limit.count)
        return seen >= limit.count

    def auth_failed(self, host: str) -> None:
        limit = self.vs.auth.max_failures_per_client
        if not limit.count:
            return
        windows = getattr(self.gateway, "client_windows", None)
        if windows is None:
            self.table.auth_failed(self.table.bucket(self.scope, host), limit.per)
            return
        counted = windows.hit("auth", self.scope, host, limit.per)
        if isinstance(counted, defer.Deferred):
            counted.addErrback(lambda f: None)
