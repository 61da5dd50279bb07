"""The Queue Viewer's rows: the queue as ``smtpgw queue list`` gives it, grouped by connector and
destination domain, each with a state an administrator can read at a glance.

The rows are built from the control socket's SUMMARY dicts (:func:`mta.ops.control.summary`), which
a gateway of several workers merges from all of them, so the console needs no access to the queue
itself. A message with recipients in two domains appears in both domains' rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mta.config import Config
from mta.delivery.connectors import connectors_for

LOCAL = "local delivery"
CORRUPT = "corrupt (never attempted again)"

# states, most urgent first within a row
ACTIVE, HELD, SCHEDULE, ETRN, RETRYING, READY, BROKEN = (
    "active", "held", "waiting for schedule", "held for ETRN", "retrying", "ready", "corrupt")


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".") or "(no domain)"


def connector_name(config: Config, domain: str) -> str:
    """The connector mail for ``domain`` leaves by (the best address space), or local delivery."""
    if domain in config.gateway.local_domains:
        return LOCAL
    found = connectors_for(config, domain)
    return found[0].name if found else "(no connector)"


def message_state(row: dict[str, Any]) -> str:
    """One message's state from its SUMMARY."""
    if row.get("corrupt"):
        return BROKEN
    if row.get("active"):
        return ACTIVE
    if row.get("held"):
        return HELD
    why = row.get("why_held") or ""
    if "remote-triggered" in why:
        return ETRN
    if why:
        return SCHEDULE
    if row.get("last_error"):
        return RETRYING
    return READY


@dataclass
class Destination:
    """One row of the Queues page."""
    connector: str
    domain: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    recipients: int = 0

    @property
    def oldest_age(self) -> float:
        return max((m.get("age") or 0.0 for m in self.messages), default=0.0)

    def count(self, state: str) -> int:
        return sum(1 for m in self.messages if message_state(m) == state)

    @property
    def state(self) -> str:
        """The row's state: active if anything is being delivered; held, waiting or ETRN when every
        message waits for that; else retrying when one has failed; else ready."""
        states = [message_state(m) for m in self.messages]
        if ACTIVE in states:
            return ACTIVE
        for waiting in (BROKEN, HELD, ETRN, SCHEDULE):
            if states and all(s == waiting for s in states):
                return waiting
        if RETRYING in states:
            return RETRYING
        return READY if states else ""

    @property
    def why(self) -> str:
        """The reason that goes with the state: the newest last error, or the schedule's opening."""
        state = self.state
        if state == RETRYING:
            failed = [m for m in self.messages if m.get("last_error") and not m.get("held")]
            if failed:
                return max(failed, key=lambda m: m.get("received_at") or 0)["last_error"]
        if state in (SCHEDULE, ETRN, BROKEN, HELD):
            return next((m["why_held"] for m in self.messages if m.get("why_held")), "")
        return ""

    @property
    def next_attempt(self) -> float | None:
        times = [m["next_attempt"] for m in self.messages if m.get("next_attempt")]
        return min(times) if times else None


def destinations(config: Config, entries: list[dict[str, Any]]) -> list[Destination]:
    """The rows, ordered by connector then domain."""
    rows: dict[tuple[str, str], Destination] = {}
    for entry in entries:
        if entry.get("corrupt"):
            key = (CORRUPT, "")
            rows.setdefault(key, Destination(*key)).messages.append(entry)
            continue
        per_domain: dict[str, int] = {}
        for address in entry.get("recipients_pending") or []:
            d = domain_of(address)
            per_domain[d] = per_domain.get(d, 0) + 1
        for d, count in per_domain.items():
            key = (connector_name(config, d), d)
            row = rows.setdefault(key, Destination(*key))
            row.messages.append(entry)
            row.recipients += count
    return sorted(rows.values(), key=lambda r: (r.connector == CORRUPT, r.connector.lower(), r.domain))


def in_domain(entry: dict[str, Any], domain: str) -> bool:
    """Whether a SUMMARY has a pending recipient in ``domain`` (the control socket's own rule)."""
    d = domain.lower().rstrip(".")
    return any(domain_of(a) == d for a in entry.get("recipients_pending") or [])
