"""ATRN/TURN on the provider side: the connection's roles reverse and we deliver the held mail over it.

After ``250 OK now reversing the connection`` the SMTP session hands its transport to an
:class:`AtrnSession`, which runs our ordinary SMTP client protocol on it (the customer now greets us
with 220). The held recipients of the requested domains are released through the queue as for ETRN,
but their next hop is this connection: :class:`AtrnRoutes` answers ``smtpgw_next_hops`` with a hop
that names the session, and :class:`RoutingPool` (wrapped around the gateway's client pool) sends
to such a hop over the reversed connection instead of dialling out. So retries, per-recipient state,
DSNs and outcome hooks are exactly those of normal delivery. When every released recipient has an
outcome the session says QUIT.
"""
from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mta.smtp.client.session import SMTPClientProtocol
from mta.plugin.hookspecs import hookimpl
from mta.model.nexthop import Hop, HostUnusable
from mta.smtp import replies as R

log = Logger(namespace="smtpgw.etrn_dequeue")

HOP_PREFIX = "atrn-session-"
IDLE_LIMIT = 120.0           # seconds without progress before we give up on a reversed session


class AtrnSession:
    """One reversed connection: the client protocol on it, and the recipients it is to carry."""

    def __init__(self, plugin: Any, session: Any, domains: list[str]) -> None:
        self.plugin = plugin
        self.session_id = session.id
        self.account = session.authenticated_user
        self.domains = domains
        self.hop = Hop(host=HOP_PREFIX + session.id, port=0, name=f"ATRN {self.account}@{session.peer_host}")
        self.expected: set[tuple[str, str]] = set()      # (entry id, recipient lower-case)
        self.conn: SMTPClientProtocol | None = None
        self.ready: defer.Deferred = defer.Deferred()
        self.lock = defer.DeferredLock()
        self.open = True
        self._guard: Any = None

    def take_over(self, transport: Any, pending: bytes) -> SMTPClientProtocol:
        """The SMTP server's ``take_over`` callable: become the client on ``transport``."""
        gw = self.plugin.services
        conn = SMTPClientProtocol(gw.config.gateway.hostname, 300.0, gw.reactor, None, str(self.hop))
        self.conn = conn
        conn.on_close = lambda c: self._closed()
        conn.makeConnection(transport)
        d = defer.Deferred.fromCoroutine(conn.setup())      # registers the wait for 220 first
        if pending:
            conn.dataReceived(pending)
        d.addCallbacks(self._ready, self._setup_failed)
        self._touch()
        return conn

    def _ready(self, _: Any) -> None:
        self.plugin.event("medium", f"ATRN session {self.session_id}: customer ready, delivering",
                          account=self.account, domains=",".join(self.domains))
        self.ready.callback(None)
        self._check_done()

    def _setup_failed(self, failure: Any) -> None:
        reply = getattr(failure.value, "reply", None) or R.link_failed(str(failure.value))
        self.plugin.event("minimum", f"ATRN session {self.session_id}: customer refused: {reply}",
                          account=self.account)
        self.open = False
        self.ready.errback(HostUnusable(reply))
        self.ready.addErrback(lambda f: None)
        if self.conn is not None:
            self.conn.abort()

    def _closed(self) -> None:
        self.open = False
        self.plugin.atrn_closed(self)
        if self._guard is not None and self._guard.active():
            self._guard.cancel()

    def _touch(self) -> None:
        reactor = self.plugin.services.reactor
        if self._guard is not None and self._guard.active():
            self._guard.reset(IDLE_LIMIT)
        else:
            self._guard = reactor.callLater(IDLE_LIMIT, self.finish)

    async def send(self, sender: str, recipients: list[str], chunks: list[bytes], dsn: Any = None,
                   smtputf8: bool = False) -> list[Any]:
        await self.ready
        await self.lock.acquire()
        try:
            if not self.open or self.conn is None or not self.conn.usable:
                raise HostUnusable(R.link_failed(f"{self.hop}: the customer's connection is gone"))
            self._touch()
            return await self.conn.deliver(sender, recipients, chunks, str(self.hop), dsn=dsn, smtputf8=smtputf8)
        finally:
            self.lock.release()

    def outcome(self, entry_id: str, recipient: str) -> None:
        self.expected.discard((entry_id, recipient.lower()))
        self._touch()
        self._check_done()

    def _check_done(self) -> None:
        if not self.expected and self.ready.called and self.open:
            self.finish()

    def finish(self) -> None:
        """Everything released has an outcome (or nothing moved for too long): say goodbye."""
        if self.conn is not None and self.open:
            self.open = False
            self.conn.quit()


class AtrnRoutes:
    """Registered last (in ``smtpgw_configure``), so it answers before the smart hosts and MX."""

    def __init__(self, plugin: Any) -> None:
        self.plugin = plugin

    @hookimpl(tryfirst=True)
    def smtpgw_next_hops(self, envelope, domain, connector):
        via = self.plugin.release_via(getattr(envelope, "id", ""), domain)
        return [via.hop] if via is not None and via.open else None


class RoutingPool:
    """The gateway's client pool, except that hops naming an ATRN session use that connection."""

    def __init__(self, pool: Any, plugin: Any) -> None:
        self._pool = pool
        self._plugin = plugin

    def send(self, hop: Hop, sender: str, recipients: list[str], data: Any, **kw: Any) -> defer.Deferred:
        if hop.host.startswith(HOP_PREFIX):
            session = self._plugin.atrn_sessions.get(hop.host[len(HOP_PREFIX):])
            if session is None:
                return defer.fail(HostUnusable(R.link_failed(f"{hop}: the ATRN session has ended")))
            chunks = [bytes(data)] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
            return defer.Deferred.fromCoroutine(session.send(sender, list(recipients), chunks, kw.get("dsn"),
                                                             kw.get("smtputf8", False)))
        return self._pool.send(hop, sender, recipients, data, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)
