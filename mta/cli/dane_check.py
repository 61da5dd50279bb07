"""The DANE part of ``smtpgw dns-check DOMAIN``: the TLSA records of each MX host, whether the answers
were DNSSEC-validated (the AD bit from the DNS servers asked, which must validate), and what the
gateway would require of each host (RFC 7672), under the same rules as delivery
(:mod:`mta.delivery.dane`): the MX answer, the host's address answer and its TLSA answer must all be
validated; usable records (DANE-TA 2, DANE-EE 3) make TLS mandatory and the certificate must match
one; records that are all unusable (PKIX 0/1, unknown parameters) still make TLS mandatory, without
a certificate check (RFC 7672 2.2); a failed TLSA lookup keeps senders away from that host. An MX
host that is a CNAME has its TLSA records looked up at the expanded name first, then at its own
name (RFC 7672 2.2.2).

Blocking queries: a command may block.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import dns.flags

from mta.delivery.dane import DANE, FAILED, NONE, UNUSABLE, HostDane, classify, tlsa_name
from mta.smtp import replies as R
from mta.smtp.client.dane import TLSA

Query = Callable[[str, str], tuple[str, Any]]       # mta.cli.dns.Lookup.query


def _validated(kind: str, answer: Any) -> bool:
    return kind == "ok" and bool(answer.response.flags & dns.flags.AD)


@dataclass
class DaneReport:
    mx_validated: bool = False
    hosts: list[tuple[HostDane, str, str]] = field(default_factory=list)    # (host, why not looked up, requires)

    def to_dict(self) -> dict[str, Any]:
        return {"mx_validated": self.mx_validated, "hosts": [
            {"mx": h.mx_host, "tlsa_name": h.qname, "state": h.state, "validated": h.secure,
             "records": [str(r) for r in h.records], "not_looked_up": why,
             "error": h.reason.text if h.reason is not None else "", "requires": requires}
            for h, why, requires in self.hosts]}

    @property
    def dane_hosts(self) -> set[str]:
        return {h.mx_host for h, _, _ in self.hosts if h.state == DANE}


def check_dane(domain: str, query: Query, mx_hosts: list[str], implicit: bool, port: int = 25) -> DaneReport:
    """Each MX host's TLSA records and what they mean for delivery; ``implicit``: the domain has no
    MX record and is its own mail host (then its address answer is what must be validated)."""
    report = DaneReport()
    if implicit:
        report.mx_validated = True
    else:
        kind, answer = query(domain, "MX")
        report.mx_validated = _validated(kind, answer)
    for host in mx_hosts:
        if not report.mx_validated:
            state = HostDane(host, port)
            report.hosts.append((state, "the MX answer is not DNSSEC-validated", requirement(state)))
            continue
        kind, answer = query(host, "A")
        if kind != "ok":
            kind, answer = query(host, "AAAA")
        if not _validated(kind, answer):
            state = HostDane(host, port)
            report.hosts.append((state, "its address answer is not DNSSEC-validated", requirement(state)))
            continue
        expanded = answer.canonical_name.to_text(omit_final_dot=True).lower()
        cname = expanded != host.lower().rstrip(".")
        state = _tlsa(query, expanded, port, host) if cname else None
        if state is None or (state.state == NONE and not state.records):
            state = _tlsa(query, host, port, expanded if cname else "")
        if cname:
            state = replace(state, mx=host)
        report.hosts.append((state, "", requirement(state)))
    return report


def _tlsa(query: Query, name: str, port: int, also: str) -> HostDane:
    kind, answer = query(tlsa_name(name, port), "TLSA")
    if kind == "error":
        return HostDane(name, port, FAILED, reason=R.tls_check_failed(answer), also=also)
    if kind == "ok":
        return classify(name, port, (TLSA(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in answer),
                        _validated(kind, answer), also)
    return HostDane(name, port, also=also)


def requirement(host: HostDane) -> str:
    if host.state == DANE:
        return "DANE: STARTTLS with a certificate matching a TLSA record (takes precedence over MTA-STS)"
    if host.state == FAILED:
        return "NOT USED: the TLSA lookup failed (a temporary failure until it answers)"
    if host.state == UNUSABLE:
        return ("mandatory STARTTLS, certificate not checked: TLSA records present but none usable "
                "(PKIX usages 0/1 are not used for SMTP; RFC 7672 2.2)")
    if host.records:
        return "opportunistic STARTTLS: its TLSA records are not DNSSEC-validated"
    return "no DANE (no TLSA records)"


def format_dane(report: DaneReport) -> list[str]:
    lines = ["DANE (TLSA, RFC 7672): MX answer " + ("DNSSEC-validated" if report.mx_validated
                                                    else "NOT DNSSEC-validated: TLSA records are not used")]
    for host, why, requires in report.hosts:
        if why:
            lines.append(f"  {host.mx_host}: no TLSA lookup: {why}")
        elif host.mx:
            lines.append(f"  {host.mx} is a CNAME for {host.also if host.name == host.mx else host.name}: "
                         f"TLSA base domain {host.name}")
        elif host.state == FAILED:
            lines.append(f"  {host.qname} TLSA: lookup failed: {host.reason.text}")
        elif not host.records:
            lines.append(f"  {host.qname} TLSA: none")
        for record in host.records:
            validated = "DNSSEC-validated" if host.secure else "NOT validated"
            usable = "" if record.usable else ", unusable"
            lines.append(f"  {host.qname} TLSA {record} ({validated}{usable})")
        lines.append(f"  {host.mx_host}: {requires}")
    return lines


__all__ = ["DaneReport", "check_dane", "format_dane", "requirement"]
