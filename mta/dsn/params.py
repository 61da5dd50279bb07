"""The RFC 3461 (DSN) ESMTP parameters, on both sides of the gateway.

Inbound, the server checks ``RET``/``ENVID`` on MAIL and ``NOTIFY``/``ORCPT`` on RCPT here before it
accepts them, because their values later land in report headers and on other servers' command lines:
a value that is not clean xtext, or too long, is refused with 501 5.5.4 rather than stored.

Outbound, :class:`OutboundDSN` renders what was stored for the next hop, re-encoded from the decoded
value, so nothing stored by an older version or a plugin can put a space or a CR on our command line.

After delivery, :func:`success_notices` says which recipients get a success report from us: those that
asked ``NOTIFY=SUCCESS`` and were delivered into a local Maildir ("delivered"), or handed to a next hop
that does not offer DSN ("relayed", RFC 3461 4.2.1). A DSN-capable next hop got the NOTIFY and reports
itself, so we send nothing for it.
"""
from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Any, Iterable

from mta.dsn.reports import (DELIVERED as DELIVERED_ACTION, LOCAL_HOP, NOTICES_HEADERS_ONLY,
                             RELAYED as RELAYED_ACTION)
from mta.model.envelope import Envelope
from mta.model.nexthop import RecipientResult
from mta.model.queue_entry import DELIVERED, QueueEntry, RecipientState
from mta.smtp.replies import (BAD_ENVID, BAD_NOTIFY, BAD_ORCPT, BAD_RET, ENVID_TOO_LONG, MAX_ENVID, MAX_ORCPT,
                              ORCPT_TOO_LONG, duplicate_dsn_param)
from mta.smtp.reply import Reply

MAIL_KEYWORDS = frozenset({"RET", "ENVID"})
RCPT_KEYWORDS = frozenset({"NOTIFY", "ORCPT"})
RET_VALUES = frozenset({"FULL", "HDRS"})
NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})

