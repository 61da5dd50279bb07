"""Outbound SMTP: a pool of client connections per next hop.

``SMTPClientPool.send`` is all the deliverer needs: it takes a connection for (host, port, source
address, outbound policy) -- an idle one if there is one, a new one while fewer than the per-host
limit are open, else it waits for one to come free -- runs one transaction and hands the connection
back. Connections stay open ``idle_timeout`` seconds for the next message to the same hop (connection
reuse is one of the big levers for throughput), then say QUIT.

The :class:`~mta.smtp.client.policy.OutboundPolicy` passed with each send carries a connector's settings (TLS
mode, HELO, AUTH, connect timeout) and its limits: ``max_connections_per_host`` per hop and
``max_connections`` for all of the connector's hops together. When a connector is at its total, an
idle connection of its to another host is closed to make room; otherwise the send waits.

The wire protocol lives in :mod:`mta.smtp.client.session` and :mod:`mta.smtp.client.wire`.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Coroutine

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from mta.smtp.client import policy as outbound
from mta.smtp.client.dane import DaneOptions
from mta.smtp.client.session import ConnectionBroken, SMTPClientProtocol
from mta.dsn.params import OutboundDSN
from mta.model.nexthop import Hop, HostUnusable, RecipientResult
from mta.smtp.client.policy import OutboundPolicy
from mta.smtp import replies as R

__all__ = ["SMTPClientPool", "SMTPClientProtocol", "ConnectionBroken"]

log = Logger(namespace="smtpgw.client")

LEASE_RETRY_SECONDS = 0.25      # a cluster at a connector's limit (no lease): look again after this
MAX_DANE_OPTIONS = 1000          # TLS contexts kept for DANE hops (one per TLSA record set)
TLS_FALLBACK_SECONDS = 3600.0     # after a failed STARTTLS handshake, talk plaintext to that hop this long

Key = tuple[str, int, "str | None", "OutboundPolicy | None"]


@dataclass(eq=False)
class _Group:
    """Every connection made under one policy (one connector): its ``max_connections``."""

    limit: int | None
    open: int = 0
    slots: list["_HostSlot"] = field(default_factory=list)

    def full(self) -> bool:
        return self.limit is not None and self.open >= self.limit


@dataclass(eq=False)
class _HostSlot:
    """The connections to one (host, port, source address) under one policy."""

    limit: int = 20                                     # max_connections_per_host
    group: _Group | None = None
    open: int = 0                                       # connected or connecting, busy or idle
    idle: list[SMTPClientProtocol] = field(default_factory=list)
    waiters: deque[defer.Deferred] = field(default_factory=deque)
    plaintext_until: float = 0.0


def _group_key(policy: OutboundPolicy) -> OutboundPolicy:
    """A connector's connections form one group whatever TLS each needs: a destination's MTA-STS
    policy raises the TLS mode of some of them (:mod:`mta.delivery.tls_policy`), not the total."""
    return replace(policy, tls="none", ca_file=None, required_by="", ca_with_system=False,
                   validation="verified", tlsa=(), dane_name="", dane_also="")


def default_tls_options() -> Any:
    """Opportunistic TLS: encrypt when we can, verify nothing (RFC 7435), as MTAs do by default."""
    from twisted.internet import ssl
    return ssl.CertificateOptions()


class SMTPClientPool:
    def __init__(self, reactor: Any, helo_name: str, connect_timeout: float = 30.0,
                 command_timeout: float = 300.0, idle_timeout: float = 5.0, max_per_host: int = 20,
                 clock: Any = None, starttls: bool = True, tls_options: Any = None) -> None:
        """``clock`` (default: the reactor) runs the timers, so tests can pass a ``task.Clock``;
        ``starttls=False`` never tries STARTTLS; ``tls_options`` overrides the TLS context factory."""
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.helo_name = helo_name
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.idle_timeout = idle_timeout
        self.max_per_host = max_per_host
        self.starttls = starttls
        self._tls_options = tls_options
        self._slots: dict[Key, _HostSlot] = {}
        self._groups: dict[OutboundPolicy, _Group] = {}     # _group_key(policy) -> its connections
        self._verifying: dict[tuple[str | None, bool, str], Any] = {}  # (ca_file, +system, name) -> options
        self._trust_roots: dict[tuple[str | None, bool], Any] = {}
        self._dane: dict[tuple[tuple, str, str], DaneOptions] = {}         # (TLSA records, name) -> options
        self._idle_timers: dict[SMTPClientProtocol, Any] = {}
        self._idle_since: dict[SMTPClientProtocol, float] = {}     # when each idle one was last released
        self._counted: set[SMTPClientProtocol] = set()
        self._closing = False
        # connector name -> mta.smtp.client.protocol_log.OutboundProtocolLog (connectors[].protocol_log)
        self.protocol_logs: dict[str, Any] = {}
        # a cluster's connection leases (mta.cluster.leases, gateway.cluster), or None: ``take(policy,
        # host, port)`` -> a token (falsy: none needed) or None while the cluster is at the limit;
        # ``release(token)`` when the connection closes
        self.leases: Any = None
        self._lease_of: dict[SMTPClientProtocol, str] = {}

    # -- the public face ---------------------------------------------------------------------------

    def send(self, hop: Hop, sender: str, recipients: list[str], data: bytes | list[bytes],
             source_address: str | None = None, policy: OutboundPolicy | None = None,
             dsn: OutboundDSN | None = None, smtputf8: bool = False, requiretls: bool = False) -> defer.Deferred:
        """Deliver one message to ``hop``: a Deferred firing with one RecipientResult per recipient,
        in order, or failing with :class:`HostUnusable` when the hop took nothing.

        ``policy``: the connector's outbound settings and limits (None: the pool's defaults).
        ``dsn``: the message's RFC 3461 parameters, or None. ``smtputf8``: the message was received
        with SMTPUTF8 (a hop without it may then refuse it: :mod:`mta.smtp.client.smtputf8`).
        ``requiretls``: the message was received with REQUIRETLS (:mod:`mta.smtp.client.requiretls`)."""
        return defer.Deferred.fromCoroutine(self.send_async(hop, sender, recipients, data, source_address, policy,
                                                            dsn, smtputf8, requiretls))

    def send_async(self, hop: Hop, sender: str, recipients: list[str], data: bytes | list[bytes],
                   source_address: str | None = None, policy: OutboundPolicy | None = None,
                   dsn: OutboundDSN | None = None, smtputf8: bool = False,
                   requiretls: bool = False) -> Coroutine[Any, Any, list[RecipientResult]]:
        """``send`` as a coroutine, for a caller that is one itself (the delivery attempt's route):
        awaited directly, one Deferred and its callbacks fewer per message."""
        chunks = [bytes(data)] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
        return self._send(hop, sender, list(recipients), chunks, source_address, policy, dsn, smtputf8, requiretls)

    def close(self) -> defer.Deferred:
        """QUIT every idle connection and stop the timers; busy ones close when their transaction ends."""
        self._closing = True
        closing = []
        for slot in self._slots.values():
            while slot.idle:
                conn = slot.idle.pop()
                self._cancel_idle_timer(conn)
                closing.append(conn.quit())
            while slot.waiters:
                slot.waiters.popleft().callback(None)
        return defer.DeferredList(closing, consumeErrors=True)

    def idle_count(self, host: str, port: int = 25, source_address: str | None = None,
                   policy: OutboundPolicy | None = None) -> int:
        slot = self._slots.get((host, port, source_address, policy))
        return len(slot.idle) if slot else 0

    def open_count(self, policy: OutboundPolicy | None = None, host: str | None = None, port: int = 25,
                   source_address: str | None = None) -> int:
        """Connections open (busy, idle or connecting) for ``policy``: to one host, or to all."""
        if host is not None:
            slot = self._slots.get((host, port, source_address, policy))
            return slot.open if slot else 0
        group = self._groups.get(_group_key(policy)) if policy is not None else None
        if group is not None:
            return group.open
        return sum(s.open for k, s in self._slots.items() if k[3] == policy)

    def _slot(self, key: Key) -> _HostSlot:
        slot = self._slots.get(key)
        if slot is None:
            policy = key[3]
            group = None
            if policy is not None and policy.max_connections is not None:
                group = self._groups.get(_group_key(policy))
                if group is None:
                    group = self._groups[_group_key(policy)] = _Group(policy.max_connections)
            limit = (policy.max_connections_per_host if policy is not None
                     and policy.max_connections_per_host is not None else self.max_per_host)
            slot = self._slots[key] = _HostSlot(limit=limit, group=group)
            if group is not None:
                group.slots.append(slot)
        return slot

    # -- one send ------------------------------------------------------------------------------------

    async def _send(self, hop: Hop, sender: str, recipients: list[str], chunks: list[bytes],
                    source_address: str | None, policy: OutboundPolicy | None,
                    dsn: OutboundDSN | None = None, smtputf8: bool = False,
                    requiretls: bool = False) -> list[RecipientResult]:
        key: Key = (hop.host, hop.port, source_address, policy)
        slot = self._slot(key)
        retried = False
        while True:
            conn, reused = await self._acquire(slot, key, hop)
            started = self.clock.seconds()
            try:
                results = await conn.deliver(sender, recipients, chunks, str(hop), dsn=dsn, smtputf8=smtputf8,
                                           requiretls=requiretls)
            except ConnectionBroken as e:
                self._release(slot, conn)
                if reused and e.kind == "lost" and not retried:
                    log.debug("reused connection to {hop} was dead; retrying on a fresh one", hop=str(hop))
                    retried = True
                    continue
                raise HostUnusable(e.reply) from e
            except HostUnusable:
                self._release(slot, conn)
                raise
            except BaseException:               # cancelled or a bug: the session state is unknown
                conn.discard()
                self._release(slot, conn)
                raise
            self._release(slot, conn)
            finished = self.clock.seconds()     # the mail log's delays: set-up before, transmission after
            tls = outbound.tls_label(policy, conn.tls)
            return [replace(r, started=started, finished=finished, tls=tls) for r in results]

    async def _acquire(self, slot: _HostSlot, key: Key, hop: Hop) -> tuple[SMTPClientProtocol, bool]:
        """An idle connection (True: reused) or a new one, waiting while the host is at its limit."""
        while True:
            if self._closing:
                raise HostUnusable(R.CLIENT_SHUTTING_DOWN)
            while slot.idle:
                conn = slot.idle.pop()              # the most recently used is the least likely dead
                if conn.usable:                     # its idle timer stays: it finds the connection busy
                    return conn, False if conn.transactions == 0 else True
                self._forget(slot, conn)
            group = slot.group
            if slot.open < slot.limit and (group is None or not group.full() or self._evict_idle(group)):
                slot.open += 1
                if group is not None:
                    group.open += 1
                lease: str | None = ""          # "": no lease needed (no cluster)
                try:
                    if self.leases is not None and key[3] is not None:
                        lease = await self.leases.take(key[3], hop.host, hop.port)
                    if lease is not None:
                        conn = await self._open(slot, key, hop)
                except BaseException:
                    if lease:
                        self.leases.release(lease)
                    self._uncount(slot)
                    raise
                if lease is None:               # the cluster is at the connector's limit: look again soon
                    self._uncount(slot)
                    await task.deferLater(self.clock, LEASE_RETRY_SECONDS, lambda: None)
                    continue
                if lease:
                    self._lease_of[conn] = lease
                self._counted.add(conn)
                return conn, False
            waiter: defer.Deferred = defer.Deferred()
            slot.waiters.append(waiter)
            await waiter

    def _uncount(self, slot: _HostSlot) -> None:
        """A place counted for a connection that was not made after all."""
        slot.open -= 1
        if slot.group is not None:
            slot.group.open -= 1
            self._wake_group(slot.group)
        self._wake(slot)

    def _evict_idle(self, group: _Group) -> bool:
        """Make room under a connector's total by closing one of its idle connections, if any."""
        for other in group.slots:
            if other.idle:
                conn = other.idle.pop(0)            # the longest idle
                self._forget(other, conn)
                conn.quit()
                return True
        return False

    def _wake_group(self, group: _Group) -> None:
        """A place came free under the connector's total: let a waiter of each of its hosts look."""
        for other in group.slots:
            self._wake(other)

    def _release(self, slot: _HostSlot, conn: SMTPClientProtocol) -> None:
        group = slot.group
        others_wait = group is not None and group.full() and not slot.waiters and any(
            s.waiters for s in group.slots if s is not slot)
        if conn.usable and not self._closing and not others_wait:
            slot.idle.append(conn)
            # idle from now: a timer still armed from an earlier idle spell looks again when it fires
            # (one DelayedCall per idle_timeout, not one made and cancelled per message)
            self._idle_since[conn] = self.clock.seconds()
            if conn not in self._idle_timers:
                self._idle_timers[conn] = self.clock.callLater(self.idle_timeout, self._idle_expired, slot, conn)
        else:
            if not conn.dead and conn.connected:
                conn.quit()
            self._forget(slot, conn)
        self._wake(slot)

    def _wake(self, slot: _HostSlot) -> None:
        while slot.waiters:
            waiter = slot.waiters.popleft()
            if not waiter.called:               # a cancelled send no longer waits
                waiter.callback(None)
                return

    def _forget(self, slot: _HostSlot, conn: SMTPClientProtocol) -> None:
        """Stop counting ``conn`` against its host (exactly once, however it ended)."""
        if conn in self._counted:
            self._counted.discard(conn)
            slot.open -= 1
            if slot.group is not None:
                slot.group.open -= 1
                self._wake_group(slot.group)
            lease = self._lease_of.pop(conn, None)
            if lease:
                self.leases.release(lease)
        if conn in slot.idle:
            slot.idle.remove(conn)
        self._cancel_idle_timer(conn)

    def _cancel_idle_timer(self, conn: SMTPClientProtocol) -> None:
        self._idle_since.pop(conn, None)
        timer = self._idle_timers.pop(conn, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _idle_expired(self, slot: _HostSlot, conn: SMTPClientProtocol) -> None:
        self._idle_timers.pop(conn, None)
        if conn not in slot.idle:
            return                      # busy: its release sets the timer again
        left = self._idle_since.get(conn, 0.0) + self.idle_timeout - self.clock.seconds()
        if left > 0:                    # used since the timer was set: idle for less than idle_timeout
            self._idle_timers[conn] = self.clock.callLater(left, self._idle_expired, slot, conn)
            return
        slot.idle.remove(conn)
        conn.quit()
        self._forget(slot, conn)
        self._wake(slot)

    # -- opening a connection ------------------------------------------------------------------------

    def _endpoint(self, hop: Hop, source_address: str | None, policy: OutboundPolicy | None = None) -> Any:
        bind = (source_address, 0) if source_address else None
        cls = TCP6ClientEndpoint if ":" in hop.host else TCP4ClientEndpoint
        timeout = policy.connect_timeout if policy is not None and policy.connect_timeout else self.connect_timeout
        return cls(self.reactor, hop.host, hop.port, timeout=timeout, bindAddress=bind)

    def _encrypting_options(self) -> Any:
        if self._tls_options is None:
            self._tls_options = default_tls_options()
        return self._tls_options

    def _verifying_options(self, policy: OutboundPolicy, hop: Hop) -> Any:
        """Options checking the chain against ``ca_file`` and the name against the hop's name: the
        smart host or MX name it came from, or its IP address for an ``[IP]`` smart host."""
        name = (hop.name or hop.host).strip("[]").rstrip(".").lower()
        trust = (policy.ca_file, policy.ca_with_system)
        key = (*trust, name)
        options = self._verifying.get(key)
        if options is None:
            if trust not in self._trust_roots:
                try:
                    self._trust_roots[trust] = outbound.load_trust_root(*trust)
                except (OSError, ValueError) as e:
                    raise HostUnusable(R.tls_check_failed(
                        f"{policy.label()}: cannot use ca_file {policy.ca_file!r}: {_why(e)}"),
                        "validation-failure") from e
            options = self._verifying[key] = outbound.verifying_options(name, self._trust_roots[trust])
        return options

    def _dane_options(self, policy: OutboundPolicy) -> Any:
        """Options matching the chain against the hop's TLSA records (one per record set and name)."""
        key = (policy.tlsa, policy.dane_name, policy.dane_also)
        options = self._dane.get(key)
        if options is None:
            if len(self._dane) >= MAX_DANE_OPTIONS:
                self._dane.pop(next(iter(self._dane)))
            options = self._dane[key] = DaneOptions(policy.tlsa, policy.dane_name,
                                                    (policy.dane_also,) if policy.dane_also else ())
        return options

    def _tls_options_for(self, slot: _HostSlot, hop: Hop | None = None,
                         policy: OutboundPolicy | None = None) -> Any:
        mode = policy.tls if policy is not None else ("opportunistic" if self.starttls else "none")
        if mode == "none":
            return None
        if mode == "verify" and policy.tlsa:
            return self._dane_options(policy)
        if mode == "verify" and hop is not None:
            return self._verifying_options(policy, hop)
        if mode == "opportunistic" and time.time() < slot.plaintext_until:
            return None
        return self._encrypting_options()

    async def _open(self, slot: _HostSlot, key: Key, hop: Hop) -> SMTPClientProtocol:
        policy = key[3]
        tls_options = self._tls_options_for(slot, hop, policy)
        try:
            return await self._connect_and_setup(slot, key, hop, tls_options)
        except ConnectionBroken as e:
            if e.kind != "tls":
                raise HostUnusable(e.reply) from e
            if policy is not None and policy.tls_mandatory:
                why = e.reply.text.rpartition(" lost: ")[2] or e.reply.text
                raise HostUnusable(outbound.tls_failed(policy, str(hop), why),
                                   outbound.tls_failure_type(why)) from e
            log.info("STARTTLS with {hop} failed ({reply}); falling back to plaintext", hop=str(hop),
                     reply=str(e.reply))
            slot.plaintext_until = time.time() + TLS_FALLBACK_SECONDS
        try:
            return await self._connect_and_setup(slot, key, hop, None)
        except ConnectionBroken as e:
            raise HostUnusable(e.reply) from e

    async def _connect_and_setup(self, slot: _HostSlot, key: Key, hop: Hop, tls_options: Any) -> SMTPClientProtocol:
        label = str(hop)
        policy = key[3]
        plog = self.protocol_logs.get(policy.connector) if policy is not None else None
        factory = Factory.forProtocol(lambda: SMTPClientProtocol(
            self.helo_name, self.command_timeout, self.clock, tls_options, label, policy=policy,
            protocol_log=plog))
        factory.noisy = False           # one "Starting factory" log line per connection is noise
        try:
            conn = await self._endpoint(hop, key[2], key[3]).connect(factory)
        except Exception as e:
            raise HostUnusable(R.connect_failed(f"connection to {label} failed: {_why(e)}")) from e
        conn.on_close = lambda c: self._lost(slot, c)
        try:
            await conn.setup()
        except HostUnusable:
            raise                       # the connection is already closing (QUIT) or aborted
        except BaseException:
            conn.abort()
            raise
        return conn

    def _lost(self, slot: _HostSlot, conn: SMTPClientProtocol) -> None:
        """A connection closed by itself: if it sat idle, free its place."""
        if conn in slot.idle:
            self._forget(slot, conn)
            self._wake(slot)


def _why(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]
