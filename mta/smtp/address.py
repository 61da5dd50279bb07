"""Mailbox paths as RFC 5321 writes them in MAIL FROM and RCPT TO.

Parsing is strict on purpose: the addresses that come out of here decide relaying and delivery, so
anything a relay trick could hide in (bare addresses, control characters, over-long parts, general
address literals) is refused with a reply the session can send as is. Source routes are accepted and
dropped (RFC 5321 4.1.1.3 and appendix C: use only the mailbox). Quoted local parts are kept, in a
canonical form: quotes are removed where the content is a plain dot-string, so ``"joe"@x`` and
``joe@x`` are the same address for every plugin.
"""
from __future__ import annotations

import ipaddress
import re

from mta.smtp import replies as R
from mta.smtp.reply import Reply

MAX_PATH = 256          # octets, brackets included (RFC 5321 4.5.3.1.3)
MAX_LOCAL_PART = 64     # 4.5.3.1.1
MAX_DOMAIN = 255        # 4.5.3.1.2

class AddressError(ValueError):
    """A path or parameter list the session must refuse; ``reply`` is the answer to send."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def _grammar(utf8: bool) -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    """(dot-string, quoted-string, domain) patterns; SMTPUTF8 (RFC 6531) widens each to non-ASCII."""
    extra = "\u0080-\U0010ffff" if utf8 else ""
    atext = f"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~{extra}-]"
    dot_string = re.compile(rf"{atext}+(?:\.{atext}+)*")
    quoted = re.compile(rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{extra}]|\\[\x20-\x7e])*"')
    let_dig = f"[A-Za-z0-9{extra}]"
    label = rf"{let_dig}(?:[A-Za-z0-9{extra}-]{{0,61}}{let_dig})?"
    domain = re.compile(rf"{label}(?:\.{label})*\.?")
    return dot_string, quoted, domain


_ASCII = _grammar(False)
_UTF8 = _grammar(True)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
_VALUE_UTF8 = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+")


def _octets(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def split_argument(argument: str, keyword: str) -> tuple[str, str]:
    """Split ``FROM:<path> params`` into ``("<path>", "params")``.

    One space between the colon and ``<`` is tolerated, as many clients send it. The path ends at the
    first ``>`` outside a quoted string.
    """
    head = keyword + ":"
    if argument[: len(head)].upper() != head:
        raise AddressError(R.BAD_ADDRESS)
    rest = argument[len(head):]
    if rest.startswith(" "):
        rest = rest[1:]
    if not rest.startswith("<"):
        raise AddressError(R.BAD_ADDRESS)
    end = rest.find(">") if '"' not in rest else _path_end(rest)
    if end < 0:
        raise AddressError(R.BAD_ADDRESS)
    params = rest[end + 1:]
    if params and not params.startswith(" "):
        raise AddressError(R.BAD_ADDRESS)
    return rest[: end + 1], params[1:]


def _path_end(text: str) -> int:
    quoted = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
    return -1


def parse_path(text: str, allow_null: bool, utf8: bool = False, allow_postmaster: bool = False) -> str:
    """The mailbox of a ``<...>`` path, without brackets or source route; '' for ``<>``.

    ``allow_postmaster`` accepts the bare ``<Postmaster>`` of RFC 5321 4.5.1 (returned as
    ``postmaster``); ``utf8`` allows non-ASCII mailboxes (the SMTPUTF8 parameter was given).
    """
    if text.startswith(" "):
        text = text[1:]
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise AddressError(R.BAD_ADDRESS)
    if _octets(text) > MAX_PATH:
        raise AddressError(R.PATH_TOO_LONG)
    if _CONTROL.search(text):
        raise AddressError(R.BAD_ADDRESS)
    if not utf8 and not text.isascii():
        raise AddressError(R.NEEDS_SMTPUTF8)
    inner = text[1:-1]
    if not inner:
        if allow_null:
            return ""
        raise AddressError(R.NULL_NOT_ALLOWED)
    grammar = _UTF8 if utf8 else _ASCII
    if inner.startswith("@"):
        inner = _strip_route(inner, grammar[2])
    local, at, domain = inner.rpartition("@")
    if not at:
        if allow_postmaster and inner.lower() == "postmaster":
            return "postmaster"
        raise AddressError(R.BAD_ADDRESS)
    local = _local_part(local, grammar)
    return f"{local}@{_domain(domain, grammar[2])}"


def _strip_route(inner: str, domain_re: re.Pattern[str]) -> str:
    route, colon, mailbox = inner.partition(":")
    if not colon:
        raise AddressError(R.BAD_ADDRESS)
    for hop in route.split(","):
        if not hop.startswith("@"):
            raise AddressError(R.BAD_ADDRESS)
        _domain(hop[1:], domain_re)
    return mailbox


def _local_part(local: str, grammar: tuple[re.Pattern[str], ...]) -> str:
    dot_string, quoted, _ = grammar
    if _octets(local) > MAX_LOCAL_PART:
        raise AddressError(R.LOCAL_PART_TOO_LONG)
    if dot_string.fullmatch(local):
        return local
    if not quoted.fullmatch(local):
        raise AddressError(R.BAD_ADDRESS)
    content = re.sub(r"\\(.)", r"\1", local[1:-1])
    if dot_string.fullmatch(content):
        return content
    return '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _domain(domain: str, domain_re: re.Pattern[str]) -> str:
    if domain.startswith("["):
        return _address_literal(domain)
    if _octets(domain) > MAX_DOMAIN:
        raise AddressError(R.DOMAIN_TOO_LONG)
    if not domain_re.fullmatch(domain):
        raise AddressError(R.BAD_ADDRESS)
    return domain[:-1] if domain.endswith(".") else domain


def _address_literal(domain: str) -> str:
    if not domain.endswith("]"):
        raise AddressError(R.BAD_ADDRESS)
    body = domain[1:-1]
    is_v6 = body[:5].lower() == "ipv6:"
    if not is_v6 and ":" in body:
        raise AddressError(R.BAD_LITERAL)           # general address literal: nothing we can route
    try:
        if is_v6:
            return f"[IPv6:{ipaddress.IPv6Address(body[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(body)}]"
    except ValueError:
        raise AddressError(R.BAD_ADDRESS) from None


# EHLO/HELO names (RFC 5321 4.1.1.1): a domain as in paths, except that '_' is taken inside a label, as
# Postfix takes it (Windows machine names carry it); never a space, parenthesis, ';' or 8-bit octet.
_HELO_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HELO_DOMAIN = re.compile(rf"{_HELO_LABEL}(?:\.{_HELO_LABEL})*\.?")


def is_helo_name(name: str) -> bool:
    """Whether ``name`` is a domain name or an IPv4/IPv6 address literal, the only EHLO/HELO
    arguments RFC 5321 4.1.1.1 allows. What passes is safe to record in a Received header as is:
    no comment, space, control character or non-ASCII octet can pass."""
    if not name.isascii():
        return False
    if name.startswith("["):
        try:
            _address_literal(name)
        except AddressError:
            return False
        return True
    return len(name) <= MAX_DOMAIN and _HELO_DOMAIN.fullmatch(name) is not None


def parse_params(text: str, utf8: bool = False) -> dict[str, str | None]:
    """ESMTP ``keyword[=value]`` parameters (RFC 5321 4.1.2), keys upper-cased, in order."""
    params: dict[str, str | None] = {}
    value_re = _VALUE_UTF8 if utf8 else _VALUE
    for word in text.split(" "):
        if not word:
            continue
        key, eq, value = word.partition("=")
        if not _KEYWORD.fullmatch(key) or (eq and not value_re.fullmatch(value)):
            raise AddressError(R.BAD_PARAMS)
        key = key.upper()
        if key in params:
            raise AddressError(R.DUPLICATE_PARAM)
        params[key] = value if eq else None
    return params


def split_address(addr: str) -> tuple[str, str]:
    """(local part, domain) with the domain lower-cased and its trailing dot removed.

    The split is at the last ``@``: a domain never holds one, a quoted local part may.
    """
    local, at, domain = addr.rpartition("@")
    if not at:
        return addr, ""
    return local, domain.lower().rstrip(".")


def format_path(addr: str) -> str:
    """The path for the wire: ``<addr>`` ('' gives ``<>``)."""
    return f"<{addr}>"


def domain_of(address: str) -> str:
    """The domain of ``local@domain`` as routing compares it: lower-case, no trailing dot."""
    return address.rpartition("@")[2].lower().rstrip(".")
