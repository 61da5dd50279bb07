"""A queued message's envelope and per-recipient delivery state, as stored in the spool.

It is what delivery-side hooks receive as ``envelope``: it has the same ``id``, ``sender``,
``recipients`` and ``size`` as :class:`mta.model.envelope.Envelope`, plus the state that makes retries exact.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


@dataclass
class RecipientState:
    address: str
    status: str = PENDING                # pending | delivered | failed
    attempts: int = 0                    # delivery attempts that ended in a temporary failure
    next_attempt: float = 0.0            # Unix time; 0 = as soon as possible
    last_error: str | None = None        # the last reply text (for `queue list` and DSNs)
    last_hop: str | None = None
    held_reason: str | None = None       # why it waits besides retry (schedule, remote-triggered...)


@dataclass
class QueueEntry:
    id: str
    sender: str                           # '' for the null sender
    rcpts: list[RecipientState]
    received_at: float
    size: int = 0
    virtual_server: str = ""
    peer_host: str = ""
    helo: str | None = None
    authenticated_user: str | None = None
    delay_notified: bool = False
    arrived_at: float = 0.0               # the client's MAIL FROM (0: received_at); the mail log's delay=
    extra: dict[str, Any] = field(default_factory=dict)   # plugin state that must survive restarts (JSON-able)

    @property
    def recipients(self) -> list[str]:
        return [r.address for r in self.rcpts]

    def pending(self) -> list[RecipientState]:
        return [r for r in self.rcpts if r.status == PENDING]

    def is_done(self) -> bool:
        return not self.pending()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QueueEntry":
        d = dict(d)
        d["rcpts"] = [RecipientState(**r) for r in d.get("rcpts", [])]
        return cls(**d)
