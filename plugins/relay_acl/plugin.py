"""The relay decision, made once per RCPT, and the connector restrictions checked at RCPT, at the
end of DATA and at delivery. Every decision is a ``relay decision`` diag event saying why."""
from __future__ import annotations

import functools
import ipaddress
from typing import Any

from twisted.logger import Logger

from mta.config import Config, Connector, RelayConfig
from mta.smtp.address import domain_of
from mta.plugin.hookspecs import hookimpl
from mta.smtp import replies as R
from mta.smtp.reply import Reply
from mta.delivery.connectors import connectors_for
from mta.model.netaddr import client_ip
from smtpgw_plugins.relay_acl import restrictions
from smtpgw_plugins.relay_acl.local_parts import local_part_refusal
from smtpgw_plugins.relay_acl.policy import Policy, session_policy
from smtpgw_plugins.relay_acl.restrictions import Facts, Refusal

log = Logger(namespace="smtpgw.relay_acl")

PRIORITY_KEY = "relay_acl.priority"     # envelope.extra -> queue entry extra: the priority seen at DATA
POLICY_KEY = "relay_acl.policy"         # session.extra: the relay settings the session started with

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=4096)
def _forms(ip: IPAddress) -> tuple[IPAddress, ...]:
    """An IPv4 client also matches a list entry written in IPv4-mapped form (``::ffff:192.0.2.0/120``)."""
    if isinstance(ip, ipaddress.IPv4Address):
        return ip, ipaddress.IPv6Address("::ffff:" + str(ip))
    return (ip,)


# peer address -> (the relay settings asked with, the reason it may relay by its address, or None):
# asked at the connection and at each RCPT, and matching and formatting the address are about twenty
# Python calls in ipaddress each time
_by_address: dict[str, tuple[RelayConfig, str | None]] = {}
MAX_REMEMBERED = 4096


def _address_reason(relay: RelayConfig, peer_host: str) -> str | None:
    known = _by_address.get(peer_host)
    if known is not None and known[0] is relay:
        return known[1]
    reason = None
    ip = client_ip(peer_host)
    if ip is not None:
        reason = next((f"client {ip} in relay.allow {net}" for net in relay.allow for form in _forms(ip)
                       if form.version == net.version and form in net), None)
    if len(_by_address) >= MAX_REMEMBERED:
        _by_address.clear()
    _by_address[peer_host] = (relay, reason)
    return reason


def relay_reason(relay: RelayConfig, peer_host: str, authenticated_user: str | None) -> str | None:
    """Why this client may relay, or None when it may not."""
    reason = _address_reason(relay, peer_host)
    if reason is not None:
        return reason
    if authenticated_user and relay.allow_authenticated:
        return f"authenticated as {authenticated_user}"
    return None


