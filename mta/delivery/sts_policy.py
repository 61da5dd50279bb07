"""MTA-STS (RFC 8461) as text: the ``_mta-sts`` TXT record, the policy file, and MX name matching.

Pure functions and values, no I/O: :mod:`mta.delivery.mta_sts` fetches, caches and decides when to
use them. Anything malformed raises :class:`PolicyError`, which the caller treats as "no new policy"
(a policy already in force stays in force, RFC 8461 5.1).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

MAX_AGE_LIMIT = 31557600            # RFC 8461 3.2: max_age is at most a year
MODES = ("enforce", "testing", "none")
_ID = re.compile(r"[A-Za-z0-9]{1,32}\Z")
_FIELD = re.compile(r"([A-Za-z0-9_]+)[ \t]*:[ \t]*(.*?)[ \t]*\Z")


class PolicyError(ValueError):
    """A TXT record or policy file that does not follow RFC 8461."""


def policy_id(records: list[str]) -> str | None:
    """The ``id`` of the one ``v=STSv1`` record among ``records``; None when there is none.

    More than one STSv1 record, or one without a valid id, raises :class:`PolicyError` (RFC 8461
    3.1: "treated as if it did not exist", which for us means: keep what we have)."""
    sts = [r for r in records if r.split(";", 1)[0].strip() == "v=STSv1"]
    if not sts:
        return None
    if len(sts) > 1:
        raise PolicyError(f"{len(sts)} v=STSv1 TXT records")
    fields: dict[str, str] = {}
    for part in sts[0].split(";"):
        key, eq, value = part.strip().partition("=")
        if eq:
            fields.setdefault(key.strip(), value.strip())
    found = fields.get("id", "")
    if not _ID.match(found):
        raise PolicyError(f"TXT record without a valid id: {sts[0]!r}")
    return found


@dataclass(frozen=True)
class Policy:
    """One domain's policy as published; ``text`` is kept for the cache and for ``dns-check``."""

    mode: str                       # enforce | testing | none
    max_age: int                    # seconds
    mx: tuple[str, ...]             # patterns: "mx.example.com" or "*.example.com"
    id: str = ""                    # the TXT id it was fetched under
    text: str = ""

    def report_strings(self) -> list[str]:
        """RFC 8460 4.4's ``policy-string``: the policy's lines as published."""
        return [line.strip() for line in self.text.splitlines() if line.strip()] or [
            "version: STSv1", f"mode: {self.mode}", *[f"mx: {m}" for m in self.mx], f"max_age: {self.max_age}"]

    def matches(self, host: str) -> bool:
        """Whether an MX host name is allowed (RFC 8461 4.1: a wildcard stands for one label)."""
        return any(mx_matches(pattern, host) for pattern in self.mx)


def mx_matches(pattern: str, host: str) -> bool:
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        head, dot, rest = host.partition(".")
        return bool(head) and bool(dot) and rest == pattern[2:]
    return host == pattern


def parse_policy(text: str, id: str = "") -> Policy:
    """The policy file (RFC 8461 3.2): ``key: value`` lines, CRLF or LF; unknown keys ignored."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        m = _FIELD.match(line)
        if m is None:
            raise PolicyError(f"not a policy line: {line[:80]!r}")
        key, value = m.group(1), m.group(2)
        if key == "mx":
            if value:
                mx.append(value.lower().rstrip("."))
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError(f"version is {fields.get('version')!r}, not STSv1")
    mode = fields.get("mode", "")
    if mode not in MODES:
        raise PolicyError(f"mode is {mode!r}, not enforce, testing or none")
    age = fields.get("max_age", "")
    if not age.isdigit() or len(age) > 10:
        raise PolicyError(f"max_age is {age!r}, not a number of seconds")
    if mode != "none" and not mx:
        raise PolicyError(f"mode {mode} without an mx line")
    return Policy(mode, min(int(age), MAX_AGE_LIMIT), tuple(dict.fromkeys(mx)), id, text)


__all__ = ["MAX_AGE_LIMIT", "MODES", "Policy", "PolicyError", "mx_matches", "parse_policy", "policy_id"]
