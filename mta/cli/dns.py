"""``smtpgw dns-check DOMAIN``: what the seed's "How to Check DNS Records" does with nslookup, asked of
the DNS servers the gateway itself uses (``gateway.dns.nameservers``, else the system resolver).

    smtpgw dns-check -c etc/gateway.yaml example.com
    smtpgw dns-check --server 192.0.2.53 example.com --json

It prints the MX records by preference, the A/AAAA addresses of each MX host and the reverse (PTR)
name of each address, the MTA-STS policy (:mod:`mta.cli.sts_check`: the ``_mta-sts`` TXT record and
its id, the policy fetched live) and each MX host's TLSA records with whether they were
DNSSEC-validated (:mod:`mta.cli.dane_check`), each with what the gateway would require of the host,
the ``_smtp._tls`` TLS-RPT record and where reports would go (:mod:`mta.cli.tlsrpt_check`), then a
WARN line for each problem found:

* breaking (mail to the domain cannot be delivered): the domain does not exist, no MX and no
  address, a null MX (RFC 7505), every MX host unusable (an IP address written as the MX name, or a
  host with no address), DNS not answering;
* not breaking, but worth fixing: no MX (senders fall back to the A record), an MX host that is an
  alias (CNAME, refused by RFC 2181 10.3 and some senders), some MX hosts unusable, an address with no
  PTR or whose PTR name does not resolve back to it (receivers refuse mail from such hosts).

Exit status: 0 when mail to the domain can be delivered (warnings or not; ``--strict`` makes any
warning fail), 1 when it cannot, 2 on a usage error.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.resolver
import dns.reversename

from mta.cli.dane_check import DaneReport, check_dane, format_dane
from mta.cli.dkim import check_published
from mta.cli.sts_check import StsReport, check_mta_sts, format_sts
from mta.cli.tlsrpt_check import check_tls_rpt, format_tls_rpt
from mta.cli.main import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, add_config_option, command, load_config
from mta.config.values import parse_domain, parse_hostport
from mta.delivery.nexthops import dns_resolver
from mta.config import ConfigError


@dataclass
class Address:
    type: str                               # A | AAAA
    address: str
    ptr: list[str] = field(default_factory=list)
    ptr_confirmed: bool = False             # a PTR name resolves back to this address (FCrDNS)
    ptr_error: str | None = None


@dataclass
class MXHost:
    preference: int
    host: str
    cname: str | None = None                # the MX name is an alias for this
    addresses: list[Address] = field(default_factory=list)
    usable: bool = False


@dataclass
class Warning_:
    text: str
    breaks: bool                            # mail to the domain cannot be delivered


@dataclass
class Report:
    domain: str
    nameservers: list[str]
    mx: list[MXHost] = field(default_factory=list)
    implicit_mx: bool = False
    null_mx: bool = False
    warnings: list[Warning_] = field(default_factory=list)

    @property
    def deliverable(self) -> bool:
        return not any(w.breaks for w in self.warnings)

    def warn(self, text: str, breaks: bool = False) -> None:
        self.warnings.append(Warning_(text, breaks))

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["deliverable"] = self.deliverable
        return doc


class Lookup:
    """Blocking dnspython queries (a CLI may block), errors sorted into kinds."""

    def __init__(self, nameservers: Sequence[tuple[str, int]], timeout: float) -> None:
        self.resolver = dns_resolver(nameservers, timeout)
        self.resolver.flags = dns.flags.RD | dns.flags.AD       # the AD bit tells DNSSEC-validated (DANE)

    def query(self, name: str | dns.name.Name, rdtype: str) -> tuple[str, Any]:
        """``("ok", answer)``, ``("nxdomain", None)``, ``("nodata", None)`` or ``("error", text)``."""
        try:
            qname = name if isinstance(name, dns.name.Name) else dns.name.from_text(name)
            return "ok", self.resolver.resolve(qname, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            return "nxdomain", None
        except dns.resolver.NoAnswer:
            return "nodata", None
        except dns.resolver.LifetimeTimeout:
            return "error", f"{name} {rdtype}: no answer (timed out)"
        except dns.resolver.NoNameservers:
            return "error", f"{name} {rdtype}: no name server answered (SERVFAIL or refused)"
        except (dns.exception.DNSException, ValueError) as e:
            return "error", f"{name} {rdtype}: {e.__class__.__name__}: {e}"


def _text(name: Any) -> str:
    return name.to_text(omit_final_dot=True).lower() if hasattr(name, "to_text") else str(name).lower()


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _addresses(lookup: Lookup, report: Report, host: str) -> tuple[list[Address], list[str]]:
    found: list[Address] = []
    errors: list[str] = []
    for rdtype in ("A", "AAAA"):
        kind, answer = lookup.query(host, rdtype)
        if kind == "ok":
            found += [Address(rdtype, r.address) for r in answer]
        elif kind == "error":
            errors.append(answer)
    for a in found:
        _check_ptr(lookup, a)
    return found, errors


def _check_ptr(lookup: Lookup, a: Address) -> None:
    kind, answer = lookup.query(dns.reversename.from_address(a.address), "PTR")
    if kind == "error":
        a.ptr_error = answer
        return
    if kind != "ok":
        return
    a.ptr = sorted({_text(r.target) for r in answer})
    for name in a.ptr:
        k, forward = lookup.query(name, a.type)
        if k == "ok" and any(ipaddress.ip_address(r.address) == ipaddress.ip_address(a.address) for r in forward):
            a.ptr_confirmed = True
            return


def check_domain(domain: str, lookup: Lookup, nameservers: list[str]) -> Report:
    """Every check, as a :class:`Report` (no printing)."""
    report = Report(domain, nameservers)
    kind, answer = lookup.query(domain, "MX")
    if kind == "error":
        report.warn(f"DNS lookup failed: {answer}; nothing can be said about {domain}", breaks=True)
        return report
    if kind == "nxdomain":
        report.warn(f"{domain} does not exist (NXDOMAIN): no MX and no A record; mail to it bounces", breaks=True)
        return report
    if kind == "nodata":
        addresses, errors = _addresses(lookup, report, domain)
        host = MXHost(0, domain, addresses=addresses, usable=bool(addresses))
        report.implicit_mx = True
        if addresses:
            report.mx.append(host)
            report.warn(f"{domain} has no MX record: senders fall back to its own address (implicit MX, "
                        f"RFC 5321 5.1); publish an MX record naming the mail host")
        elif errors:
            report.warn(f"{domain} has no MX record, and its address lookup failed: {'; '.join(errors)}",
                        breaks=True)
        else:
            report.warn(f"{domain} has no MX and no A/AAAA record: mail to it cannot be delivered", breaks=True)
        _ptr_warnings(report)
        return report

    records = sorted(((r.preference, _text(r.exchange)) for r in answer), key=lambda r: (r[0], r[1]))
    real = [(p, h) for p, h in records if h not in ("", ".")]
    if len(real) < len(records):
        report.null_mx = True
        if not real:
            report.warn(f"{domain} publishes a null MX (MX 0 ., RFC 7505): it accepts no mail", breaks=True)
            return report
        report.warn(f"{domain} mixes a null MX with other MX records (RFC 7505 says it must be alone); "
                    "senders may treat the domain as taking no mail")
    for pref, name in real:
        host = MXHost(pref, name)
        report.mx.append(host)
        if _is_ip(name):
            report.warn(f"MX {pref} {name} is an IP address, not a host name: senders look it up as a name "
                        "and find nothing; publish an A record for a name and point the MX at that name")
            continue
        kind, cname = lookup.query(name, "CNAME")
        if kind == "ok":
            host.cname = _text(cname[0].target)
            report.warn(f"MX {pref} {name} is an alias (CNAME for {host.cname}); RFC 2181 10.3 requires the MX "
                        "to name the host itself, and some senders refuse it")
        host.addresses, errors = _addresses(lookup, report, name)
        host.usable = bool(host.addresses)
        if not host.usable:
            why = "; ".join(errors) if errors else "it has no A or AAAA record"
            report.warn(f"MX {pref} {name} cannot be reached: {why}")
    if not any(h.usable for h in report.mx):
        report.warn(f"no MX host of {domain} has an address: mail to it cannot be delivered", breaks=True)
    _ptr_warnings(report)
    return report


def _ptr_warnings(report: Report) -> None:
    for host in report.mx:
        for a in host.addresses:
            where = f"{a.address} ({host.host})"
            if a.ptr_error:
                report.warn(f"{where}: reverse lookup failed: {a.ptr_error}")
            elif not a.ptr:
                report.warn(f"{where} has no PTR record: many receivers refuse mail from an address without "
                            "a reverse name; ask whoever owns the address block for one")
            elif not a.ptr_confirmed:
                report.warn(f"{where}: PTR mismatch: its PTR names {', '.join(a.ptr)}, which does not resolve "
                            f"back to {a.address}; receivers that check forward-confirmed reverse DNS refuse its mail")
            elif not _ptr_matches(host, a):
                report.warn(f"{where}: PTR mismatch: its PTR names {', '.join(a.ptr)}, not {host.host}; make "
                            "them agree (and the host's HELO name too), or receivers may flag its mail")


def _ptr_matches(host: MXHost, a: Address) -> bool:
    return host.host in a.ptr or (host.cname is not None and host.cname in a.ptr)


def format_report(report: Report) -> list[str]:
    servers = ", ".join(report.nameservers) or "system resolver"
    lines = [f"dns-check {report.domain} (DNS servers: {servers})"]
    if report.implicit_mx:
        lines.append("MX records: none (implicit MX: the domain's own address)")
    elif report.mx or report.null_mx:
        lines.append("MX records (by preference):")
    for h in report.mx:
        alias = f"  (CNAME for {h.cname})" if h.cname else ""
        lines.append(f"  {h.preference:>5}  {h.host}{alias}")
        if not h.addresses:
            lines.append("         (no address)")
        for a in h.addresses:
            if a.ptr_error:
                ptr = "PTR lookup failed"
            elif not a.ptr:
                ptr = "no PTR"
            else:
                ptr = "PTR " + ", ".join(a.ptr)
                if a.ptr_confirmed:
                    ptr += " (matches)" if _ptr_matches(h, a) else " (MISMATCH: resolves back, other name)"
                else:
                    ptr += " (MISMATCH)"
            lines.append(f"         {a.type:<4}  {a.address:<39}  {ptr}")
    if report.null_mx:
        lines.append("      0  .  (null MX)")
    for w in report.warnings:
        lines.append(f"WARN: {w.text}")
    n = len(report.warnings)
    count = f" ({n} warning{'s' if n != 1 else ''})" if n else ""
    if report.deliverable:
        lines.append(f"RESULT: mail to {report.domain} can be delivered{count}")
    else:
        lines.append(f"RESULT: mail to {report.domain} can NOT be delivered{count}")
    return lines


def _arguments(parser: argparse.ArgumentParser) -> None:
    add_config_option(parser)
    parser.add_argument("domain", metavar="DOMAIN", nargs="?", help="the mail domain to check (example.com)")
    parser.add_argument("--dkim", metavar="DOMAIN:SELECTOR", action="append",
                        help="compare the published DKIM record with plugins.dkim_sign's key (repeatable)")
    parser.add_argument("--server", metavar="IP[:PORT]", action="append",
                        help="ask this DNS server instead of gateway.dns.nameservers (repeatable; "
                             "no configuration file is needed then)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per lookup (default: gateway.dns.timeout)")
    parser.add_argument("--ca-file", metavar="PEM", default=None,
                        help="CAs trusted for the MTA-STS policy host besides the system store "
                             "(default: gateway.mta_sts.ca_file)")
    parser.add_argument("--strict", action="store_true", help="exit 1 on any warning, not only on breaking ones")
    parser.add_argument("--json", action="store_true", help="print JSON (for scripts)")


@command("dns-check", "check a domain's MX, A/AAAA and PTR records, its MTA-STS policy and its MX hosts' "
                      "TLSA records (DANE) with the gateway's DNS servers", _arguments)
def dns_check(args: argparse.Namespace) -> int:
    if args.dkim:
        return dkim_check(args)
    if args.domain is None:
        print("smtpgw dns-check: name a DOMAIN, or --dkim DOMAIN:SELECTOR", file=sys.stderr)
        return EXIT_USAGE
    try:
        domain = parse_domain(args.domain, "DOMAIN")
    except ConfigError:
        domain = ""
    if not domain or _is_ip(domain):
        print(f"smtpgw dns-check: {args.domain!r} is not a domain name", file=sys.stderr)
        return EXIT_USAGE
    config = None if args.server else load_config(args)
    servers = _servers(args, config)
    if servers is None:
        return EXIT_USAGE
    if args.timeout is not None:
        timeout = args.timeout
    else:
        timeout = config.gateway.dns.timeout if config is not None else 5.0
    shown = [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip, port in servers]
    lookup = Lookup(servers, timeout)
    report = check_domain(domain, lookup, shown)
    ca_file = args.ca_file or (config.gateway.mta_sts.ca_file if config is not None else None)
    sts = check_mta_sts(domain, lookup.query, [h.host for h in report.mx if h.usable], ca_file, timeout=max(timeout, 10.0))
    usable = [h.host for h in report.mx if h.usable]
    dane = check_dane(domain, lookup.query, usable, report.implicit_mx)
    for i, (host, what) in enumerate(sts.requirements):        # DANE takes precedence (RFC 8461 2)
        if host in dane.dane_hosts:
            sts.requirements[i] = (host, "DANE applies instead (TLSA records below)")
    tls_rpt = check_tls_rpt(domain, lookup.query)
    _sts_warnings(report, sts, dane)
    _dane_warnings(report, dane)
    if tls_rpt.error:
        report.warn(f"{tls_rpt.name}: {tls_rpt.error}: senders send this domain no TLS reports")
    if args.json:
        print(json.dumps({**report.to_dict(), "mta_sts": sts.to_dict(), "dane": dane.to_dict(),
                          "tls_rpt": tls_rpt.to_dict()}, indent=2))
    else:
        lines = format_report(report)
        at = next((i for i, line in enumerate(lines) if line.startswith(("WARN:", "RESULT:"))), len(lines))
        print("\n".join(lines[:at] + format_sts(domain, sts) + format_dane(dane) + format_tls_rpt(tls_rpt)
                        + lines[at:]))
    if not report.deliverable or (args.strict and report.warnings):
        return EXIT_FAILURE
    return EXIT_OK


def _sts_warnings(report: Report, sts: StsReport, dane: DaneReport) -> None:
    """What the MTA-STS check found that an admin should act on."""
    if sts.id is not None and sts.policy is None:
        report.warn(f"_mta-sts.{report.domain} announces a policy (id {sts.id}) that cannot be used: {sts.error}; "
                    "senders keep a policy they cached, others deliver without one")
    elif sts.policy is not None and sts.policy.mode == "enforce" and report.mx and \
            not any(sts.policy.matches(h.host) or h.host in dane.dane_hosts for h in report.mx if h.usable):
        report.warn(f"the MTA-STS policy of {report.domain} (enforce) matches no usable MX host: senders that "
                    "honour it hold the mail", breaks=True)


def _dane_warnings(report: Report, dane: DaneReport) -> None:
    failed = [h.mx_host for h, _, _ in dane.hosts if h.state == "failed"]
    if failed:
        report.warn(f"the TLSA lookup failed for {', '.join(failed)}: senders using DANE do not deliver to "
                    "it until the answer validates (check the zone's DNSSEC signatures)",
                    breaks=len(failed) == len(dane.hosts))


def _servers(args: argparse.Namespace, config: Any) -> list[tuple[str, int]] | None:
    """``--server`` (repeatable) or else the configuration's ``gateway.dns.nameservers``; None (said on
    stderr) for a --server that is not IP[:PORT]."""
    if not args.server:
        return list(config.gateway.dns.nameservers)
    try:
        return [parse_hostport(s, "--server", default_port=53) for s in args.server]
    except ConfigError as e:
        print(f"smtpgw dns-check: {e}", file=sys.stderr)
        return None


def dkim_check(args: argparse.Namespace) -> int:
    """``--dkim D:S``: the configuration names the key; its DNS servers (or ``--server``) are asked."""
    config = load_config(args)
    servers = _servers(args, config)
    if servers is None:
        return EXIT_USAGE
    lookup = Lookup(servers, args.timeout if args.timeout is not None else config.gateway.dns.timeout)
    lines, ok = check_published(config, args.dkim, lambda name: lookup.query(name, "TXT"))
    print("\n".join(lines))
    return EXIT_OK if ok else EXIT_FAILURE
