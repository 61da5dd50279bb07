"""DANE for SMTP (RFC 7672) on the delivery side: which next hops have TLSA records that make TLS
mandatory and say which certificate to expect.

For each hop whose DNS answers were all DNSSEC-validated (``Hop.dnssec``: the MX answer and the
host's address answer came with the AD bit from ``gateway.dns.nameservers``, which must be a
validating resolver the gateway trusts), the TLSA records of ``_<port>._tcp.<MX host>`` are looked up
through the gateway's resolver (a thread pool: the reactor never waits):

* a validated answer with usable records (DANE-EE 3 x x, DANE-TA 2 x x) -> ``dane``: STARTTLS is
  mandatory and the chain must match a record (:mod:`mta.smtp.client.dane`); no STARTTLS or no
  match is a temporary failure naming DANE (the mail waits and is retried);
* a validated answer whose records are all unusable (PKIX usages 0 and 1, unknown parameters,
  digests of the wrong length) -> ``unusable``: RFC 7672 2.2 and 3.1 still make TLS mandatory,
  without authentication (Postfix's ``encrypt``): no STARTTLS is a temporary failure, any
  certificate is accepted; each such session is logged and counted for TLS reporting as
  ``tlsa-invalid``;
* no records, or an answer without the AD bit -> ``none``: delivery as without DANE;
* the lookup fails (SERVFAIL -- what a validating resolver answers for a bogus signature --, a
  timeout) -> ``failed``: that MX host is not used this time (temporary), the others are tried.

A CNAME'd MX host (RFC 7672 2.2.2): when the validated address answer came through a CNAME chain
(``Hop.canonical``), the TLSA records are looked up at the expanded name first, and at the MX host
name only when the expanded name has none (a validated denial); the name they were found at is the
TLSA base domain (SNI, DANE-TA name checks), the other name is accepted in the certificate too.
An answer that is not validated has no ``dnssec`` hop, so no CNAME expansion is ever trusted
without DNSSEC.

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

    name: str                               # the TLSA base domain
    port: int
    state: str = NONE                       # none | unusable | dane | failed
    records: tuple[TLSA, ...] = ()          # every record found (state dane: the usable ones first)
    secure: bool = False                    # the TLSA answer came with the AD bit
    reason: Reply | None = None             # state failed: why the host is not used
    also: str = ""                          # a CNAME'd MX host: the other of its two names
    mx: str = ""                            # the MX host name, when not ``name`` (CNAME'd)

    @property
    def mx_host(self) -> str:
        return self.mx or self.name

    @property
    def qname(self) -> str:
        return tlsa_name(self.name, self.port)

    @property
    def usable_records(self) -> tuple[TLSA, ...]:
        return usable(self.records)


def tlsa_name(host: str, port: int) -> str:
    return f"_{port}._tcp.{host.lower().rstrip('.')}"


def classify(name: str, port: int, records: Iterable[TLSA], secure: bool, also: str = "") -> HostDane:
    """The state of a host from its TLSA answer (RFC 7672 2.2): only a validated answer counts."""
    records = tuple(records)
    if not secure or not records:
        return HostDane(name, port, NONE, records, secure, also=also)
    return HostDane(name, port, DANE if usable(records) else UNUSABLE, records, secure, also=also)


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
    if host.state == UNUSABLE:
        return encrypt_policy(policy, host)
    return replace(policy, tls="verify", ca_file=None, ca_with_system=False, validation="dane",
                   tlsa=host.usable_records, dane_name=host.name, dane_also=host.also,
                   required_by=f"the DANE TLSA records of {host.qname}")


def encrypt_policy(policy: OutboundPolicy, host: HostDane) -> OutboundPolicy:
    """A hop whose TLSA records are all unusable: TLS is still mandatory (RFC 7672 2.2, 3.1), but
    nothing can be authenticated (``tls: required``, Postfix's ``encrypt``); a connector already at
    ``required`` or ``verify`` keeps its own, stricter or equal, setting."""
    if policy.tls_mandatory:
        return policy
    return replace(policy, tls="required", required_by=f"the DANE TLSA records of {host.qname} "
                   "(present, none usable)")


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
    policy_strings: tuple[str, ...]         # the TLSA records, RFC 6698 2.3 presentation format
    result: str                             # success, or an RFC 8460 result type
    detail: str = ""

    policy_type = "tlsa"


def policy_strings(host: HostDane) -> tuple[str, ...]:
    """RFC 8460 4.4's ``policy-string`` of a DANE policy: each TLSA record of the RRset applied, in
    the presentation format of RFC 6698 2.3 (``_25._tcp.mx.example. IN TLSA 3 1 1 <hex>``), so the
    report says which name the records were found at (a CNAME'd MX host has two)."""
    return tuple(f"{host.qname}. IN TLSA {r.usage} {r.selector} {r.mtype} {r.data.hex().upper()}"
                 for r in host.records)


def outcome(domain: str, host: HostDane, failure: Reply | None) -> Outcome | None:
    """The one place a DANE-governed session's outcome is decided: ``success`` when the session
    was established (``failure`` None); else the RFC 8460 result type of the reason the hop could
    not be used -- ``dnssec-invalid`` (the TLSA lookup failed), ``starttls-not-supported``,
    ``tlsa-invalid`` (the chain matched no record, or no record was usable at all: then even a
    session over unauthenticated TLS is a failure of the DANE policy). None for a failure that is
    not about TLS (the host refused the connection): it is not counted."""
    strings = policy_strings(host)
    mx = host.mx_host
    if host.state == UNUSABLE:
        if failure is None:
            return Outcome(domain, mx, strings, "tlsa-invalid",
                           f"no usable TLSA record at {host.qname} (RFC 7672 3.1); sent over unauthenticated TLS")
        if failure.status == "4.7.10":
            return Outcome(domain, mx, strings, "starttls-not-supported", failure.text)
        if failure.status.startswith("4.7."):
            return Outcome(domain, mx, strings, "validation-failure", failure.text)
        return None
    if failure is None:
        return Outcome(domain, mx, strings, "success")
    if host.state == FAILED:
        return Outcome(domain, mx, strings, "dnssec-invalid", failure.text)
    if failure.status == "4.7.10":
        return Outcome(domain, mx, strings, "starttls-not-supported", failure.text)
    if failure.status == "4.7.5":
        return Outcome(domain, mx, strings, "tlsa-invalid", failure.text)
    return None


class DaneLookup:
    """One per gateway: the TLSA lookups for a delivery's hops, and where outcomes go."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        # TLS reporting's counter, when there is one: called with every Outcome
        self.observers: list[Callable[[Outcome], Any]] = []

    def hosts(self, hops: Iterable[Hop]) -> defer.Deferred:
        """Fires with ``{(name, port): HostDane}`` for the DNSSEC-secured, named hops among ``hops``
        (others are not looked up and are not in the result); ``name`` is the hop's MX host name,
        whatever name the records were found at."""
        wanted = list(dict.fromkeys((h.name.lower().rstrip("."), h.canonical.lower().rstrip("."), h.port)
                                    for h in hops if h.dnssec and _named(h)))
        if not wanted:      # nothing DNSSEC-secured to look up (a smart host, most MX hosts): no coroutine
            return defer.succeed({})
        return defer.Deferred.fromCoroutine(self._hosts(wanted))

    async def _hosts(self, wanted: list[tuple[str, str, int]]) -> dict[tuple[str, int], HostDane]:
        found = await defer.DeferredList([defer.Deferred.fromCoroutine(self._host(*w)) for w in wanted])
        return {(name, port): host for (name, _, port), (_, host) in zip(wanted, found)}

    async def _host(self, name: str, canonical: str, port: int) -> HostDane:
        """One host's DANE state; a CNAME'd one at its expanded name first (RFC 7672 2.2.2)."""
        if canonical and canonical != name:
            first = await self._lookup(canonical, port, also=name)
            if first.state != NONE or not first.secure:     # found, failed, or not validated
                return replace(first, mx=name)
            return replace(await self._lookup(name, port, also=canonical), mx=name)
        return await self._lookup(name, port)

    async def _lookup(self, name: str, port: int, also: str = "") -> HostDane:
        try:
            values, secure = await self.resolver.tlsa(tlsa_name(name, port))
        except Exception as e:              # noqa: BLE001 - any failure makes the host unusable now
            why = e.reply.text if isinstance(e, DNSError) else repr(e)
            return HostDane(name, port, FAILED, also=also, reason=R.tls_check_failed(
                f"DANE: the TLSA lookup of {tlsa_name(name, port)} failed ({why}); {also or name} is not "
                "used until it answers"))
        return classify(name, port, (TLSA(*v) for v in values), secure, also)

    def record(self, result: Outcome) -> None:
        """Every DANE-governed session's outcome comes here (TLS reporting counts them)."""
        if result.result != "success":
            log.info("DANE: {domain}: {mx}: {result}: {detail}", domain=result.policy_domain, mx=result.mx_host,
                     result=result.result, detail=result.detail)
        for observer in self.observers:
            observer(result)


__all__ = ["DANE", "DaneLookup", "FAILED", "HostDane", "NONE", "Outcome", "UNUSABLE", "classify", "dane_policy",
           "encrypt_policy", "outcome", "policy_strings", "subject_to_dane", "tlsa_name"]
