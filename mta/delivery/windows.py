"""The core's delivery window: a connector's schedule and its oversize schedule (the seed's Delivery
Options tab).

:class:`mta.policy.core.CorePolicy` answers ``smtpgw_delivery_window`` with :func:`delivery_window`.
When the window is closed the answer is a :class:`mta.model.window.Hold`: the Unix time at which the
window next opens, and the reason a queue listing shows. The queue keeps the recipients until exactly
that time -- no attempt is counted -- so mail goes the moment the window opens, not at the next retry
tick.

Weekly grids are read on the wall clock of the connector's ``delivery.timezone`` (default UTC);
``every D`` windows are zone-independent (see :mod:`mta.config.schedules`).
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

from mta.config import Connector
from mta.config.schedules import Schedule
from mta.config.values import format_size
from mta.model.window import Hold

NEVER_RECHECK = 3600.0      # a "never" schedule has no opening: look again after this many seconds


def format_opening(when: float, zone_name: str) -> str:
    """``2026-11-30 08:00 Europe/Paris``: the wall clock the administrator wrote the grid in."""
    local = datetime.fromtimestamp(when, ZoneInfo(zone_name))
    return f"{local:%Y-%m-%d %H:%M}" + (f":{local:%S}" if local.second else "") + f" {zone_name}"


def schedule_hold(schedule: Schedule, now: float, zone_name: str, label: str) -> Hold | None:
    """None while ``schedule`` is open at ``now``; else a :class:`Hold` until it opens.

    ``label`` names the schedule in the reason (``connector 'ISP' schedule``).
    """
    if schedule.kind == "always":       # the default, asked for every message: no clock arithmetic
        return None
    zone = ZoneInfo(zone_name)
    when = datetime.fromtimestamp(now, timezone.utc).astimezone(zone)
    if schedule.is_open(when):
        return None
    opening = schedule.next_open(when)
    if opening is None:
        return Hold(now + NEVER_RECHECK, f"held: {label} is never open")
    until = opening.timestamp()
    return Hold(until, f"held: {label}, opens at {format_opening(until, zone_name)}")


def delivery_window(connector: Connector, envelope: Any, now: float) -> Hold | None:
    """The connector's answer for ``envelope`` at ``now``: None (go) or a :class:`Hold`.

    A message larger than ``delivery.oversize.threshold`` follows the oversize schedule only (the
    seed: "use different delivery times for oversize messages"); every other message follows
    ``delivery.schedule``.
    """
    delivery = connector.delivery
    zone_name = delivery.timezone or "UTC"
    oversize = delivery.oversize
    size = int(getattr(envelope, "size", 0) or 0)
    if oversize.threshold is not None and oversize.schedule is not None and size > oversize.threshold:
        label = (f"connector '{connector.name}' oversize schedule (message {format_size(size)} "
                 f"> {format_size(oversize.threshold)})")
        return schedule_hold(oversize.schedule, now, zone_name, label)
    return schedule_hold(delivery.schedule, now, zone_name, f"connector '{connector.name}' schedule")


__all__ = ["delivery_window", "schedule_hold", "format_opening", "NEVER_RECHECK"]
