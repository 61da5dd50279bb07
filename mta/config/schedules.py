"""Connector schedules: always, never, every <duration>, or a weekly grid of 15-minute slots.

This mirrors the Exchange connector's "Connection time" box and its Customize grid: a week of
7 x 96 quarter-hour slots, each either open or closed. The queue asks :meth:`Schedule.is_open` before
sending through a connector and :meth:`Schedule.next_open` to know when to look again.

Times are read as given: a weekly grid is matched against the wall clock of the datetime's own time
zone (a caller with a per-connector zone converts with ``when.astimezone(ZoneInfo(...))`` first), so
"08:00-18:00" means 08:00 local. ``every D`` is zone-independent: a window opens at each multiple of
``D`` counted from Monday 1969-12-29 00:00 UTC (the Monday of the Unix epoch's week, so ``every 1w``
opens on Mondays and ``every 1d`` at midnight UTC) and stays open for 15 minutes -- one grid slot,
the time Exchange gives a scheduled connection -- or for all of ``D`` when that is shorter (then the
connector is in effect always open).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from mta.config.errors import ConfigError
from mta.config.values import describe, format_duration, parse_duration

SLOT = timedelta(minutes=15)
SLOTS_PER_DAY = 96
SLOTS_PER_WEEK = 7 * SLOTS_PER_DAY
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
EVERY_WINDOW = 15 * 60.0                      # seconds an `every D` window stays open
EPOCH_MONDAY = datetime(1969, 12, 29, tzinfo=timezone.utc)

_DAY_NAMES = {**{d: i for i, d in enumerate(DAYS)},
              **{full: i for i, full in enumerate(
                  ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"))}}
_RANGE_RE = re.compile(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", re.ASCII)


@dataclass(frozen=True)
class Schedule:
    kind: str = "always"                        # always | never | every | weekly
    every: float | None = None                  # seconds, for kind == "every"
    slots: frozenset[int] = frozenset()         # weekly: slot index = day*96 + minute_of_day//15 (mon=0)

    def __post_init__(self) -> None:
        if self.kind not in ("always", "never", "every", "weekly"):
            raise ValueError(f"unknown schedule kind {self.kind!r}")
        if self.kind == "every" and not (self.every and self.every > 0):
            raise ValueError("an 'every' schedule needs a positive interval")
        if any(not 0 <= s < SLOTS_PER_WEEK for s in self.slots):
            raise ValueError("weekly slots must be in 0..671")

    @classmethod
    def always(cls) -> "Schedule":
        return cls("always")

    @classmethod
    def never(cls) -> "Schedule":
        return cls("never")

    @classmethod
    def periodic(cls, seconds: float) -> "Schedule":
        return cls("every", every=float(seconds))

    @classmethod
    def weekly(cls, slots: frozenset[int] | set[int]) -> "Schedule":
        return cls("weekly", slots=frozenset(slots))

    # -- queries ---------------------------------------------------------------------------------

    def is_open(self, when: datetime) -> bool:
        """May mail go out at ``when`` (an aware datetime)?"""
        _check_aware(when)
        if self.kind == "always":
            return True
        if self.kind == "never":
            return False
        if self.kind == "every":
            return self._since_window_start(when) < self._window()
        return slot_of(when) in self.slots

    def next_open(self, when: datetime) -> datetime | None:
        """The first instant at or after ``when`` that is open; ``when`` itself if open now, None if never."""
        _check_aware(when)
        if self.kind == "always":
            return when
        if self.kind == "never":
            return None
        if self.kind == "every":
            since = self._since_window_start(when)
            return when if since < self._window() else _later(when, self._period() - since)
        if not self.slots:
            return None
        current = slot_of(when)
        if current in self.slots:
            return when
        for step in range(1, SLOTS_PER_WEEK + 1):
            if (current + step) % SLOTS_PER_WEEK in self.slots:
                return _slot_start(when, current + step)
        return None  # pragma: no cover - unreachable with a non-empty slot set

    def next_close(self, when: datetime) -> datetime | None:
        """The first instant at or after ``when`` that is closed; ``when`` if closed now, None if never closes."""
        _check_aware(when)
        if self.kind == "always":
            return None
        if self.kind == "never":
            return when
        if self.kind == "every":
            if self._window() >= self._period():
                return None
            since = self._since_window_start(when)
            return _later(when, self._window() - since) if since < self._window() else when
        if len(self.slots) == SLOTS_PER_WEEK:
            return None
        current = slot_of(when)
        if current not in self.slots:
            return when
        for step in range(1, SLOTS_PER_WEEK + 1):
            if (current + step) % SLOTS_PER_WEEK not in self.slots:
                return _slot_start(when, current + step)
        return None  # pragma: no cover - unreachable with a non-full slot set

    def describe(self) -> str:
        """A short human description, as ``smtpgw check-config`` prints it."""
        if self.kind in ("always", "never"):
            return self.kind
        if self.kind == "every":
            return f"every {format_duration(self.every or 0)}"
        hours = len(self.slots) / 4
        return f"weekly grid, {hours:g} hours a week"

    # -- helpers ---------------------------------------------------------------------------------

    def _period(self) -> timedelta:
        return timedelta(seconds=self.every or 0)

    def _window(self) -> timedelta:
        return min(timedelta(seconds=EVERY_WINDOW), self._period())

    def _since_window_start(self, when: datetime) -> timedelta:
        return (when - EPOCH_MONDAY) % self._period()


def _check_aware(when: datetime) -> None:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("schedules need a timezone-aware datetime")


def _later(when: datetime, delta: timedelta) -> datetime:
    """``when + delta`` in elapsed time (Python's aware arithmetic is wall-clock), in ``when``'s zone."""
    return (when.astimezone(timezone.utc) + delta).astimezone(when.tzinfo)


def slot_of(when: datetime) -> int:
    """The weekly grid slot holding ``when``, on its own wall clock."""
    return when.weekday() * SLOTS_PER_DAY + (when.hour * 60 + when.minute) // 15


def _slot_start(when: datetime, absolute_slot: int) -> datetime:
    """Wall-clock start of slot ``absolute_slot`` counted from the Monday of ``when``'s week (may exceed 671)."""
    monday = when.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=when.weekday())
    return monday + absolute_slot * SLOT


