"""A connector's content and delivery restrictions (the seed's Content Restrictions and Delivery
Restrictions tabs), as pure functions of what is known about a message at each stage.

The same check runs three times with more facts each time, so a message is refused as early as the
gateway can know and never carried by a connector that may not carry it:

* at RCPT: the sender (delivery restrictions, and system vs non-system) and the declared SIZE;
* at the end of DATA: the real size and the priority headers;
* at delivery, per connector tried (mail queued before a configuration change, fail-over connectors,
  reports the gateway writes itself).

A connector whose restrictions refuse a message is skipped in favour of the next connector for the
domain (as Exchange routing skips it); only when every candidate refuses is the recipient refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from email.message import Message
from typing import Iterable, Sequence

from mta.smtp import address
from mta.config import Connector, DeliveryRestrictions
from mta.smtp import replies as R
from mta.smtp.reply import Reply

SYSTEM, NON_SYSTEM = "system", "non-system"
HIGH, NORMAL, LOW = "high", "normal", "low"
_RANK = {LOW: 0, NORMAL: 1, HIGH: 2}


@dataclass(frozen=True)
class Facts:
    """What is known of a message when a restriction is checked; ``None`` means not known yet."""

    sender: str                     # reverse path without brackets; '' is the null sender
    size: int | None = None         # declared (SIZE=) at RCPT, real at DATA and delivery
    priority: str | None = None     # high | normal | low, known from DATA on

    @property
    def kind(self) -> str:
        """Null-sender mail (delivery reports, NDRs, MDNs) is a system message (RFC 3464, 5321 4.5.5)."""
        return SYSTEM if not self.sender else NON_SYSTEM


@dataclass(frozen=True)
class Refusal:
    """Why a connector may not carry a message: the reply to give and a line for the diag log."""

    connector: str
    reply: Reply
    reason: str

    @property
    def is_size(self) -> bool:
        return self.reply.code == 552


# -- priority --------------------------------------------------------------------------------------

def _x_priority(value: str) -> str | None:
    """X-Priority: 1 (Highest) .. 5 (Lowest); only the leading digit counts."""
    digit = value.strip()[:1]
    if digit in ("1", "2"):
        return HIGH
    if digit == "3":
        return NORMAL
    if digit in ("4", "5"):
        return LOW
    return None


_WORDS = {
    "importance": {"high": HIGH, "normal": NORMAL, "low": LOW},                         # RFC 2156
    "priority": {"urgent": HIGH, "normal": NORMAL, "non-urgent": LOW},                  # RFC 2156
}


def priority_of(headers: Message) -> str:
    """The message's priority from X-Priority, Importance and Priority.

    When headers disagree the highest claim wins: a connector that refuses high-priority mail must
    not carry a message any mail client would show as high priority. No recognisable header: normal.
    """
    found: list[str] = []
    for value in headers.get_all("X-Priority") or ():
        level = _x_priority(str(value))
        if level:
            found.append(level)
    for name, words in _WORDS.items():
        for value in headers.get_all(name) or ():
            level = words.get(str(value).strip().lower())
            if level:
                found.append(level)
    return max(found, key=_RANK.__getitem__) if found else NORMAL


# -- delivery restrictions -------------------------------------------------------------------------

def canonical(entry: str) -> str:
    """An address as the session's parser would write it, lower-cased, for comparisons.

    ``"joe"@X.test`` and ``joe@x.test`` are the same sender; ``@domain`` entries stay as they are.
    """
    if entry.startswith("@"):
        return entry.lower().rstrip(".")
    try:
        return address.parse_path(f"<{entry}>", allow_null=False, utf8=True).lower()
    except address.AddressError:
        return entry.lower()


def _entries(restrictions: DeliveryRestrictions) -> frozenset[str]:
    return frozenset(canonical(e) for e in restrictions.exceptions)


def sender_allowed(restrictions: DeliveryRestrictions, sender: str,
                   entries: Iterable[str] | None = None) -> bool:
    """Whether ``sender`` may send through a connector with these delivery restrictions.

    An exception is an address (``joe@example.test``, case-insensitive) or a whole domain
    (``@example.test``, that domain only, not its subdomains). The null sender is not subject to
    delivery restrictions: reports are governed by ``allowed_types`` (``system``).
    """
    if not sender:
        return True
    listed = frozenset(entries) if entries is not None else _entries(restrictions)
    sender = sender.lower()
    domain = "@" + address.split_address(sender)[1]
    excepted = sender in listed or domain in listed
    accept_by_default = restrictions.default == "accept"
    return accept_by_default != excepted


# -- one connector ---------------------------------------------------------------------------------

def check(connector: Connector, facts: Facts, entries: Iterable[str] | None = None) -> Refusal | None:
    """Why ``connector`` may not carry the message described by ``facts``, or None if it may."""
    name = connector.name
    if not sender_allowed(connector.delivery_restrictions, facts.sender, entries):
        return Refusal(name, R.sender_not_allowed(facts.sender, name),
                       f"delivery_restrictions of connector {name} refuse sender <{facts.sender}>")
    content = connector.content_restrictions
    if facts.kind not in content.allowed_types:
        return Refusal(name, R.type_not_carried(name, facts.kind),
                       f"content_restrictions.allowed_types of connector {name} exclude {facts.kind}")
    limit = content.max_message_size
    if limit is not None and facts.size is not None and facts.size > limit:
        return Refusal(name, R.too_big_for_connector(name, limit),
                       f"size {facts.size} over content_restrictions.max_message_size {limit} "
                       f"of connector {name}")
    if facts.priority is not None and facts.priority not in content.allowed_priorities:
        return Refusal(name, R.priority_not_carried(name, facts.priority),
                       f"content_restrictions.allowed_priorities of connector {name} exclude "
                       f"{facts.priority}")
    return None


def choose(connectors: Sequence[Connector], facts: Facts,
           entries: dict[str, frozenset[str]] | None = None) -> tuple[Connector | None, Refusal | None]:
    """The first connector (in routing order) that may carry the message, or ``(None, refusal)``
    with the best candidate's refusal when none may. No candidate at all gives ``(None, None)``."""
    first: Refusal | None = None
    for connector in connectors:
        refusal = check(connector, facts, (entries or {}).get(connector.name))
        if refusal is None:
            return connector, None
        first = first or refusal
    return None, first


def entries_by_connector(connectors: Iterable[Connector]) -> dict[str, frozenset[str]]:
    """Every connector's exception list in canonical form, computed once at configuration."""
    return {c.name: _entries(c.delivery_restrictions) for c in connectors}