_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*/=?^_`{|}~+-]+")     # RFC 5322 atext: the addr-type
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})*")
_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")
_XCHARS = re.compile(r"[\x21-\x2a\x2c-\x3c\x3e-\x7e]*")   # xtext that needs no escape
_PRINTABLE = re.compile(r"[ -~]*")


def xtext_decode(value: str) -> str:
    """RFC 3461 4: ``+XX`` escapes become the character; ValueError when ``value`` is not xtext
    (a bare ``+``, an ``=``, a space, a control or non-ASCII character). Lower-case hex is taken,
    as Postfix takes it; we only ever send upper case."""
    if not _XTEXT.fullmatch(value):
        raise ValueError(f"not xtext: {value!r}")
    return _HEX.sub(lambda m: chr(int(m.group(1), 16)), value)


def xtext_encode(text: str) -> str:
    """The other way: every character outside ``!``..``~``, and ``+`` and ``=``, as ``+XX``.
    Non-ASCII text is encoded as its UTF-8 octets."""
    if _XCHARS.fullmatch(text):        # the usual case, without a Python loop over every character
        return text
    out = []
    for byte in text.encode("utf-8"):
        if 0x21 <= byte <= 0x7E and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def _printable(text: str) -> bool:
    return _PRINTABLE.fullmatch(text) is not None


def parse_notify(value: str | None) -> frozenset[str] | None:
    """The keywords of a NOTIFY value, upper-cased; None when it is not valid (empty, unknown or
    repeated keywords, NEVER together with another)."""
    if not value:
        return None
    words = [w.upper() for w in value.split(",")]
    if len(set(words)) != len(words):
        return None
    if words == ["NEVER"]:
        return frozenset(words)
    if not words or not set(words) <= NOTIFY_VALUES:
        return None
    return frozenset(words)


def parse_orcpt(value: str | None) -> tuple[str, str] | None:
    """``(addr-type, decoded address)`` of an ORCPT value, or None when it is not valid."""
    if not value or len(value) > MAX_ORCPT:
        return None
    kind, semi, encoded = value.partition(";")
    if not semi or not _ATOM.fullmatch(kind) or not encoded:
        return None
    try:
        address = xtext_decode(encoded)
    except ValueError:
        return None
    return (kind, address) if _printable(address) else None


def parse_envid(value: str | None) -> str | None:
    """The decoded ENVID, or None when it is not valid."""
    if not value or len(value) > MAX_ENVID:
        return None
    try:
        text = xtext_decode(value)
    except ValueError:
        return None
    return text if _printable(text) else None


# -- the server side ---------------------------------------------------------------------------------

def duplicate_refusal(text: str) -> Reply | None:
    """501 when a DSN keyword is given twice in ``text`` (the parameters after the path); the
    generic parser answers 555 for a repeated parameter, RFC 3461 and Postfix say 501 for these."""
    seen: set[str] = set()
    for word in text.split(" "):
        key = word.partition("=")[0].upper()
        if key in MAIL_KEYWORDS or key in RCPT_KEYWORDS:
            if key in seen:
                return duplicate_dsn_param(key)
            seen.add(key)
    return None


def check_mail(params: dict[str, str | None]) -> Reply | None:
    """The refusal for bad RET/ENVID in MAIL parameters, else None; RET is stored upper-cased."""
    if "RET" in params:
        ret = (params["RET"] or "").upper()
        if ret not in RET_VALUES:
            return BAD_RET
        params["RET"] = ret
    return _check_text(params, "ENVID", MAX_ENVID, parse_envid, ENVID_TOO_LONG, BAD_ENVID)


def check_rcpt(params: dict[str, str | None]) -> Reply | None:
    """The refusal for bad NOTIFY/ORCPT in RCPT parameters, else None; NOTIFY is stored upper-cased
    (ORCPT is kept as received: it is the sender's text)."""
    if "NOTIFY" in params:
        if parse_notify(params["NOTIFY"]) is None:
            return BAD_NOTIFY
        params["NOTIFY"] = (params["NOTIFY"] or "").upper()
    return _check_text(params, "ORCPT", MAX_ORCPT, parse_orcpt, ORCPT_TOO_LONG, BAD_ORCPT)


def _check_text(params: dict[str, str | None], key: str, limit: int, parse: Any, too_long: Reply,
                bad: Reply) -> Reply | None:
    """ENVID and ORCPT: a length limit on the value as sent, then its syntax."""
    if key not in params:
        return None
    value = params[key]
    if value is not None and len(value) > limit:
        return too_long
    return bad if parse(value) is None else None


def limit_untrusted(envelope: Envelope, mode: str) -> None:
    """``virtual_servers[].dsn.untrusted`` for a message from a client that is neither relay-allowed
    nor authenticated, applied once at the end of DATA.

    Such a client can name anyone as the sender, so ``MAIL FROM:<victim> RET=FULL`` with
    ``NOTIFY=SUCCESS`` would make us mail its whole message to the victim. ``headers`` (the default)
    makes success and delay notices return the headers only (RET is ignored for them); ``off``
    drops SUCCESS and DELAY from every NOTIFY (NEVER when nothing is left, so a recipient that did
    not ask for failures still gets none); ``full`` leaves everything as asked. Failure notices are
    never changed.
    """
    if mode == "full":
        return
    if mode == "headers":
        if str(envelope.mail_params.get("RET") or "").upper() == "FULL":
            envelope.extra[NOTICES_HEADERS_ONLY] = True
        return
    for params in envelope.rcpt_params.values():
        notify = parse_notify(params.get("NOTIFY")) if params else None
        if notify and notify & _UNTRUSTED_NOTICES:
            params["NOTIFY"] = "FAILURE" if "FAILURE" in notify else "NEVER"


_UNTRUSTED_NOTICES = frozenset({"SUCCESS", "DELAY"})


# -- the client side ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RecipientDSN:
    """One recipient's NOTIFY/ORCPT in parsed form: its NOTIFY keywords, and the text for a next
    hop's RCPT line (" NOTIFY=.. ORCPT=..", re-encoded from the decoded value, or "")."""

    notify: frozenset[str] = frozenset()
    wire: str = ""

    @classmethod
    def parse(cls, params: dict[str, Any] | None) -> "RecipientDSN":
        if not params:
            return NO_RECIPIENT_DSN
        return cls(parse_notify(params.get("NOTIFY")) or frozenset(), _render_rcpt(params))


NO_RECIPIENT_DSN = RecipientDSN()


class OutboundDSN:
    """The DSN parameters of one queued message, ready for a next hop's MAIL and RCPT lines.

    A message to 64,000 recipients is sent in batches of 100, and again at each retry; so a
    recipient's parameters are parsed the first time it is sent and kept (:meth:`of` keeps one
    object per queue entry for as long as the entry lives), and a batch costs its own recipients
    only, never the whole list.
    """

    __slots__ = ("mail", "_params", "_parsed", "_folded")

    def __init__(self, mail: str, rcpt_params: dict[str, Any]) -> None:
        self.mail = mail                        # " RET=.. ENVID=.." (leading space) or ""
        self._params = rcpt_params              # address as accepted -> {"NOTIFY": .., "ORCPT": ..}
        self._parsed: dict[str, RecipientDSN] = {}
        self._folded: dict[str, str] | None = None      # lower-cased address -> as accepted, on demand

    @classmethod
    def from_entry(cls, entry: QueueEntry) -> "OutboundDSN | None":
        """None when the message carries no DSN parameter at all (the usual case: nothing to do)."""
        mail = _render_mail(entry.extra.get("mail_params") or {})
        rcpt_params = entry.extra.get("rcpt_params") or {}
        if not mail and not rcpt_params:
            return None
        return cls(mail, rcpt_params)

    @classmethod
    def of(cls, entry: QueueEntry) -> "OutboundDSN | None":
        """:meth:`from_entry`, made once per queue entry object and kept until the entry is gone."""
        key = id(entry)
        hit = _KEPT.get(key)
        if hit is not None and hit[0]() is entry:
            return hit[1]
        dsn = cls.from_entry(entry)
        _KEPT[key] = (weakref.ref(entry, lambda _, key=key: _KEPT.pop(key, None)), dsn)
        return dsn

    def recipient(self, address: str) -> RecipientDSN:
        """``address``'s parameters, parsed on first use (looked up as accepted, then case-folded)."""
        parsed = self._parsed.get(address)
        if parsed is None:
            params = self._params.get(address)
            if params is None:
                if self._folded is None:
                    self._folded = {a.lower(): a for a in self._params}
                params = self._params.get(self._folded.get(address.lower(), ""))
            parsed = self._parsed[address] = RecipientDSN.parse(params)
        return parsed

    def rcpt(self, address: str) -> str:
        return self.recipient(address).wire

    def wants_success(self, address: str) -> bool:
        return "SUCCESS" in self.recipient(address).notify


# id(entry) -> (a weak reference to it, its OutboundDSN): dropped when the entry is collected
_KEPT: dict[int, tuple[weakref.ref, OutboundDSN | None]] = {}


def _render_mail(params: dict[str, Any]) -> str:
    out = ""
    ret = str(params.get("RET") or "").upper()
    if ret in RET_VALUES:
        out += f" RET={ret}"
    envid = parse_envid(params.get("ENVID"))
    if envid is not None:
        encoded = xtext_encode(envid)
        if len(encoded) <= MAX_ENVID:
            out += f" ENVID={encoded}"
    return out


def _render_rcpt(params: dict[str, Any]) -> str:
    out = ""
    notify = parse_notify(params.get("NOTIFY"))
    if notify:
        order = ("NEVER", "SUCCESS", "FAILURE", "DELAY")
        out += " NOTIFY=" + ",".join(k for k in order if k in notify)
    orcpt = parse_orcpt(params.get("ORCPT"))
    if orcpt is not None:
        value = f"{orcpt[0]};{xtext_encode(orcpt[1])}"
        if len(value) <= MAX_ORCPT:
            out += f" ORCPT={value}"
    return out


@dataclass(frozen=True)
class RelayedResult(RecipientResult):
    """Delivered to a next hop that does not offer DSN, for a recipient that asked NOTIFY=SUCCESS:
    the queue owes the sender a "relayed" report (RFC 3461 4.2.1)."""


# -- after delivery ----------------------------------------------------------------------------------

def success_notices(entry: QueueEntry, due: Iterable[RecipientState],
                    results: Iterable[RecipientResult]) -> list[tuple[str, list[tuple[RecipientState, Reply]]]]:
    """``[(action, [(state, reply), ...]), ...]``: the success reports this attempt calls for.

    Only for a real sender (never the null sender, never about one of our own reports), only for
    recipients now delivered that asked NOTIFY=SUCCESS, and only where no DSN-capable hop took over.
    """
    if not entry.sender or entry.extra.get("dsn") or not entry.extra.get("rcpt_params"):
        return []
    dsn = OutboundDSN.of(entry)
    # the usual case first: a DSN-capable hop took every recipient, and nothing is owed (no pass over N)
    owed = [(r, RELAYED_ACTION if isinstance(r, RelayedResult) else DELIVERED_ACTION) for r in results
            if isinstance(r, RelayedResult) or r.hop == LOCAL_HOP]
    if dsn is None or not owed:
        return []
    states = {r.address.lower(): r for r in due}
    found: dict[str, list[tuple[RecipientState, Reply]]] = {}
    for result, action in owed:
        state = states.get(result.recipient.lower())
        if state is None or state.status != DELIVERED or not dsn.wants_success(state.address):
            continue
        found.setdefault(action, []).append((state, result.reply))
    return [(action, found[action]) for action in (DELIVERED_ACTION, RELAYED_ACTION) if action in found]
