"""The customer side: ask the ISP to send what it holds for us, per connector ``etrn`` section.

Each connector with an ``etrn`` section gets a :class:`Requester` that makes the request once the
gateway runs (the link is up when we start) and then on the section's ``schedule`` (``every 30m``,
or at each opening of a weekly grid). ``command: ATRN`` receives the mail on the same connection into
the gateway's normal inbound path (the SMTP server of the connector's first bridgehead); ETRN and site
commands make the ISP connect to us as usual.

A site whose link comes and goes can also run ``smtpgw etrn -c FILE --connector NAME`` from its
link-up script (mta/cli_etrn.py).
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mta.config import Config, Connector
from mta.etrn_client import DEFAULT_PORTS, DequeueError, DequeueRequest, request_dequeue
from mta.reply import Reply
from mta.router import source_address, usable_source
from mta.units import parse_smart_host

log = Logger(namespace="smtpgw.etrn_dequeue")


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
        allow_plaintext_auth=etrn.allow_plaintext_auth,
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
        self._timer: Any = None
        self._running: defer.Deferred | None = None

    def start(self) -> None:
        self._timer = self.reactor.callLater(0, self.fire)

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def fire(self) -> defer.Deferred:
        """Make the request now (unless one is still running) and plan the next one."""
        self._timer = None
        self._plan()
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

    async def _run(self) -> None:
        req = self.request
        label = f"{req.command} to {req.host}:{req.port} for {', '.join(req.domains)}"
        receiver = self._receiver() if req.command == "ATRN" else None
        try:
            results = await request_dequeue(self.reactor, req, receiver=receiver)
        except DequeueError as e:
            self.last = e.reply
            self.plugin.services.hooks.event("connection_manager", "minimum", f"{label}: {e.reply}",
                                             connector=self.connector.name)
            return
        except Exception:
            log.failure("{label} failed", label=label)
            return
        finally:
            self.runs += 1
        self.last = results
        for domain, reply in results:
            self.plugin.services.hooks.event("connection_manager", "minimum",
                                             f"{req.command} {domain} at {req.host}:{req.port}: {reply}",
                                             connector=self.connector.name)

    def _receiver(self) -> Any:
        """ATRN: the gateway's own SMTP server takes the connection (inbound path, relay rules, spool)."""
        from mta.server import SMTPServerFactory

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