class RelayACL:
    def __init__(self) -> None:
        self.config: Config | None = None       # as loaded at start: local domains and routing
        self.services: Any = None
        self.policy: Policy | None = None       # relay and restriction settings; SIGHUP replaces it

    @hookimpl
    def smtpgw_configure(self, config: Config, services: Any) -> None:
        self.config = config
        self.services = services
        self.policy = Policy.of(config)

    # -- SIGHUP ---------------------------------------------------------------------------------

    @hookimpl
    def smtpgw_reload(self, config: Config) -> None:
        """New connections get the file's relay settings; sessions in progress keep theirs."""
        if self.config is None or self.policy is None:
            return
        policy, notes = self.policy.reloaded(self.config, config)
        changes = policy.describe_changes(self.policy)
        self.policy = policy
        for note in notes:
            log.warn("relay_acl: SIGHUP: {note}", note=note)
        for change in changes:
            log.info("relay_acl: SIGHUP: {change}", change=change)
        log.info("relay_acl: SIGHUP: relay settings reloaded ({count} change(s)); new connections use them",
                 count=len(changes))

    @hookimpl(tryfirst=True)
    def smtpgw_connect(self, session) -> None:
        """Pin the current settings to the session (``postfix reload``: a session ends as it began),
        and say on the session whether its address may relay (``session.relay_allowed``: the core
        trusts such a client's DSN requests)."""
        if self.policy is not None:
            session.extra[POLICY_KEY] = self.policy
            relay = self.policy.relay_for(session.virtual_server)
            session.relay_allowed = relay_reason(relay, session.peer_host, None) is not None
        return None

    def _policy(self, session: Any) -> Policy:
        return session_policy(session, POLICY_KEY, self.policy)

    # -- diagnostics ----------------------------------------------------------------------------

    def _decision(self, session: Any, recipient: str, decision: str, reason: str, **more: Any) -> None:
        if self.services is not None:
            self.services.hooks.event("smtp_protocol", "minimum", "relay decision", session=session.id,
                        recipient=recipient, decision=decision, reason=reason, **more)

    def _choose(self, domain: str, facts: Facts, policy: Policy) -> tuple[Connector | None, Refusal | None]:
        """Routing is the core's (the connectors loaded at start); restrictions are ``policy``'s."""
        candidates = [policy.connector(c) for c in connectors_for(self.config, domain)]
        return restrictions.choose(candidates, facts, policy.entries)

    # -- RCPT -----------------------------------------------------------------------------------

    @hookimpl
    def smtpgw_rcpt_to(self, session, envelope, recipient, params) -> Reply | None:
        if self.config is None:
            return None
        domain = domain_of(recipient)
        if self.config.is_local_domain(domain):
            refused = local_part_refusal(recipient)
            if refused is not None:
                self._decision(session, recipient, "deny", refused[1])
                return refused[0]
            self._decision(session, recipient, "accept", f"local domain {domain}")
            return None                 # the core accepts local domains (and a site hook may refine)
        policy = self._policy(session)
        relay = policy.relay_for(session.virtual_server)
        reason = relay_reason(relay, session.peer_host, session.authenticated_user)
        if reason is None:
            self._decision(session, recipient, "deny",
                           f"{domain} is not a local domain; client {session.peer_host} not in relay.allow "
                           f"and not authenticated" + ("" if relay.allow_authenticated
                                                       else " (relay.allow_authenticated is off)"))
            return R.RELAY_DENIED
        facts = Facts(envelope.sender, envelope.declared_size)
        connector, refusal = self._choose(domain, facts, policy)
        if refusal is not None:
            self._decision(session, recipient, "deny", f"{reason}; but {refusal.reason}")
            return refusal.reply
        via = f"; via connector {connector.name}" if connector is not None else "; no connector matches"
        self._decision(session, recipient, "accept", reason + via)
        return R.RECIPIENT_OK

    # -- end of DATA ----------------------------------------------------------------------------

    @hookimpl
    def smtpgw_data(self, session, envelope, message) -> Reply | None:
        if self.config is None:
            return None
        policy = self._policy(session)
        priority = None
        if policy.priorities_matter:
            priority = restrictions.priority_of(message.headers)
            envelope.extra[PRIORITY_KEY] = priority
        facts = Facts(envelope.sender, envelope.size, priority)
        refused: list[tuple[str, Refusal]] = []
        carried = 0
        by_domain: dict[str, Refusal | None] = {}      # the choice is per domain, whatever the recipients
        for recipient in envelope.recipients:
            domain = domain_of(recipient)
            if self.config.is_local_domain(domain):
                carried += 1
                continue
            if domain not in by_domain:
                by_domain[domain] = self._choose(domain, facts, policy)[1]
            refusal = by_domain[domain]
            if refusal is None:
                carried += 1
            else:
                refused.append((recipient, refusal))
        if not refused:
            return None
        if carried:
            for recipient, refusal in refused:
                self._decision(session, recipient, "dsn", f"{refusal.reason}; other recipients accepted, "
                                                          f"this one will get a DSN", envelope=envelope.id)
            return None
        for recipient, refusal in refused:
            self._decision(session, recipient, "deny", refusal.reason, envelope=envelope.id)
        if all(r.is_size for _, r in refused):
            return refused[0][1].reply
        return next(r.reply for _, r in refused if not r.is_size)

    # -- delivery -------------------------------------------------------------------------------

    @hookimpl(tryfirst=True)
    def smtpgw_delivery_window(self, connector, envelope) -> Reply | None:
        """A connector whose restrictions refuse the message is unusable for it: the deliverer fails
        over to the next connector, and when none is left the 5xx fails the recipients (a DSN)."""
        if self.config is None or self.policy is None or connector is None:
            return None
        extra = getattr(envelope, "extra", None) or {}
        facts = Facts(envelope.sender, envelope.size or None, extra.get(PRIORITY_KEY, restrictions.NORMAL))
        policy = self.policy                    # the newest: queued mail obeys today's restrictions
        refusal = restrictions.check(policy.connector(connector), facts, policy.entries.get(connector.name))
        if refusal is None:
            return None
        if self.services is not None:
            self.services.hooks.event("routing_engine", "minimum", "relay decision", id=envelope.id,
                        connector=connector.name, decision="skip connector", reason=refusal.reason)
        return refusal.reply
