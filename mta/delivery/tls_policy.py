"""What TLS a delivery to a destination must have: the destination's published policy on top of the
connector's own ``outbound.tls``.

For MX delivery through a connector with ``outbound.mta_sts: true`` (the default), the domain's
MTA-STS policy (:mod:`mta.delivery.mta_sts`) decides:

* ``enforce``: only MX hosts matching an ``mx:`` pattern are tried, each with TLS mandatory and its
  certificate verified for the MX name (chain: ``gateway.mta_sts.ca_file`` plus the system store).
  No matching MX, no STARTTLS or a bad certificate is a temporary failure naming MTA-STS: the mail
  waits and retries, as for any unusable hop.
* ``testing``: delivery goes on as before; what enforce would have refused is logged
  (``MTA-STS testing: ...``), and a hop whose TLS would fail is tried again as the connector says.
* ``none`` or no policy: the connector's settings alone.

DANE (RFC 7672, :mod:`mta.delivery.dane`) comes first for the hops it covers: a hop whose MX host
has usable, DNSSEC-validated TLSA records is tried with TLS mandatory and its chain matched against
them, whatever the MTA-STS policy says of that host (RFC 8461 2: DANE takes precedence), and never
falls back in testing mode; a hop whose TLSA lookup failed is not tried (a temporary failure). A
hop whose validated TLSA records are all unusable gets mandatory TLS without authentication
(RFC 7672 2.2, 3.1; ``tls: required``), unless an enforced MTA-STS policy or the connector's
``tls: verify`` already asks more of it.

Under ``enforce`` and ``testing`` every transaction is counted for TLS reporting (RFC 8460,
:mod:`mta.delivery.tls_report`): a success, or the failure's result type, and an MX the policy leaves
out as a ``validation-failure`` when no MX is left to try; DANE's sessions reach TLS reporting
through :meth:`mta.delivery.dane.DaneLookup.record`.

A message sent with REQUIRETLS (RFC 8689, :mod:`mta.smtp.client.requiretls`) needs validated TLS:
a testing policy counts as enforce, DANE-validated hops are enough (the others are not tried), and
with no validation at all it bounces (5.7.10). One with ``TLS-Required: No`` (and no REQUIRETLS) is
delivered as if the destination published no policy and no TLSA records (RFC 8689 5).

Smart-host connectors are not subject: the smart host is the site's own choice, not the
destination's MX. A connector's ``tls: verify`` is already stricter than any published policy
regarding certificates; MTA-STS then only narrows the MX hosts.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from twisted.logger import Logger

from mta.config import Connector
from mta.model.nexthop import Hop, HostUnusable
from mta.smtp.client.policy import OutboundPolicy
from mta.smtp import replies as R
from mta.smtp.client import requiretls as requiretls_out
from mta.smtp.reply import Reply
from mta.delivery.sts_policy import Policy
from mta.delivery import dane as dane_
from mta.delivery.dane import HostDane
from mta.delivery.tls_report import SUCCESS

log = Logger(namespace="smtpgw.mta-sts")

REQUIRED_BY = "the destination's MTA-STS policy"


@dataclass
class Route:
    """The hops to try for one domain through one connector, and the client policy for each."""

    hops: list[Hop]
    policy: OutboundPolicy                          # for every hop
    fallback: OutboundPolicy | None = None          # testing mode: retry a TLS failure with this
    refusal: Reply | None = None                    # set when no hop may be tried at all
    domain: str = ""
    sts: Policy | None = None
    skipped: list[Hop] = field(default_factory=list)
    requiretls: bool = False                        # the message asked for REQUIRETLS (RFC 8689)
    dane: dict[Hop, HostDane] = field(default_factory=dict)     # hops DANE governs (usable, failed,
                                                                # or unusable records: encrypt)
    dane_policies: dict[Hop, OutboundPolicy] = field(default_factory=dict)
    record: Any = None                              # DaneLookup.record: where DANE outcomes go
    sessions: Any = None                            # a TlsReportCounter: TLS-RPT counts (mta.delivery.tls_report)

    @property
    def tls(self) -> str:
        """What the route guarantees, for logs: ``mta-sts`` when the policy enforces it."""
        if self.sts is not None and self.sts.mode == "enforce" and self.fallback is None:
            return "mta-sts"
        return ""

    async def send(self, client: Any, hop: Hop, sender: str, recipients: list[str], data: Any,
                   **options: Any) -> Any:
        """``client.send`` under this route's policy; in testing mode a TLS failure is reported and
        the hop tried again under the connector's own settings. A hop DANE governs is sent to under
        its TLSA records, with no fallback, and the outcome recorded."""
        host = self.dane.get(hop)
        if host is not None:
            return await self._send_dane(client, hop, host, sender, recipients, data, **options)
        try:
            answers = await _sender(client)(hop, sender, recipients, data, policy=self.policy, **options)
        except HostUnusable as e:
            if e.tls_failure:
                self._count(hop, e.tls_failure, options.get("source_address"), e.reply.text)
            if self.fallback is None or not e.reply.status.startswith("4.7."):
                raise
            log.warn("MTA-STS testing: {domain}: enforce would refuse {hop}: {why}",
                     domain=self.domain, hop=str(hop), why=e.reply.text)
        else:
            self._count(hop, SUCCESS, options.get("source_address"))
            return answers
        return await _sender(client)(hop, sender, recipients, data, policy=self.fallback, **options)

    def _count(self, hop: Hop, result: str, source: str | None = None, why: str | None = None) -> None:
        """One session under the destination's MTA-STS policy, for TLS reporting (RFC 8460)."""
        if self.sessions is None or self.sts is None or self.sts.mode == "none":
            return
        self.sessions.record(self.domain, "sts", sts_policy_string(self.sts), hop.name or hop.host,
                             SUCCESS if result == SUCCESS else "failure",
                             None if result == SUCCESS else result, sending_ip=source,
                             receiving_ip=hop.host if hop.name else None, additional_information=why)

    def count_refusal(self) -> None:
        """No MX host the policy allows: one failed session per MX host left out."""
        if self.refusal is None or self.sts is None or self.sessions is None:
            return
        for hop in self.skipped:
            self.sessions.record(self.domain, "sts", sts_policy_string(self.sts), hop.name or hop.host,
                                 "failure", "validation-failure", receiving_ip=hop.host if hop.name else None,
                                 additional_information="MX host not listed in the MTA-STS policy")


    async def _send_dane(self, client: Any, hop: Hop, host: HostDane, sender: str, recipients: list[str],
                         data: Any, **options: Any) -> Any:
        if host.reason is not None:             # the TLSA lookup failed
            self._record(host, host.reason)
            raise HostUnusable(host.reason)
        try:
            answers = await _sender(client)(hop, sender, recipients, data, policy=self.dane_policies[hop], **options)
        except HostUnusable as e:
            self._record(host, e.reply)
            raise
        self._record(host, None)
        return answers

    def _record(self, host: HostDane, failure: Reply | None) -> None:
        result = dane_.outcome(self.domain, host, failure)
        if result is not None and self.record is not None:
            self.record(result)


