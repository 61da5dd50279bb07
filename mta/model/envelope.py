"""The public objects every hook receives: one ``Session`` per connection and one ``Envelope`` per
transaction (the aiosmtpd split), so a plugin can keep per-connection and per-message state apart."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any


def new_id() -> str:
    """A queue / session id: sortable by time, unique without coordination between processes."""
    return f"{int(time.time() * 1000):012x}{uuid.uuid4().hex[:12]}"


# ``envelope.extra[LOG_FIELDS]``: short ``{name: text}`` fields a plugin wants on the message's
# per-recipient outcome log lines (delivered, deferred, bounced), such as sender_auth's verdicts.
LOG_FIELDS = "log_fields"


@dataclass
class Session:
    """One client connection, as plugins see it."""

    id: str
    virtual_server: str                 # the ``virtual_servers[].name`` that accepted it
    peer_host: str
    peer_port: int
    local_host: str
    local_port: int
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    authenticated_user: str | None = None
    # Set by the plugin that decides who may relay (relay_acl, at connect): the client's address may
    # relay. The core trusts the DSN requests of such a client, or of an authenticated one, in full
    # (``virtual_servers[].dsn.untrusted``); it never decides relaying from this.
    relay_allowed: bool = False
    started_at: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict)   # free room for plugins' per-session state


@dataclass
class Envelope:
    """One transaction: MAIL FROM, the accepted RCPTs and what is known of the message.

    ``sender`` is the reverse path without brackets ('' for the null sender ``<>``).
    """

    id: str
    sender: str = ""
    mail_params: dict[str, str | None] = field(default_factory=dict)
    recipients: list[str] = field(default_factory=list)
    rcpt_params: dict[str, dict[str, str | None]] = field(default_factory=dict)
    size: int = 0                                  # bytes of the message as spooled
    declared_size: int | None = None               # the SIZE= parameter, if any
    started_at: float = field(default_factory=time.time)   # MAIL FROM (the mail log's delay counts from it)
    extra: dict[str, Any] = field(default_factory=dict)
