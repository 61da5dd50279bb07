"""The MTA-STS part of ``smtpgw dns-check DOMAIN``: the policy fetched live, and what the gateway would
require of each MX host under it.

A command may block, so this asks the DNS servers with the CLI's blocking lookups and fetches the
policy with :mod:`http.client` over :mod:`ssl`, under the same rules as delivery
(:mod:`mta.delivery.sts_fetch`): the policy host resolved through the gateway's DNS servers, its
certificate checked against the system store plus ``gateway.mta_sts.ca_file``, no redirects, at most
64 KB. Nothing is cached: the point is to see what the domain publishes now.
"""
from __future__ import annotations

import http.client
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any, Callable

from mta.delivery.sts_fetch import MAX_POLICY_BYTES, policy_url
from mta.delivery.sts_policy import Policy, PolicyError, parse_policy, policy_id

Query = Callable[[str, str], tuple[str, Any]]       # mta.cli.dns.Lookup.query


@dataclass
class StsReport:
    id: str | None = None           # the TXT record's id; None: no policy published
    txt: list[str] = field(default_factory=list)    # the v=STSv1 TXT records as published
    policy: Policy | None = None
    error: str = ""                 # why there is no usable policy although a TXT record says there is
    requirements: list[tuple[str, str]] = field(default_factory=list)     # (MX host, what is required)

    def to_dict(self) -> dict[str, Any]:
        policy = None if self.policy is None else {"mode": self.policy.mode, "max_age": self.policy.max_age,
                                                   "mx": list(self.policy.mx)}
        return {"id": self.id, "txt": self.txt, "policy": policy, "error": self.error,
                "requirements": [{"mx": h, "requires": r} for h, r in self.requirements]}


def check_mta_sts(domain: str, query: Query, mx_hosts: list[str], ca_file: str | None,
                  timeout: float = 20.0) -> StsReport:
    report = StsReport()
    kind, answer = query(f"_mta-sts.{domain}", "TXT")
    if kind == "error":
        report.error = answer
    elif kind == "ok":
        texts = [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
        report.txt = [t for t in texts if t.split(";", 1)[0].strip() == "v=STSv1"]
        try:
            report.id = policy_id(texts)
        except PolicyError as e:
            report.error = f"_mta-sts.{domain} TXT: {e}"
    if report.id is not None:
        try:
            report.policy = parse_policy(fetch(domain, query, ca_file, timeout), report.id)
        except (OSError, ssl.SSLError, http.client.HTTPException, PolicyError, ValueError) as e:
            report.error = f"{policy_url(domain)}: {e}"
    for host in mx_hosts:
        report.requirements.append((host, requirement(report.policy, host)))
    return report


def requirement(policy: Policy | None, host: str) -> str:
    if policy is None or policy.mode == "none":
        return "opportunistic STARTTLS (no MTA-STS policy in force)"
    if not policy.matches(host):
        return ("NOT USED: matches no mx of the policy (enforce)" if policy.mode == "enforce"
                else "used, but enforce would not use it (testing)")
    verified = f"STARTTLS with a certificate valid for {host}"
    return f"{verified} (enforce)" if policy.mode == "enforce" else f"opportunistic; {verified} reported if missing (testing)"


def fetch(domain: str, query: Query, ca_file: str | None, timeout: float) -> str:
    """The policy text, blocking; raises on any failure with the reason."""
    host = f"mta-sts.{domain}"
    addresses: list[str] = []
    for rdtype in ("A", "AAAA"):
        kind, answer = query(host, rdtype)
        if kind == "ok":
            addresses += [r.address for r in answer]
    if not addresses:
        raise OSError(f"{host} has no address")
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(ca_file)
    last: Exception | None = None
    for address in addresses:
        try:
            raw = socket.create_connection((address, 443), timeout=timeout)
        except OSError as e:
            last = e
            continue
        conn = http.client.HTTPSConnection(host, 443, timeout=timeout, context=context)
        conn.sock = context.wrap_socket(raw, server_hostname=host)
        try:
            conn.request("GET", "/.well-known/mta-sts.txt", headers={"Host": host, "User-Agent": "smtpgw MTA-STS"})
            response = conn.getresponse()
            if response.status != 200:
                moved = " (redirects are not followed)" if 300 <= response.status < 400 else ""
                raise OSError(f"HTTP {response.status}{moved}")
            kind = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
            if kind != "text/plain":
                raise OSError(f"content type {kind!r}, not text/plain")
            body = response.read(MAX_POLICY_BYTES + 1)
            if len(body) > MAX_POLICY_BYTES:
                raise OSError(f"policy larger than {MAX_POLICY_BYTES // 1024} KB")
            return body.decode("utf-8")
        finally:
            conn.close()
    raise OSError(f"cannot connect to {host}:443: {last}")


def format_sts(domain: str, report: StsReport) -> list[str]:
    if report.id is None and not report.error:
        lines = [f"MTA-STS: none published (no v=STSv1 TXT record at _mta-sts.{domain})"]
    elif report.policy is None:
        lines = [f"MTA-STS: TXT id {report.id or '-'}, but no usable policy: {report.error}"]
    else:
        p = report.policy
        lines = [f"MTA-STS: id {p.id}, mode {p.mode}, max_age {p.max_age}s, mx {' '.join(p.mx) or '-'}"]
    lines += [f"  _mta-sts.{domain} TXT \"{t}\"" + (f" (id {report.id})" if report.id else "") for t in report.txt]
    lines += [f"  {host}: {what}" for host, what in report.requirements]
    return lines


__all__ = ["StsReport", "check_mta_sts", "fetch", "format_sts", "requirement"]