def sts_policy_string(policy: Policy) -> list[str]:
    """RFC 8460's ``policy-string`` of an MTA-STS policy: its lines as published."""
    return policy.report_strings()


def subject_to_sts(connector: Connector | None) -> bool:
    """MX delivery through a connector that honours MTA-STS (smart hosts are the site's own)."""
    return connector is not None and connector.outbound.mta_sts and not connector.smart_hosts


def sts_policy(policy: OutboundPolicy, ca_file: str | None) -> OutboundPolicy:
    """The connector's client policy raised to verified TLS for the destination's MTA-STS policy."""
    if policy.tls == "verify":          # the connector's own CAs and check already apply
        return replace(policy, required_by=REQUIRED_BY, validation="mta-sts")
    return replace(policy, tls="verify", ca_file=ca_file, ca_with_system=True, required_by=REQUIRED_BY,
                   validation="mta-sts")


def plan(domain: str, hops: list[Hop], policy: OutboundPolicy, sts: Policy | None,
         ca_file: str | None, requiretls: bool = False,
         dane: dict[tuple[str, int], HostDane] | None = None) -> Route:
    """The route for ``domain`` given its MTA-STS policy in force (None: none) and the DANE state of
    its MX hosts (``{(name, port): HostDane}`` from :class:`mta.delivery.dane.DaneLookup`).

    ``requiretls``: the message must travel over validated TLS only (RFC 8689): a policy in testing
    mode counts as enforce (RFC 8689 4.2.1); without a connector ``tls: verify`` or an enforced
    policy only DANE hops are tried, and with none of those the route is refused for good (5.7.10)."""
    if requiretls and sts is not None and sts.mode == "testing":
        sts = replace(sts, mode="enforce")
    governed = _dane_hops(hops, dane or {})
    route = _plan(domain, hops, policy, sts, ca_file, governed)
    route.requiretls = requiretls
    route.dane = {h: governed[h] for h in route.hops if h in governed}
    if route.policy.tls != "verify" or route.fallback is not None:
        # RFC 7672 2.2: records present but none usable still make TLS mandatory (unauthenticated)
        route.dane.update(_unusable_hops(route.hops, dane or {}))
    route.dane_policies = {h: dane_.dane_policy(policy, d) for h, d in route.dane.items()
                           if d.state in (dane_.DANE, dane_.UNUSABLE)}
    if requiretls and route.refusal is None and route.policy.tls != "verify":
        route.hops = [h for h in route.hops if h in route.dane and route.dane[h].state != dane_.UNUSABLE]
        if not route.hops:
            route.refusal = requiretls_out.no_validated_tls(domain, policy.connector)
    return route


