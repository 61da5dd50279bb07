"""Connector schedules: parsing the Exchange-style grid and answering "open now?" / "open when?"."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, strategies as st

from mta.config import ConfigError
from mta.config.schedules import EPOCH_MONDAY, SLOTS_PER_WEEK, Schedule, parse_schedule, slot_of

UTC = timezone.utc
KEY = "connectors[0].delivery.schedule"
# 2024-01-01 was a Monday.
MON = datetime(2024, 1, 1, tzinfo=UTC)


def at(day: int, hh: int, mm: int = 0, ss: int = 0, tz=UTC) -> datetime:
    return datetime(2024, 1, 1 + day, hh, mm, ss, tzinfo=tz)


# -- parsing -------------------------------------------------------------------------------------

def test_keywords():
    assert parse_schedule("always", KEY) == Schedule.always()
    assert parse_schedule(" Never ", KEY) == Schedule.never()
    assert parse_schedule("every 2h", KEY) == Schedule("every", every=7200.0)
    assert parse_schedule("every 90", KEY).every == 90.0


def test_weekly_grid_slots():
    s = parse_schedule({"mon": ["08:00-09:00"], "sun": ["23:45-24:00"], "sat": []}, KEY)
    assert s.kind == "weekly"
    assert s.slots == frozenset({32, 33, 34, 35, 6 * 96 + 95})


def test_wrap_past_midnight_is_split_across_days():
    s = parse_schedule({"tue": ["22:00-02:00"]}, KEY)
    assert s.slots == frozenset(range(96 + 88, 96 + 96)) | frozenset(range(2 * 96, 2 * 96 + 8))


def test_wrap_from_sunday_into_monday():
    s = parse_schedule({"sun": ["23:00-01:00"]}, KEY)
    assert s.slots == frozenset(range(6 * 96 + 92, 672)) | frozenset(range(0, 4))


def test_full_day_and_full_names():
    s = parse_schedule({"Monday": ["00:00-24:00"], "FRI": "12:00-12:15"}, KEY)
    assert s.slots == frozenset(range(96)) | {4 * 96 + 48}


@pytest.mark.parametrize("value, path, words", [
    ("sometimes", KEY, "expected always, never"),
    ("every", KEY, 'expected "every <duration>"'),
    ("every 0s", KEY, "more than zero"),
    ("every soon", KEY, 'expected "every <duration>"'),
    (5, KEY, "got 5"),
    ({"mon": ["08:10-09:00"]}, KEY + ".mon[0]", "not on a 15-minute boundary"),
    ({"mon": ["08:00-09:07"]}, KEY + ".mon[0]", "not on a 15-minute boundary"),
    ({"tue": ["ok", "8-9"]}, KEY + ".tue[0]", 'expected a time range "HH:MM-HH:MM"'),
    ({"mon": ["25:00-26:00"]}, KEY + ".mon[0]", "not a valid time"),
    ({"mon": ["24:00-02:00"]}, KEY + ".mon[0]", "not a valid time"),
    ({"mon": ["08:60-09:00"]}, KEY + ".mon[0]", "not a valid time"),
    ({"mon": ["09:00-09:00"]}, KEY + ".mon[0]", "empty"),
    ({"mon": [900]}, KEY + ".mon[0]", "got 900"),
    ({"mon": {"a": 1}}, KEY + ".mon", "expected a list"),
    ({"funday": []}, KEY + ".funday", "unknown key (known: mon, tue, wed, thu, fri, sat, sun)"),
    ({"mon": [], "monday": []}, KEY + ".monday", "already given"),
])
def test_parse_errors_name_the_key(value, path, words):
    with pytest.raises(ConfigError) as e:
        parse_schedule(value, KEY)
    assert e.value.path == path
    assert words in e.value.problem


# -- always / never ------------------------------------------------------------------------------

def test_always():
    s = Schedule.always()
    assert s.is_open(MON)
    assert s.next_open(MON) == MON
    assert s.next_close(MON) is None


def test_never():
    s = Schedule.never()
    assert not s.is_open(MON)
    assert s.next_open(MON) is None
    assert s.next_close(MON) == MON


def test_empty_grid_is_never_and_full_grid_is_always():
    empty = parse_schedule({"mon": []}, KEY)
    assert not empty.is_open(MON) and empty.next_open(MON) is None
    full = parse_schedule({d: ["00:00-24:00"] for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}, KEY)
    assert full.is_open(at(3, 13, 37)) and full.next_close(MON) is None


def test_naive_datetime_refused():
    with pytest.raises(ValueError):
        Schedule.always().is_open(datetime(2024, 1, 1))


# -- weekly grid ---------------------------------------------------------------------------------

WORKDAYS = parse_schedule({d: ["08:00-18:00"] for d in ("mon", "tue", "wed", "thu", "fri")}, KEY)


def test_grid_boundaries_are_half_open():
    assert not WORKDAYS.is_open(at(0, 7, 59, 59))
    assert WORKDAYS.is_open(at(0, 8, 0))
    assert WORKDAYS.is_open(at(0, 17, 59, 59))
    assert not WORKDAYS.is_open(at(0, 18, 0))


def test_grid_next_open_and_close():
    assert WORKDAYS.next_open(at(0, 6, 10)) == at(0, 8, 0)
    assert WORKDAYS.next_open(at(0, 9, 0)) == at(0, 9, 0)
    assert WORKDAYS.next_close(at(0, 9, 0)) == at(0, 18, 0)
    assert WORKDAYS.next_close(at(0, 19, 0)) == at(0, 19, 0)
    # Friday evening -> Monday morning of the next week.
    assert WORKDAYS.next_open(at(4, 18, 0)) == datetime(2024, 1, 8, 8, 0, tzinfo=UTC)


def test_midnight_belongs_to_the_new_day():
    s = parse_schedule({"tue": ["00:00-00:15"]}, KEY)
    assert not s.is_open(at(0, 23, 59, 59))
    assert s.is_open(at(1, 0, 0))
    assert s.next_open(at(0, 23, 50)) == at(1, 0, 0)
    assert s.next_close(at(1, 0, 5)) == at(1, 0, 15)


def test_quarter_hour_boundary():
    s = parse_schedule({"wed": ["10:15-10:30"]}, KEY)
    assert not s.is_open(at(2, 10, 14, 59))
    assert s.is_open(at(2, 10, 15))
    assert not s.is_open(at(2, 10, 30))
    assert s.next_open(at(2, 10, 0, 1)) == at(2, 10, 15)


def test_wrap_over_sunday_to_monday():
    s = parse_schedule({"sun": ["22:00-02:00"]}, KEY)
    sunday_late = at(6, 23, 0)
    assert s.is_open(sunday_late)
    assert s.is_open(datetime(2024, 1, 8, 1, 59, tzinfo=UTC))        # Monday of the next week
    assert s.is_open(at(0, 1, 0))                                    # and of this one
    assert s.next_close(sunday_late) == datetime(2024, 1, 8, 2, 0, tzinfo=UTC)
    assert s.next_open(at(0, 3, 0)) == at(6, 22, 0)


def test_grid_reads_the_wall_clock_of_the_given_zone():
    berlin = ZoneInfo("Europe/Berlin")
    when = datetime(2024, 1, 1, 7, 30, tzinfo=UTC)                     # 08:30 in Berlin
    assert not WORKDAYS.is_open(when)
    assert WORKDAYS.is_open(when.astimezone(berlin))
    assert WORKDAYS.next_open(datetime(2024, 1, 1, 6, 0, tzinfo=berlin)) == datetime(2024, 1, 1, 8, 0, tzinfo=berlin)


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)),
       st.frozensets(st.integers(0, SLOTS_PER_WEEK - 1), min_size=1, max_size=SLOTS_PER_WEEK - 1))
def test_grid_next_open_close_agree_with_is_open(when, slots):
    s = Schedule.weekly(slots)
    opened = s.next_open(when)
    assert opened >= when and s.is_open(opened)
    assert opened - when < timedelta(days=7)
    if opened > when:     # nothing open in between: the slot just before is closed
        assert not s.is_open(opened - timedelta(microseconds=1))
    closed = s.next_close(when)
    assert closed >= when and not s.is_open(closed)
    assert slot_of(opened) in slots


# -- every D -------------------------------------------------------------------------------------

def test_every_two_hours_opens_at_even_hours_utc_for_15_minutes():
    s = parse_schedule("every 2h", KEY)
    assert s.is_open(at(0, 0, 0)) and s.is_open(at(0, 2, 14, 59))
    assert not s.is_open(at(0, 2, 15)) and not s.is_open(at(0, 1, 0))
    assert s.next_open(at(0, 2, 15)) == at(0, 4, 0)
    assert s.next_open(at(0, 4, 5)) == at(0, 4, 5)
    assert s.next_close(at(0, 4, 5)) == at(0, 4, 15)
    assert s.next_close(at(0, 5, 0)) == at(0, 5, 0)


def test_every_week_opens_monday_midnight_utc():
    s = parse_schedule("every 1w", KEY)
    assert s.is_open(MON) and not s.is_open(at(3, 0, 0))
    assert s.next_open(at(2, 12, 0)) == datetime(2024, 1, 8, tzinfo=UTC)
    assert EPOCH_MONDAY.weekday() == 0


def test_every_counts_elapsed_time_across_a_dst_change():
    berlin = ZoneInfo("Europe/Berlin")
    s = parse_schedule("every 1d", KEY)                  # opens at 00:00 UTC = 02:00 CEST in summer
    before = datetime(2024, 3, 30, 12, 0, tzinfo=berlin)  # CET (+1); clocks go forward that night
    opened = s.next_open(before)
    assert opened == datetime(2024, 3, 31, 0, 0, tzinfo=UTC)
    assert opened.tzinfo is berlin


def test_every_shorter_than_a_slot_is_always_open():
    s = parse_schedule("every 10m", KEY)
    assert s.is_open(at(1, 3, 7, 11))
    assert s.next_close(MON) is None
