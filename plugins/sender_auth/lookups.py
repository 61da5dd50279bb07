"""The DNS lookups pyspf and dkimpy make, sent to ``gateway.dns.nameservers``.

Both libraries resolve through a blocking function of their own: pyspf through the module-level
``spf.DNSLookup``, dkimpy through the ``dnsfunc`` argument of its verify calls. They run in
sender_auth's pool threads, so a blocking dnspython resolver built like the delivery resolver's
(mta.delivery.nexthops.dns_resolver) serves them both. Temporary failures (timeout, SERVFAIL,
REFUSED) are raised as each library expects them, so that they end up as ``temperror``.
"""
from __future__ import annotations

from typing import Any, Sequence

import dkim
import dns.exception
import dns.name
import dns.resolver
import spf

from mta.delivery.nexthops import dns_resolver


class TemporaryLookupError(dkim.DnsTimeoutError):
    """DNS did not answer (timeout, SERVFAIL, REFUSED): the result is temperror, never a refusal."""


class Lookups:
    def __init__(self, nameservers: Sequence[tuple[str, int]], timeout: float) -> None:
        self.timeout = timeout
        self._resolver = dns_resolver(nameservers, timeout)

    def _resolve(self, name: str, rdtype: str, timeout: float | None = None) -> list[Any]:
        """The records of one RRset; [] for NXDOMAIN or no data; TemporaryLookupError otherwise."""
        try:
            answer = self._resolver.resolve(dns.name.from_text(name), rdtype, search=False,
                                            lifetime=min(timeout or self.timeout, self.timeout))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
            raise TemporaryLookupError(f"{name} {rdtype}: {e.__class__.__name__}") from None
        except dns.exception.DNSException as e:
            raise TemporaryLookupError(f"{name} {rdtype}: {e}") from None
        return list(answer)

    def txt(self, name: str) -> list[bytes]:
        """Each TXT record of ``name``, its strings joined (RFC 7208 3.3, RFC 6376 3.6.2.2)."""
        return [b"".join(r.strings) for r in self._resolve(name, "TXT")]

    def dkim_txt(self, name: Any, timeout: float = 5) -> bytes | None:
        """dkimpy's ``dnsfunc``: the first TXT record, or None."""
        name = name.decode("ascii") if isinstance(name, bytes) else name
        found = [b"".join(r.strings) for r in self._resolve(name, "TXT", timeout)]
        return found[0] if found else None

    def spf_lookup(self, name: str, qtype: str, strict: Any = True, timeout: float = 20) -> list[tuple]:
        """pyspf's ``DNSLookup``: ``[((name, qtype), value), ...]`` in the shapes it expects."""
        try:
            records = self._resolve(name, qtype, timeout)
        except TemporaryLookupError as e:
            raise spf.TempError(f"DNS {e}") from None
        out: list[tuple] = []
        for r in records:
            if qtype in ("A", "AAAA"):
                out.append(((name, qtype), r.address))
            elif qtype == "MX":
                out.append(((name, qtype), (r.preference, r.exchange)))
            elif qtype == "PTR":
                out.append(((name, qtype), r.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                out.append(((name, qtype), r.strings))
        return out

    def install_for_spf(self) -> None:
        """pyspf has no per-call resolver: its module-level lookup function is replaced, for this
        process (one gateway per process, so one set of name servers)."""
        spf.DNSLookup = self.spf_lookup