def _dane_hops(hops: list[Hop], dane: dict[tuple[str, int], HostDane],
               states: tuple[str, ...] = (dane_.DANE, dane_.FAILED)) -> dict[Hop, HostDane]:
    """The hops DANE governs: their MX host has usable TLSA records, or its TLSA lookup failed."""
    governed = {}
    for hop in hops:
        host = dane.get(((hop.name or hop.host).lower().rstrip("."), hop.port))
        if host is not None and host.state in states:
            governed[hop] = host
    return governed


def _unusable_hops(hops: list[Hop], dane: dict[tuple[str, int], HostDane]) -> dict[Hop, HostDane]:
    """The hops whose MX host has validated TLSA records, none of them usable."""
    return _dane_hops(hops, dane, (dane_.UNUSABLE,))


def _plan(domain: str, hops: list[Hop], policy: OutboundPolicy, sts: Policy | None,
          ca_file: str | None, governed: dict[Hop, HostDane]) -> Route:
    if sts is None or sts.mode == "none":
        return Route(list(hops), policy, domain=domain)
    # a hop with TLSA records is DANE's, whether the policy lists it or not (RFC 8461 2)
    allowed = [h for h in hops if sts.matches(h.name or h.host) or h in governed]
    skipped = [h for h in hops if h not in allowed]
    names = ", ".join(dict.fromkeys(h.name or h.host for h in skipped))
    if sts.mode == "testing":
        if skipped:
            log.warn("MTA-STS testing: {domain}: enforce would not use {names} (policy mx: {mx})",
                     domain=domain, names=names, mx=" ".join(sts.mx))
        return Route(list(hops), sts_policy(policy, ca_file), fallback=policy, domain=domain, sts=sts)
    route = Route(allowed, sts_policy(policy, ca_file), domain=domain, sts=sts, skipped=skipped)
    if not allowed:
        route.refusal = R.tls_check_failed(f"MTA-STS policy of {domain} (id {sts.id}, enforce) allows "
                                           f"no MX host: {names} match none of {' '.join(sts.mx)}")
    elif skipped:
        log.info("MTA-STS: {domain}: not using {names}: no match in the policy's mx", domain=domain,
                 names=names)
    return route


def _sender(client: Any) -> Any:
    """The client's ``send_async`` when its class defines one (the pool: a coroutine, awaited
    without a Deferred), else its ``send`` (a Deferred). Looked up on the class, not the instance:
    a plugin's wrapper that overrides ``send`` and hands everything else to the pool through
    ``__getattr__`` (etrn_dequeue's routing of ATRN hops) must get its own ``send`` called."""
    return client.send_async if getattr(type(client), "send_async", None) is not None else client.send


__all__ = ["REQUIRED_BY", "Route", "plan", "sts_policy", "sts_policy_string", "subject_to_sts"]
