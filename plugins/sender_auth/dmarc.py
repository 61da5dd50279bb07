"""DMARC (RFC 7489): the policy lookup, identifier alignment and the result.

The policy is the ``_dmarc`` TXT record of the RFC5322.From domain, else of its organizational domain
(6.6.3); the organizational domain is found with the Public Suffix List (publicsuffixlist's bundled
copy; a name under an unlisted suffix such as ``.test`` takes the last label as its suffix, the PSL's
default rule). A message passes when SPF or DKIM passed for a domain aligned with the From domain
(relaxed: the same organizational domain; strict: the same name).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

from publicsuffixlist import PublicSuffixList

from smtpgw_plugins.sender_auth.lookups import TemporaryLookupError

_PSL = PublicSuffixList()
WEAKER = {"reject": "quarantine", "quarantine": "none", "none": "none"}


def organizational_domain(domain: str) -> str:
    return _PSL.privatesuffix(domain) or domain


def aligned(domain: str, from_domain: str, mode: str) -> bool:
    domain, from_domain = domain.lower().rstrip("."), from_domain.lower().rstrip(".")
    if mode == "s":
        return domain == from_domain
    return organizational_domain(domain) == organizational_domain(from_domain)


@dataclass(frozen=True)
class Policy:
    domain: str             # where the record was found
    p: str
    sp: str
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100


def parse_record(text: str, domain: str) -> Policy | None:
    """A ``v=DMARC1`` record's tags; None when it is not one (or has no usable ``p=``)."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip().lower(), value.strip())
    if tags.get("v") != "DMARC1" or not text.lstrip().startswith("v"):
        return None
    p = tags.get("p", "").lower()
    if p not in ("none", "quarantine", "reject"):
        return None
    sp = tags.get("sp", "").lower()
    try:
        pct = max(0, min(100, int(tags.get("pct", "100"))))
    except ValueError:
        pct = 100
    return Policy(domain, p, sp if sp in ("none", "quarantine", "reject") else p,
                  "s" if tags.get("adkim", "r").lower() == "s" else "r",
                  "s" if tags.get("aspf", "r").lower() == "s" else "r", pct)


def find_policy(from_domain: str, txt: Callable[[str], list[bytes]]) -> Policy | None:
    """The From domain's policy, else its organizational domain's (TemporaryLookupError passes up)."""
    org = organizational_domain(from_domain)
    for domain in dict.fromkeys((from_domain, org)):
        records = [r.decode("utf-8", "replace") for r in txt(f"_dmarc.{domain}")]
        records = [r for r in records if r.lstrip().lower().startswith("v=dmarc1")]
        if len(records) == 1:           # none or several: no policy here (6.6.3)
            policy = parse_record(records[0], domain)
            if policy is not None:
                return policy
    return None


@dataclass(frozen=True)
class DmarcResult:
    result: str                 # none | pass | fail | temperror
    policy: str | None = None   # the policy to apply on failure, after sp= and pct=
    comment: str | None = None


def evaluate(from_domain: str, spf: tuple[str, str | None], dkim: Sequence[tuple[str, str]],
             txt: Callable[[str], list[bytes]], rng: random.Random | None = None) -> DmarcResult:
    """``spf``: (result, the domain it was checked for); ``dkim``: (result, d=) per signature."""
    try:
        policy = find_policy(from_domain, txt)
    except TemporaryLookupError as e:
        return DmarcResult("temperror", comment=str(e))
    if policy is None:
        return DmarcResult("none")
    spf_result, spf_domain = spf
    if spf_result == "pass" and spf_domain and aligned(spf_domain, from_domain, policy.aspf):
        return DmarcResult("pass", policy.p if from_domain == policy.domain else policy.sp)
    if any(result == "pass" and aligned(d, from_domain, policy.adkim) for result, d in dkim):
        return DmarcResult("pass", policy.p if from_domain == policy.domain else policy.sp)
    if spf_result == "temperror" or any(result == "temperror" for result, _ in dkim):
        return DmarcResult("temperror", comment="an SPF or DKIM check could not be completed")
    applied = policy.p if from_domain == policy.domain else policy.sp
    if policy.pct < 100 and (rng or random).random() * 100 >= policy.pct:
        applied = WEAKER[applied]       # outside the sampled percentage: the next weaker policy
    return DmarcResult("fail", applied)