# -- parsing -------------------------------------------------------------------------------------

def _error(key: str, problem: str) -> Exception:
    return ConfigError(key, problem)


def _minutes(hour: str, minute: str, key: str, text: str, end: bool) -> int:
    h, m = int(hour), int(minute)
    if m >= 60 or h > 24 or (h == 24 and (m != 0 or not end)):
        raise _error(key, f"not a valid time in {text!r} (use HH:MM, 00:00 to 24:00)")
    total = h * 60 + m
    if total % 15:
        raise _error(key, f"{hour}:{minute} in {text!r} is not on a 15-minute boundary "
                          "(the schedule grid has 15-minute slots)")
    return total


def _parse_range(value: Any, key: str, day: int) -> set[int]:
    shape = 'expected a time range "HH:MM-HH:MM"'
    if not isinstance(value, str):
        raise _error(key, f"{shape}, got {_describe(value)}")
    m = _RANGE_RE.fullmatch(value)
    if not m:
        raise _error(key, f"{shape}, got {value!r}")
    start = _minutes(m.group(1), m.group(2), key, value, end=False)
    end = _minutes(m.group(3), m.group(4), key, value, end=True)
    if start == end:
        raise _error(key, f"the range {value!r} is empty")
    if end < start:                               # wraps past midnight into the next day
        end += 24 * 60
    base = day * SLOTS_PER_DAY
    return {(base + s) % SLOTS_PER_WEEK for s in range(start // 15, end // 15)}


def _describe(value: Any) -> str:
    return describe(value)


def _parse_weekly(value: dict, key: str) -> Schedule:
    slots: set[int] = set()
    seen: dict[int, str] = {}
    for name, ranges in value.items():
        day_key = f"{key}.{name}"
        day = _DAY_NAMES.get(name.lower()) if isinstance(name, str) else None
        if day is None:
            raise _error(day_key, "unknown key (known: " + ", ".join(DAYS) + ")")
        if day in seen:
            raise _error(day_key, f"the day is already given as {seen[day]!r}")
        seen[day] = name
        if ranges is None:
            continue
        if isinstance(ranges, str):
            ranges = [ranges]
        if not isinstance(ranges, list):
            raise _error(day_key, f'expected a list of "HH:MM-HH:MM" ranges, got {_describe(ranges)}')
        for i, item in enumerate(ranges):
            slots |= _parse_range(item, f"{day_key}[{i}]", day)
    return Schedule.weekly(slots)


def parse_schedule(value: Any, key: str) -> Schedule:
    """``always``, ``never``, ``every <duration>`` or a weekly grid ``{mon: ["08:00-18:00"], ...}``.

    Day keys are mon..sun (full names too); a day left out or empty is closed. End times may be
    24:00; a range that ends before it starts (``22:00-02:00``) runs into the next day, Sunday into
    Monday. Every time must fall on a quarter hour, as in the Exchange grid.
    """
    if isinstance(value, dict):
        return _parse_weekly(value, key)
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "always":
            return Schedule.always()
        if text == "never":
            return Schedule.never()
        if text.startswith("every"):
            try:
                seconds = parse_duration(text[5:], key)
            except ConfigError:
                raise _error(key, f'expected "every <duration>" like "every 2h", got {value!r}') from None
            if seconds <= 0:
                raise _error(key, f"the interval in {value!r} must be more than zero")
            return Schedule.periodic(seconds)
    raise _error(key, 'expected always, never, "every <duration>" or a weekly grid '
                      f'(mon..sun: ["HH:MM-HH:MM", ...]), got {_describe(value)}')
