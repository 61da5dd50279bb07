"""The etrn_dequeue plugin: hold mail for remote-triggered delivery, release it on ETRN/ATRN/TURN (and
site commands), and ask our own ISP to dequeue (the seed's "Queue mail for remote triggered delivery"
and "de-queue the stored mail to your mail server").

Holding. ``smtpgw_delivery_window`` answers for connectors with ``delivery.remote_triggered: true``:
every recipient routed through one is held (the queue counts no attempt) until a client allowed by
``delivery.authorized`` asks for its domain; ``queue.expire`` still applies, so mail nobody collects
gets its DSN.

Releasing. A release is per (message, recipient domain) and lasts until each of those recipients has
an outcome (or :data:`RELEASE_SECONDS`): the queue is woken for the messages concerned and the
delivery window lets exactly those recipients go, through the normal outbound path (smart host or
MX) -- or, for ATRN/TURN, over the client's own connection (plugins/etrn_dequeue/atrn.py). A
recipient that is deferred is held again afterwards until the next request.

Several workers, several nodes. A request answered here is passed on through ``services.triggers``
(mta/cluster/triggers.py): the other workers and nodes release what they hold (:meth:`remote_trigger`),
and for ATRN the other workers and nodes first hand their entries over to this one (:meth:`hand_over`;
between nodes through Redis, within a bounded wait, mta/cluster/handover.py). The rate
limit counts a client's requests everywhere (``services.client_windows``, mta/cluster/windows.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mta.smtp.address import domain_of
from mta.plugin.hookspecs import hookimpl
from mta.smtp import replies as R
from mta.smtp.reply import Reply
from mta.delivery.connectors import connectors_for
from mta.model.window import Go, Hold
from smtpgw_plugins.etrn_dequeue import nodes
from smtpgw_plugins.etrn_dequeue.atrn import AtrnRoutes, AtrnSession, RoutingPool
from smtpgw_plugins.etrn_dequeue.nodes import Node
from smtpgw_plugins.etrn_dequeue.requester import start_requesters

log = Logger(namespace="smtpgw.etrn_dequeue")

HOLD_SECONDS = 7 * 86400.0        # a held recipient looks again this late (expiry comes first anyway)
RELEASE_SECONDS = 600.0           # a release nobody used (a refused connector...) is forgotten after this



@dataclass(frozen=True)
class HandOff(Reply):
    """A positive reply after which the connection is handed to ``take_over`` (mta/smtp/server/session.py)."""

    take_over: Any = field(default=None, compare=False)


@dataclass(frozen=True)
class Rate:
    """``rate_limit``: at most ``requests`` ETRN/DEQUEUE per client address in each window of ``per``
    seconds, counted over every worker and node (mta/cluster/windows.py)."""

    requests: int
    per: float


@dataclass
class Release:
    until: float
    via: AtrnSession | None = None


class EtrnDequeue:
    def __init__(self) -> None:
        self.config: Any = None
        self.services: Any = None
        self.rate = Rate(10, 60.0)
        self.turn_enabled = False
        self.releases: dict[tuple[str, str], Release] = {}      # (entry id, domain) -> release
        self.atrn_sessions: dict[str, AtrnSession] = {}
        self.requesters: list[Any] = []

    # -- set-up ---------------------------------------------------------------------------------

    @hookimpl
    def smtpgw_configure(self, config: Any, services: Any) -> None:
        self.config = config
        self.services = services
        settings = config.plugins.settings.get("etrn_dequeue") or {}
        rate = settings.get("rate_limit") or {}
        self.rate = Rate(int(rate.get("requests", 10)), float(rate.get("per", 60.0)))
        self.turn_enabled = bool(settings.get("turn", False))
        if nodes.remote_triggered(config):
            services.hooks.register(AtrnRoutes(self), name="etrn_dequeue.atrn")
            services.client = RoutingPool(services.client, self)
        self.requesters = start_requesters(self, config, services)
        triggers = getattr(services, "triggers", None)
        if triggers is not None and nodes.remote_triggered(config):
            triggers.on_trigger(self.remote_trigger)        # from the other workers and nodes
            triggers.on_hand_over(self.hand_over)

    def event(self, level: str, message: str, **fields: Any) -> None:
        if self.services is not None:
            self.services.hooks.event("queuing_engine", level, message, **fields)

    def _now(self) -> float:
        return self.services.reactor.seconds()

    # -- holding ----------------------------------------------------------------------------------

    @hookimpl
    def smtpgw_delivery_window(self, connector, envelope, domain):
        if connector is None or not connector.delivery.remote_triggered or self.services is None:
            return None
        now = self._now()
        release = self.releases.get((getattr(envelope, "id", ""), domain))
        if release is not None and release.until >= now:
            return Go.NOW               # released: go now, whatever the connector's schedule says
        return Hold(now + HOLD_SECONDS, f"held: connector '{connector.name}' is remote-triggered; "
                                        f"waiting for ETRN/ATRN for {domain}")

    def release_via(self, entry_id: str, domain: str) -> AtrnSession | None:
        release = self.releases.get((entry_id, domain))
        return release.via if release is not None and release.until >= self._now() else None

    def _outcome(self, envelope: Any, recipient: str) -> None:
        key = (getattr(envelope, "id", ""), domain_of(recipient))
        for atrn in list(self.atrn_sessions.values()):
            atrn.outcome(key[0], recipient)
        if key not in self.releases:
            return
        pending = [r for r in getattr(envelope, "pending", lambda: [])() if domain_of(r.address) == key[1]]
        if not pending:
            del self.releases[key]

    @hookimpl
    def smtpgw_delivered(self, envelope, recipient, reply):
        self._outcome(envelope, recipient)
        self._link_outcome(recipient, True, reply)

    @hookimpl
    def smtpgw_deferred(self, envelope, recipient, reply):
        self._outcome(envelope, recipient)
        key = (getattr(envelope, "id", ""), domain_of(recipient))
        self.releases.pop(key, None)            # a deferred recipient waits for the next request
        self._link_outcome(recipient, False, reply)

    def _link_outcome(self, recipient: str, delivered: bool, reply: Reply) -> None:
        """Tell the requester of the connector that routes ``recipient`` (its first choice) how the
        delivery went, so it can ask the ISP again when the link comes back."""
        if not self.requesters:
            return
        domain = domain_of(recipient)
        if not domain or self.config.is_local_domain(domain):
            return
        route = connectors_for(self.config, domain)
        for requester in self.requesters:
            if route and requester.connector.name == route[0].name:
                requester.outcome(delivered, reply)

    @hookimpl
    def smtpgw_bounced(self, envelope, recipient, reply):
        self._outcome(envelope, recipient)

    def release(self, wanted: Any, connectors: list[Any], via: AtrnSession | None = None) -> int:
        """Release the held recipients whose domain ``wanted(domain)`` accepts and that route through
        one of ``connectors``; wake their messages. Returns how many messages move."""
        now = self._now()
        self._forget_stale(now)

        def pick(entry: Any) -> bool:
            found = False
            for r, domain in self._held_for(entry, wanted, connectors):
                self.releases[(entry.id, domain)] = Release(now + RELEASE_SECONDS, via)
                if via is not None:
                    via.expected.add((entry.id, r.address.lower()))
                found = True
            return found

        return self.services.queue.wake(pick)

    def _held_for(self, entry: Any, wanted: Any, connectors: list[Any]) -> list[tuple[Any, str]]:
        """The pending recipients of ``entry`` (with their domains) that a request for ``wanted``
        through ``connectors`` concerns."""
        names = {c.name for c in connectors}
        config = self.config
        found = []
        for r in entry.pending():
            domain = domain_of(r.address)
            if not domain or config.is_local_domain(domain) or not wanted(domain):
                continue
            route = connectors_for(config, domain)
            if route and route[0].name in names:
                found.append((r, domain))
        return found

    async def hand_over(self, request: dict) -> list[str]:
        """ATRN at another worker of this gateway: hand it the entries it asks for (through the
        spool, mta/queue/manager.py), since its client's connection is the only way to them."""
        names = set(request.get("connectors") or [])
        connectors = [c for c in nodes.remote_triggered(self.config) if c.name in names]
        domains = request.get("domains")
        wanted = (lambda d: True) if domains is None else set(domains).__contains__
        if not connectors:
            return []
        send = self.services.triggers.sender(request)      # to another node (a cluster), else None
        return await self.services.queue.hand_over(lambda e: bool(self._held_for(e, wanted, connectors)),
                                                   int(request["to"]), send)

    def _forget_stale(self, now: float) -> None:
        for key in [k for k, r in self.releases.items() if r.until < now]:
            del self.releases[key]

    # -- the verbs ----------------------------------------------------------------------------------

    @hookimpl
    def smtpgw_ehlo_keywords(self, session):
        if self.config is None:
            return None
        vs = self._virtual_server(session)
        if vs is not None and vs.odmr:
            return ["ATRN"]
        return ["ETRN"] if nodes.remote_triggered(self.config) else None

    @hookimpl
    def smtpgw_command(self, session, verb, argument):
        if self.config is None:
            return None
        if verb == "ETRN":
            return self.dequeue(session, argument)
        if verb == "ATRN":
            return self.atrn(session, argument)
        if verb == "TURN":
            return self.turn(session, argument)
        return None

    @hookimpl
    def smtpgw_mail_from(self, session, envelope, sender, params):
        vs = self._virtual_server(session)
        return R.ODMR_ONLY if vs is not None and vs.odmr else None

    def _virtual_server(self, session: Any) -> Any:
        try:
            return self.config.virtual_server(session.virtual_server)
        except KeyError:
            return None

    def dequeue(self, session: Any, argument: str, verb: str = "ETRN") -> Reply:
        """ETRN (RFC 1985), and the same for a site's own command (etc/local_hooks/dequeue.py):
        check, authorize, rate-limit, release, and answer 250/251 or 458/459."""
        if session.helo is None:
            return R.NEED_HELO
        node = nodes.parse_node(argument)
        if node is None:
            return R.ETRN_SYNTAX if verb == "ETRN" else R.dequeue_syntax(verb)
        # the client's requests over every worker and (gateway.cluster) every node
        seen = self.services.client_windows.hit("etrn", "etrn", session.peer_host, self.rate.per)
        if isinstance(seen, defer.Deferred):
            return seen.addCallback(self._counted, session, node, verb)
        return self._counted(seen, session, node, verb)

    def _counted(self, seen: int, session: Any, node: Node, verb: str) -> Reply | defer.Deferred:
        if seen > self.rate.requests:
            self.event("minimum", f"{verb} {node.text} from {session.peer_host}: rate limited")
            return R.node_rate_limited(node.text, "too many requests, try again later")
        held_by = [c for c in nodes.remote_triggered(self.config) if node.matches_connector(c)]
        if not held_by:
            return R.node_not_allowed(node.text, "no mail is held here for it")
        allowed = [c for c in held_by if nodes.is_authorized(c, session)]
        if not allowed:
            self.event("minimum", f"{verb} {node.text} refused: {session.peer_host} "
                                  f"({session.authenticated_user or 'not authenticated'}) is not authorized")
            return R.node_not_allowed(node.text, "client not authorized")
        moved = self.release(self._wanted(node), allowed)
        triggers = getattr(self.services, "triggers", None)
        if triggers is None:
            return self._dequeued(session, node, verb, moved, 0)
        # the other workers (gateway.workers) and nodes (gateway.cluster) release what they hold too
        d = defer.Deferred.fromCoroutine(triggers.trigger(node.text, verb, [c.name for c in allowed]))

        def failed(f: Any) -> int:
            self.event("minimum", f"{verb} {node.text}: telling the other workers failed: {f.getErrorMessage()}")
            return 0

        d.addErrback(failed)
        if not triggers.others:                 # one process: nothing to wait for
            return self._dequeued(session, node, verb, moved, 0)
        return d.addCallback(lambda others: self._dequeued(session, node, verb, moved, others))

    def _dequeued(self, session: Any, node: Node, verb: str, here: int, others: int) -> Reply:
        self.event("minimum", f"{verb} {node.text} from {session.peer_host}: {here + others} message(s) released")
        if getattr(self.services, "cluster", None) is not None:
            # the other nodes cannot be waited for: whether they hold any is not known here, so the
            # answer is "started" rather than "nothing here"
            return R.node_started(node.text)
        return R.node_started(node.text) if here + others else R.node_empty(node.text)

    def remote_trigger(self, trigger: dict) -> int:
        """An ETRN/DEQUEUE answered by another node of the cluster (checked and authorized there):
        release what this node holds for it, through the same connectors."""
        node = nodes.parse_node(str(trigger.get("node", "")))
        if node is None:
            return 0
        names = set(trigger.get("connectors") or [])
        connectors = [c for c in nodes.remote_triggered(self.config) if c.name in names]
        moved = self.release(self._wanted(node), connectors) if connectors else 0
        self.event("minimum", f"{trigger.get('verb', 'ETRN')} {node.text} at node {trigger.get('from')}: "
                              f"{moved} message(s) released here")
        return moved

    @staticmethod
    def _wanted(node: Node) -> Any:
        if node.kind == "queue":
            return lambda domain: True          # the connector choice in release() does the selecting
        return node.matches_domain

    # -- ATRN / TURN ------------------------------------------------------------------------------

    def atrn(self, session: Any, argument: str) -> Reply:
        vs = self._virtual_server(session)
        if vs is None or not vs.odmr:
            return R.NOT_ODMR
        return self._reverse(session, argument, "ATRN")

    def turn(self, session: Any, argument: str) -> Reply:
        if not self.turn_enabled:
            return R.TURN_REFUSED
        if argument.strip():
            return R.TURN_SYNTAX
        return self._reverse(session, "", "TURN")

    def _reverse(self, session: Any, argument: str, verb: str) -> Reply:
        if session.helo is None:
            return R.NEED_HELO
        if not session.authenticated_user:
            return R.AUTH_REQUIRED
        domains = nodes.parse_domain_list(argument)
        if domains is None:
            return R.ATRN_SYNTAX
        mine = nodes.account_connectors(self.config, session.authenticated_user)
        if not mine:
            return R.turn_refused(f"{verb} request refused: no mail is held for this account")
        if not domains:
            wanted = None
            domains = nodes.collectable_domains(mine)
        else:
            refused = [d for d in domains if not any(Node("domain", d, d).matches_connector(c) for c in mine)]
            if refused:
                self.event("minimum", f"{verb} by {session.authenticated_user} refused for {', '.join(refused)}")
                return R.turn_refused(f"{verb} request refused for {', '.join(refused)}")
            wanted = set(domains)
        triggers = getattr(self.services, "triggers", None)
        if triggers is not None and triggers.collects:
            # the other workers (and nodes) hold mail for these domains too: they hand it over first
            request = {"domains": None if wanted is None else sorted(wanted), "connectors": [c.name for c in mine]}
            d = defer.Deferred.fromCoroutine(triggers.collect(request))
            d.addCallback(lambda ids: defer.Deferred.fromCoroutine(self.services.queue.adopt(ids)))
            d.addErrback(lambda f: log.failure("{verb}: collecting from the other workers failed", f, verb=verb))
            return d.addCallback(lambda _: self._reversed(session, domains, wanted, mine, verb))
        return self._reversed(session, domains, wanted, mine, verb)

    def _reversed(self, session: Any, domains: list[str], wanted: set[str] | None, mine: list[Any],
                  verb: str) -> Reply:
        atrn = AtrnSession(self, session, domains)
        moved = self.release((lambda d: True) if wanted is None else (lambda d: d in wanted), mine, via=atrn)
        if not moved:
            for key in [k for k, r in self.releases.items() if r.via is atrn]:
                del self.releases[key]
            return R.NO_MAIL_HELD
        self.atrn_sessions[session.id] = atrn
        self.event("minimum", f"{verb} by {session.authenticated_user} for {', '.join(domains)}: "
                              f"{moved} message(s), reversing the connection")
        return HandOff(250, "2.0.0", "OK now reversing the connection", take_over=atrn.take_over)

    def atrn_closed(self, atrn: AtrnSession) -> None:
        self.atrn_sessions.pop(atrn.session_id, None)
        for key in [k for k, r in self.releases.items() if r.via is atrn]:
            del self.releases[key]


__all__ = ["EtrnDequeue", "HandOff"]
