"""DANE for SMTP (RFC 7672) on the delivery side: which next hops have TLSA records that make TLS
mandatory and say which certificate to expect.

For each hop whose DNS answers were all DNSSEC-validated (``Hop.dnssec``: the MX answer and the
host's address answer came with the AD bit from ``gateway.dns.nameservers``, which must be a
validating resolver the gateway trusts), the TLSA records of ``_<port>._tcp.<MX host>`` are looked up
through the gateway's resolver (a thread pool: the reactor never waits):

* a validated answer with usable records (DANE-EE 3 x x, DANE-TA 2 x x) -> ``dane``: STARTTLS is
  mandatory and the chain must match a record (:mod:`mta.smtp.client.dane`); no STARTTLS or no
  match is a temporary failure naming DANE (the mail waits and is retried);
* a validated answer with only unusable records (PKIX usages 0 and 1, unknown parameters) ->
  ``unusable``: delivery as without DANE (opportunistic);
* no records, or an answer without the AD bit -> ``none``: delivery as without DANE;
* the lookup fails (SERVFAIL -- what a validating resolver answers for a bogus signature --, a
  timeout) -> ``failed``: that MX host is not used this time (temporary), the others are tried.

DANE takes precedence over MTA-STS for a hop it covers (RFC 8461 2); :mod:`mta.delivery.tls_policy`
combines the two. The outcome of every DANE-governed session is named in one place,
:func:`outcome`, in RFC 8460's terms (policy type ``tlsa``), and handed to
:meth:`DaneLookup.record`: that is where TLS reporting counts it.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

from twisted.internet import defer
from twisted.logger import Logger

from mta.config import Connector
from mta.delivery.nexthops import DNSError, Resolver
from mta.model.nexthop import Hop
from mta.smtp import replies as R
from mta.smtp.client.dane import TLSA, usable
from mta.smtp.client.policy import OutboundPolicy
from mta.smtp.reply import Reply

log = Logger(namespace="smtpgw.dane")

NONE, UNUSABLE, DANE, FAILED = "none", "unusable", "dane", "failed"


@dataclass(frozen=True)
class HostDane:
    """What DANE says about one MX host on one port (the TLSA base domain ``name``)."""

    name: str
    port: int
    state: str = NONE                       # none | unusable | dane | failed
    records: tuple[TLSA, ...] = ()          # every record found (state dane: the usable ones first)
    secure: bool = False                    # the TLSA answer came with the AD bit
    reason: Reply | None = None             # state failed: why the host is not used

    @property
    def qname(self) -> str:
        return tlsa_name(self.name, self.port)

    @property
    def usable_records(self) -> tuple[TLSA, ...]:
        return usable(self.records)


def tlsa_name(host: str, port: int) -> str:
    return f"_{port}._tcp.{host.lower().rstrip('.')}"


def classify(name: str, port: int, records: Iterable[TLSA], secure: bool) -> HostDane:
    """The state of a host from its TLSA answer (RFC 7672 2.2): only a validated answer counts."""
    records = tuple(records)
    if not secure or not records:
        return HostDane(name, port, NONE, records, secure)
    return HostDane(name, port, DANE if usable(records) else UNUSABLE, records, secure)


def subject_to_dane(connector: Connector | None) -> bool:
    """Whether ``connector``'s hops are checked for TLSA records: ``outbound.dane`` (the default), and
    not ``tls: none`` (the site said no TLS). A smart-host connector with ``tls: verify`` keeps its
    own check; otherwise a smart host whose name and TLSA records are DNSSEC-validated gets DANE
    as an MX host would (as Postfix does for a relayhost at security level dane)."""
    if connector is None:
        return False
    out = connector.outbound
    if not out.dane or out.tls == "none":
        return False
    return not (connector.smart_hosts and out.tls == "verify")


def dane_policy(policy: OutboundPolicy, host: HostDane) -> OutboundPolicy:
    """The connector's client policy for a hop with usable TLSA records: TLS mandatory, checked
    against the records instead of a CA store; REQUIRETLS is satisfied by it (``tls: verify``)."""
    return replace(policy, tls="verify", ca_file=None, ca_with_system=False, validation="dane",
                   tlsa=host.usable_records, dane_name=host.name,
                   required_by=f"the DANE TLSA records of {host.qname}")


def _named(hop: Hop) -> bool:
    if not hop.name:
        return False
    try:
        ipaddress.ip_address(hop.name.strip("[]"))
        return False
    except ValueError:
        return True


@dataclass(frozen=True)
class Outcome:
    """One DANE-governed session as TLS reporting (RFC 8460) sees it."""

    policy_domain: str                      # the destination domain the mail was for
    mx_host: str
    policy_strings: tuple[str, ...]         # the TLSA records, presentation format
    result: str                             # success, or an RFC 8460 result type
    detail: str = ""

    policy_type = "tlsa"


def outcome(domain: str, host: HostDane, failure: Reply | None) -> Outcome | None:
    """The one place a DANE-governed session's outcome is decided: ``success`` when the session
    was established (``failure`` None); else the RFC 8460 result type of the reason the hop could
    not be used -- ``dnssec-invalid`` (the TLSA lookup failed), ``starttls-not-supported``,
    ``tlsa-invalid`` (the chain matched no record). None for a failure that is not about TLS (the
    host refused the connection): it is not counted."""
    strings = tuple(str(r) for r in host.records)
    if failure is None:
        return Outcome(domain, host.name, strings, "success")
    if host.state == FAILED:
        return Outcome(domain, host.name, strings, "dnssec-invalid", failure.text)
    if failure.status == "4.7.10":
        return Outcome(domain, host.name, strings, "starttls-not-supported", failure.text)
    if failure.status == "4.7.5":
        return Outcome(domain, host.name, strings, "tlsa-invalid", failure.text)
    return None


class DaneLookup:
    """One per gateway: the TLSA lookups for a delivery's hops, and where outcomes go."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        # TLS reporting's counter, when there is one: called with every Outcome
        self.observers: list[Callable[[Outcome], Any]] = []

    def hosts(self, hops: Iterable[Hop]) -> defer.Deferred:
        """Fires with ``{(name, port): HostDane}`` for the DNSSEC-secured, named hops among ``hops``
        (others are not looked up and are not in the result)."""
        wanted = list(dict.fromkeys((h.name.lower().rstrip("."), h.port) for h in hops if h.dnssec and _named(h)))
        return defer.Deferred.fromCoroutine(self._hosts(wanted))

    async def _hosts(self, wanted: list[tuple[str, int]]) -> dict[tuple[str, int], HostDane]:
        answers = await defer.DeferredList([self.resolver.tlsa(tlsa_name(n, p)) for n, p in wanted],
                                           consumeErrors=True)
        found: dict[tuple[str, int], HostDane] = {}
        for (name, port), (ok, result) in zip(wanted, answers):
            if ok:
                values, secure = result
                found[(name, port)] = classify(name, port, (TLSA(*v) for v in values), secure)
                continue
            why = result.value.reply.text if isinstance(result.value, DNSError) else repr(result.value)
            found[(name, port)] = HostDane(name, port, FAILED, reason=R.tls_check_failed(
                f"DANE: the TLSA lookup of {tlsa_name(name, port)} failed ({why}); {name} is not used "
                "until it answers"))
        return found

    def record(self, result: Outcome) -> None:
        """Every DANE-governed session's outcome comes here (TLS reporting counts them)."""
        if result.result != "success":
            log.info("DANE: {domain}: {mx}: {result}: {detail}", domain=result.policy_domain, mx=result.mx_host,
                     result=result.result, detail=result.detail)
        for observer in self.observers:
            observer(result)


__all__ = ["DANE", "DaneLookup", "FAILED", "HostDane", "NONE", "Outcome", "UNUSABLE", "classify", "dane_policy",
           "outcome", "subject_to_dane", "tlsa_name"]
