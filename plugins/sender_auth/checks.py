"""One message's checks, run in a pool thread: SPF (pyspf), DKIM and ARC (dkimpy), DMARC (dmarc.py),
and the Authentication-Results header (authres) that reports them (RFC 8601)."""
from __future__ import annotations

import email.utils
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

import authres
import authres.arc
import authres.dmarc
import dkim
import dkim.util
import spf

from smtpgw_plugins.sender_auth import dmarc
from smtpgw_plugins.sender_auth.lookups import Lookups, TemporaryLookupError

SPF_QUERY_TIME = 20         # RFC 7208 4.6.4: at least 20 seconds for the whole evaluation


@dataclass(frozen=True)
class Options:
    spf: bool = True
    dkim: bool = True
    dmarc: bool = True
    arc: bool = True


@dataclass
class DkimSignature:
    result: str                 # pass | fail | neutral | temperror | permerror
    d: str = ""
    s: str = ""
    a: str = ""
    comment: str | None = None


@dataclass
class Results:
    spf: str | None = None              # MAIL FROM (or postmaster@HELO for the null sender)
    spf_identity: str = ""
    spf_helo: str | None = None
    helo: str = ""
    dkim: list[DkimSignature] = field(default_factory=list)
    dkim_checked: bool = False
    arc: str | None = None
    dmarc: dmarc.DmarcResult | None = None
    from_domain: str | None = None

    def header_value(self, authserv_id: str) -> str:
        """The field body: ``authserv-id; method=result ...`` folded one result per line."""
        results: list[Any] = []
        if self.spf is not None:
            results.append(authres.SPFAuthenticationResult(result=self.spf, smtp_mailfrom=self.spf_identity))
        if self.spf_helo is not None:
            results.append(authres.SPFAuthenticationResult(result=self.spf_helo, smtp_helo=self.helo))
        for sig in self.dkim:
            results.append(authres.DKIMAuthenticationResult(result=sig.result, header_d=sig.d, header_s=sig.s,
                                                            header_a=sig.a, result_comment=sig.comment))
        if self.dkim_checked and not self.dkim:
            results.append(authres.DKIMAuthenticationResult(result="none"))
        if self.arc is not None:
            results.append(authres.arc.ARCAuthenticationResult(result=self.arc))
        if self.dmarc is not None and self.from_domain:
            results.append(authres.dmarc.DMARCAuthenticationResult(
                result=self.dmarc.result, header_from=self.from_domain, policy=self.dmarc.policy))
        text = str(authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=results))
        value = text.partition(": ")[2]
        return value.replace("; ", ";\r\n\t") if results else value

    def summary(self) -> str:
        """A short form for log lines: ``spf=pass dkim=pass dmarc=fail``."""
        parts = []
        if self.spf is not None:
            parts.append(f"spf={self.spf}")
        if self.dkim_checked:
            parts.append("dkim=" + (",".join(s.result for s in self.dkim) or "none"))
        if self.arc is not None:
            parts.append(f"arc={self.arc}")
        if self.dmarc is not None and self.from_domain:
            parts.append(f"dmarc={self.dmarc.result}")
        return " ".join(parts)


def from_domain(headers: Message) -> str | None:
    """The RFC5322.From domain when there is exactly one author address (else DMARC has nothing to align)."""
    values = headers.get_all("From") or []
    addresses = [a for _, a in email.utils.getaddresses([str(v) for v in values]) if a]
    if len(values) != 1 or len(addresses) != 1 or "@" not in addresses[0]:
        return None
    return addresses[0].rpartition("@")[2].strip().lower().rstrip(".") or None


def _helo_domain(helo: str) -> str | None:
    name = (helo or "").strip().rstrip(".")
    return name if "." in name and not name.startswith("[") else None


