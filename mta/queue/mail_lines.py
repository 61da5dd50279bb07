"""The queue's lines in the mail log: one per message queued (Postfix's qmgr ``from=, size=, nrcpt=``)
and one per recipient outcome of each attempt (``postfix/smtp``'s ``to=, relay=, delay=, delays=,
dsn=, status=``), with the times Postfix gives:

* ``delays=a/b/c/d``: a, from the client's MAIL to the message's queue-in; b, from there to the start
  of this attempt (waiting in the queue, earlier attempts included); c, from the start of the attempt
  to the start of the transaction that answered (routing, DNS, connecting, EHLO, TLS, AUTH, hops that
  failed); d, that transaction (MAIL to the final reply; for Maildir, the write). Without a
  transaction (no hop reached) all of the attempt is c, as Postfix counts a failed connect.
* ``delay=`` their sum: from the client's MAIL to the outcome.
"""
from __future__ import annotations

from typing import Any

from mta.dsn import reports as dsn
from mta.maillog import lines
from mta.model.envelope import LOG_FIELDS
from mta.model.nexthop import Outcome, RecipientResult
from mta.model.queue_entry import QueueEntry, RecipientState
from mta.smtp import replies as R
from mta.smtp.reply import Reply
from mta.smtp.server.mail_lines import ORIGINAL_RECIPIENTS      # what the client wrote, when rewritten

FORWARDED_FOR = "forwarded_for"        # entry.extra of an alias's copy: the local address it was sent to


def status_of(outcome: Outcome, reply: Reply) -> str:
    if outcome is Outcome.DELIVERED:
        return lines.STATUS_SENT
    if outcome is Outcome.DEFERRED:
        return lines.STATUS_DEFERRED
    return lines.STATUS_EXPIRED if reply.status == R.EXPIRED_STATUS else lines.STATUS_BOUNCED


def queued(entry: QueueEntry) -> lines.MailLine:
    return lines.queued(entry.id, entry.sender, entry.size, len(entry.rcpts))


def removed(entry: QueueEntry) -> lines.MailLine:
    return lines.removed(entry.id)


def notification(entry: QueueEntry, action: str, report_id: str) -> lines.MailLine:
    return lines.notification(entry.id, action, report_id)


def outcome(entry: QueueEntry, what: Outcome, address: str, reply: Reply, result: RecipientResult | None,
            attempt_started: float, now: float) -> lines.MailLine:
    """The line for one recipient's outcome (``result`` is None for an expiry: no attempt made)."""
    arrival = entry.arrived_at or entry.received_at
    queue_in = max(entry.received_at - arrival, 0.0)
    if result is None:
        ended = now
        waited, setup, transfer = max(now - entry.received_at, 0.0), 0.0, 0.0
    else:
        waited = max(attempt_started - entry.received_at, 0.0)
        if result.started is not None and result.finished is not None:
            ended = result.finished
            setup, transfer = max(result.started - attempt_started, 0.0), max(result.finished - result.started, 0.0)
        else:
            ended = now
            setup, transfer = max(now - attempt_started, 0.0), 0.0
    hop = result.hop if result is not None else ""
    relay = "local" if hop == dsn.LOCAL_HOP else lines.relay_name(hop)
    original = (entry.extra.get(ORIGINAL_RECIPIENTS) or {}).get(address) or entry.extra.get(FORWARDED_FOR)
    return lines.delivery(entry.id, address, relay, max(ended - arrival, 0.0),
                          (queue_in, waited, setup, transfer), reply, status_of(what, reply), original,
                          result.tls if result is not None else None)


def diag_fields(entry: QueueEntry, address: str, reply: Reply,
                state: RecipientState | None = None) -> dict[str, Any]:
    """The queuing_engine diag event's fields for an outcome (attempts counts failed tries only),
    then what plugins asked to see there (``envelope.extra[LOG_FIELDS]``: sender_auth's ``auth=``).
    ``state``: the recipient's, when the caller has it (a search per outcome is N² for N recipients)."""
    if state is None:
        state = next((r for r in entry.rcpts if r.address == address), None)
    fields: dict[str, Any] = {"id": entry.id, "recipient": address, "reply": str(reply),
                              "hop": getattr(state, "last_hop", None) or "-"}
    extra = entry.extra.get(LOG_FIELDS)
    if isinstance(extra, dict):
        fields.update((str(k), v) for k, v in extra.items() if str(k) not in fields)
    if state is not None and state.attempts:
        fields["attempts"] = state.attempts
    return fields
