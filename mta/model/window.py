"""What a delivery window says besides "no opinion" (``smtpgw_delivery_window``'s answers).

A hold is not a failure: the recipients stay queued, no attempt is counted, and they go the moment
the hold ends rather than at the next retry tick. ``Go.NOW`` is the opposite verdict: go now, and
let no later plugin (the connector's own schedule included) hold the mail -- what an ETRN release
answers for a remote-triggered connector.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class Hold:
    """Keep the recipients until ``until`` (Unix time). ``reason`` is what the queue listing shows
    (``RecipientState.held_reason``), e.g. ``held: connector 'ISP' schedule, opens at 2026-11-30
    08:00 Europe/Paris``."""

    until: float
    reason: str = ""

    def is_over(self, now: float) -> bool:
        """A hold whose time has come means the window has just opened: go."""
        return self.until <= now


class Go(enum.Enum):
    """Go now, whatever any later plugin would say."""

    NOW = "now"