def check_spf(lookups: Lookups, ip: str, sender: str, helo: str, results: Results) -> None:
    helo_name = _helo_domain(helo)
    results.helo = helo_name or helo or ""
    if helo_name is not None:
        results.spf_helo = spf.check2(i=ip, s=f"postmaster@{helo_name}", h=helo_name,
                                      timeout=lookups.timeout, querytime=SPF_QUERY_TIME)[0]
    if sender:
        results.spf_identity = sender
        results.spf = spf.check2(i=ip, s=sender, h=helo or "unknown", timeout=lookups.timeout,
                                 querytime=SPF_QUERY_TIME)[0]
    elif helo_name is not None:          # the null sender is checked as postmaster@HELO (RFC 7208 2.4)
        results.spf_identity, results.spf = f"postmaster@{helo_name}", results.spf_helo
    else:
        results.spf = "none"


class _Recording:
    """dkimpy's dnsfunc, remembering whether DNS failed (dkimpy turns most errors into False)."""

    def __init__(self, lookups: Lookups) -> None:
        self.lookups, self.failed = lookups, False

    def __call__(self, name: Any, timeout: float = 5) -> bytes | None:
        try:
            return self.lookups.dkim_txt(name, timeout)
        except TemporaryLookupError:
            self.failed = True
            raise


def check_dkim(lookups: Lookups, data: bytes, results: Results) -> None:
    results.dkim_checked = True
    verifier = dkim.DKIM(data, timeout=lookups.timeout)
    fields = [v for k, v in verifier.headers if k.lower() == b"dkim-signature"]
    for idx, raw in enumerate(fields):
        try:
            tags = dkim.util.parse_tag_value(raw)
        except dkim.util.InvalidTagValueList:
            tags = {}
        sig = DkimSignature("fail", tags.get(b"d", b"").decode("ascii", "replace"),
                            tags.get(b"s", b"").decode("ascii", "replace"),
                            tags.get(b"a", b"").decode("ascii", "replace"))
        dnsfunc = _Recording(lookups)
        try:
            ok = verifier.verify(idx=idx, dnsfunc=dnsfunc)
            sig.result = "pass" if ok else ("temperror" if dnsfunc.failed else "fail")
        except TemporaryLookupError as e:
            sig.result, sig.comment = "temperror", str(e)
        except dkim.ValidationError as e:        # body hash mismatch, bad signature, expired
            sig.result, sig.comment = ("temperror" if dnsfunc.failed else "fail"), str(e).split(" (")[0][:80]
        except dkim.DKIMException as e:          # a malformed signature or key record
            sig.result, sig.comment = ("temperror" if dnsfunc.failed else "permerror"), str(e)[:80]
        results.dkim.append(sig)


def check_arc(lookups: Lookups, data: bytes, results: Results) -> None:
    dnsfunc = _Recording(lookups)
    try:
        cv, _, _ = dkim.ARC(data, timeout=lookups.timeout).verify(dnsfunc=dnsfunc)
    except dkim.DKIMException:
        cv = dkim.CV_Fail
    if dnsfunc.failed:
        results.arc = "temperror"
    else:
        results.arc = {dkim.CV_Pass: "pass", dkim.CV_None: "none"}.get(cv, "fail")


def check_message(lookups: Lookups, options: Options, chunks: list[bytes], headers: Message,
                  ip: str, sender: str, helo: str) -> Results:
    """Every enabled check on the message as the client sent it (``chunks``, joined here, in the
    pool thread, not in the event loop)."""
    data = b"".join(chunks)
    results = Results(from_domain=from_domain(headers))
    if options.spf:
        check_spf(lookups, ip, sender, helo, results)
    if options.dkim:
        check_dkim(lookups, data, results)
    if options.arc:
        check_arc(lookups, data, results)
    if options.dmarc and results.from_domain:
        spf_domain = results.spf_identity.rpartition("@")[2] if results.spf_identity else None
        results.dmarc = dmarc.evaluate(results.from_domain, (results.spf or "none", spf_domain),
                                       [(s.result, s.d) for s in results.dkim], lookups.txt)
    return results
