"""Which local parts a local domain takes: none that asks for routing, none that cannot be a mailbox.

The session's parser (``mta.smtp.address``) already drops source routes, refuses a second unquoted ``@``
and canonicalises quoted local parts, so what reaches here is one mailbox at one domain. What it
cannot know is that ``%``, ``!`` and a quoted ``@`` are the percent hack, bang paths and quoted
relaying: harmless to us (nothing here interprets them), but a mailbox name a later hop or a
forwarding rule could. So for local domains they are refused outright, as Postfix does for untrusted
routing, and so are names that Maildir delivery would refuse later (which would only bounce).
"""
from __future__ import annotations

from mta.smtp.address import split_address
from mta.delivery.maildir import safe_mailbox_name
from mta.smtp import replies as R
from mta.smtp.reply import Reply

ROUTING_CHARACTERS = "%!@"


def local_part_refusal(recipient: str) -> tuple[Reply, str] | None:
    """The reply and diag reason refusing ``recipient`` (at a local domain), or None to accept it."""
    local, _ = split_address(recipient)
    found = sorted({c for c in local if c in ROUTING_CHARACTERS})
    if found:
        return R.ROUTING_REFUSED, f"local part holds routing character(s) {' '.join(found)}"
    try:
        safe_mailbox_name(local)
    except ValueError:
        return R.MAILBOX_NAME_REFUSED, "local part is not a safe Maildir name"
    return None
