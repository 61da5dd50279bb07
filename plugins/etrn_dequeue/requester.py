"""The customer side: ask the ISP to send what it holds for us, per connector ``etrn`` section.

Each connector with an ``etrn`` section gets a :class:`Requester` that makes the request once the
gateway runs (the link is up when we start) and then on the section's ``schedule`` (``every 30m``,
or at each opening of a weekly grid). ``command: ATRN`` receives the mail on the same connection into
the gateway's normal inbound path (the SMTP server of the connector's first bridgehead); ETRN and site
commands make the ISP connect to us as usual.

The link coming back is a moment to ask as well. A delivery through the connector that fails to
connect (``4.4.1``/``4.4.2``: no answer, connection lost), or a request of our own that does, marks the
link down; the next delivery through the connector that succeeds marks it up again and makes the
request at once (:meth:`Requester.outcome`, fed by the plugin's outcome hooks). A site whose link
script knows better can run ``smtpgw etrn -c FILE --connector NAME`` (mta/cli/etrn.py).

An ISP that dequeues on something other than an SMTP command (a FINGER request, a web call) is asked
by a program: ``run: [finger, "{domain}@{server}"]`` in the ``etrn`` section runs it per domain
instead of the SMTP session (mta/smtp/client/etrn.py ``run_trigger``), at the same moments.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mta.config import Config, Connector
from mta.smtp.client.etrn import DEFAULT_PORTS, DequeueError, DequeueRequest, request_dequeue
from mta.smtp.reply import Reply
from mta.delivery.connectors import source_address, usable_source
from mta.config.values import parse_smart_host
from mta.smtp.server.session import SMTPServerFactory

log = Logger(namespace="smtpgw.etrn_dequeue")

LINK_DOWN = ("4.4.1", "4.4.2")      # could not connect / connection lost: the way to the ISP is down


def build_request(config: Config, connector: Connector) -> DequeueRequest:
    """The connector's ``etrn`` section as a :class:`DequeueRequest` (also used by ``smtpgw etrn``)."""
    etrn = connector.etrn
    port_default = DEFAULT_PORTS.get(etrn.command, 25)
    host, port, _, _ = parse_smart_host(etrn.server, f"connectors.{connector.name}.etrn.server", port_default)
    auth = etrn.auth
    return DequeueRequest(
        host=host, port=port, domains=tuple(etrn.domains), command=etrn.command,
        helo=etrn.helo or config.gateway.hostname, tls=etrn.tls,
        username=auth.username if auth else None, password=auth.password if auth else None,
        allow_plaintext_auth=etrn.allow_plaintext_auth, run=tuple(etrn.run),
        source_address=usable_source(source_address(config, connector), host))


def next_time(schedule: Any, now: float) -> float | None:
    """When the schedule next fires after ``now``: every D, or the next opening of a weekly grid."""
    if schedule is None or schedule.kind in ("always", "never"):
        return None
    if schedule.kind == "every":
        return now + schedule.every
    when = datetime.fromtimestamp(now, timezone.utc)
    if schedule.is_open(when):
        closes = schedule.next_close(when)
        if closes is None:
            return None
        when = closes
    opening = schedule.next_open(when)
    return opening.timestamp() if opening is not None else None


class Requester:
    def __init__(self, plugin: Any, config: Config, connector: Connector) -> None:
        self.plugin = plugin
        self.config = config
        self.connector = connector
        self.reactor = plugin.services.reactor
        self.request = build_request(config, connector)
        self.last: list[tuple[str, Reply]] | Reply | None = None
        self.runs = 0
        self.link_down = False          # a delivery or request through the connector could not connect
        self._timer: Any = None
        self._running: defer.Deferred | None = None

    def start(self) -> None:
        self._timer = self.reactor.callLater(0, self.fire)

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def fire(self) -> defer.Deferred:
        """The timer's call: make the request now and plan the next one."""
        self._timer = None
        self._plan()
        return self.run_now()

    def run_now(self) -> defer.Deferred:
        """Make the request now unless one is still running; the schedule stays as planned."""
        if self._running is not None:
            return self._running
        d = defer.Deferred.fromCoroutine(self._run())
        self._running = d
        d.addBoth(self._done)
        return d

    def _done(self, result: Any) -> Any:
        self._running = None
        return result

    def _plan(self) -> None:
        when = next_time(self.connector.etrn.schedule, self.reactor.seconds())
        if when is not None:
            self._timer = self.reactor.callLater(max(1.0, when - self.reactor.seconds()), self.fire)

    def outcome(self, delivered: bool, reply: Reply) -> None:
        """A delivery through our connector ended: a connection failure marks the link down; the
        first success after that means it is back, so ask now."""
        if not delivered:
            if reply.status in LINK_DOWN:
                self.link_down = True
            return
        if self.link_down:
            self.link_down = False
            self.plugin.services.hooks.event(
                "connection_manager", "minimum",
                f"connector {self.connector.name}: the link is back (a delivery succeeded); "
                f"asking {self.request.host} now", connector=self.connector.name)
            self.run_now()

    async def _run(self) -> None:
        req = self.request
        where = f"{req.label} for" if req.run else f"{req.label} to {req.host}:{req.port} for"
        label = f"{where} {', '.join(req.domains)}"
        receiver = self._receiver() if req.command == "ATRN" else None
        try:
            results = await request_dequeue(self.reactor, req, receiver=receiver)
        except DequeueError as e:
            self.last = e.reply
            self.link_down = e.reply.status in LINK_DOWN      # else we reached the server
            self.plugin.services.hooks.event("connection_manager", "minimum", f"{label}: {e.reply}",
                                             connector=self.connector.name)
            return
        except Exception:
            log.failure("{label} failed", label=label)
            return
        finally:
            self.runs += 1
        self.last = results
        if not req.run:
            self.link_down = False          # we reached the server: the link is up
        for domain, reply in results:
            what = f"{req.label} {domain}" + ("" if req.run else f" at {req.host}:{req.port}")
            self.plugin.services.hooks.event("connection_manager", "minimum", f"{what}: {reply}",
                                             connector=self.connector.name)

    def _receiver(self) -> Any:
        """ATRN: the gateway's own SMTP server takes the connection (inbound path, relay rules, spool)."""

        names = self.connector.bridgeheads or tuple(vs.name for vs in self.config.virtual_servers)
        vs = self.config.virtual_server(names[0])
        factory = SMTPServerFactory(self.plugin.services, vs)

        def receive(transport: Any) -> Any:
            protocol = factory.buildProtocol(transport.getPeer())
            protocol.makeConnection(transport)
            return protocol
        return receive


def start_requesters(plugin: Any, config: Config, services: Any) -> list[Requester]:
    out = []
    for connector in config.connectors:
        if connector.etrn is None:
            continue
        requester = Requester(plugin, config, connector)
        requester.start()
        out.append(requester)
    return out
