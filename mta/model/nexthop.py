"""What routing hands to delivery, and what delivery hands back: shared by the resolver, the
smart_host plugin, the SMTP client, Maildir delivery and the queue manager."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from mta.smtp.reply import Reply


@dataclass(frozen=True)
class Hop:
    """One host to try. ``host`` is what to connect to (an IP address, or a name the reactor resolves);
    ``name`` is the MX or smart-host name it came from (logs, TLS host checks)."""

    host: str
    port: int = 25
    name: str = ""
    preference: int = 0
    # every DNS answer that led here (the MX, the host's address) came with the AD bit from a trusted
    # validating resolver: the hop's TLSA records may be looked up (DANE, RFC 7672 2.2); not compared
    dnssec: bool = field(default=False, compare=False)
    # the name's CNAME expansion when ``name`` is an alias (the address answer named another owner):
    # with ``dnssec``, the TLSA base domain tried first (RFC 7672 2.2.2); not compared
    canonical: str = field(default="", compare=False)

    def __str__(self) -> str:
        label = self.name or self.host
        return f"{label}[{self.host}]:{self.port}" if self.name and self.name != self.host else f"[{self.host}]:{self.port}"


class Outcome(enum.StrEnum):
    """What became of a recipient after an attempt; the queue fires the matching hook
    (``smtpgw_delivered``, ``smtpgw_deferred``, ``smtpgw_bounced``; none for a hold)."""

    DELIVERED = "delivered"     # 2xx: done
    DEFERRED = "deferred"       # 4xx: retried later, an attempt counted
    FAILED = "failed"           # 5xx (or expired): a DSN goes to the sender
    HELD = "held"               # a delivery window or remote trigger holds it: not an attempt


@dataclass(frozen=True)
class RecipientResult:
    """The outcome for one recipient: ``reply.code`` 2xx delivered, 4xx deferred, 5xx failed, unless
    ``held_until`` says it was held."""

    recipient: str
    reply: Reply
    hop: str = ""                  # str(Hop) that gave the answer, for DSNs and logs
    held_until: float | None = None   # set when the recipient was held (schedule, remote-triggered):
                                      # not an attempt; try again at this Unix time
    started: float | None = None      # when the transaction that answered began (MAIL sent, or the
    finished: float | None = None     # Maildir write), and when its answer came: the mail log's
                                      # delays=c/d (connection set-up / transmission)
    tls: str = ""                     # the connection's TLS for the mail log's tls=: verified, mta-sts,
                                      # dane, opportunistic or none ("" when no SMTP connection)

    @property
    def outcome(self) -> Outcome:
        if self.held_until is not None:
            return Outcome.HELD
        if self.reply.code < 400:
            return Outcome.DELIVERED
        if self.reply.code < 500:
            return Outcome.DEFERRED
        return Outcome.FAILED


class HostUnusable(Exception):
    """The hop could not take the message at all (connect failed, greeting/EHLO/MAIL refused, TLS
    required but missing...): the caller tries the next hop. ``reply`` says why (4xx or 5xx)."""

    def __init__(self, reply: Reply, tls_failure: str = "") -> None:
        super().__init__(str(reply))
        self.reply = reply
        # set when mandatory TLS failed: RFC 8460's result type (starttls-not-supported,
        # certificate-host-mismatch, certificate-expired, certificate-not-trusted, validation-failure),
        # which TLS reporting (mta.delivery.tls_report) counts
        self.tls_failure = tls_failure
