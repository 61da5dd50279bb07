"""Connector delivery windows (mta.delivery.windows, the core's smtpgw_delivery_window): schedules, oversize
schedules, time zones and grid edges, and the configuration errors that guard them.

Times are fixed Unix timestamps (a fake clock): Monday 2026-11-30 is the reference week, in winter
(Europe/Paris is UTC+1).
"""
from __future__ import annotations

from datetime import datetime
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest

from mta.config import (ConfigError, Connector, DeliveryConfig, OversizeConfig,
                        parse_config)
from mta.config.schedules import parse_schedule
from mta.delivery.windows import NEVER_RECHECK, delivery_window
from mta.model.window import Hold


def at(text: str, zone: str = "UTC") -> float:
    """Unix time of ``"2026-11-30 07:59:59"`` read in ``zone``."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=ZoneInfo(zone)).timestamp()


def connector(schedule="always", tz: str = "UTC", threshold: int | None = None, oversize=None) -> Connector:
    over = OversizeConfig(threshold, parse_schedule(oversize, "o") if oversize is not None else None)
    return Connector("ISP", delivery=DeliveryConfig(parse_schedule(schedule, "s"), oversize=over, timezone=tz))


def message(size: int = 1000):
    return SimpleNamespace(size=size)


WORKDAY = {"mon": ["08:00-18:00"]}


def test_always_open_and_never_rechecked_hourly():
    now = at("2026-11-30 03:00:00")
    assert delivery_window(connector("always"), message(), now) is None
    hold = delivery_window(connector("never"), message(), now)
    assert isinstance(hold, Hold) and hold.until == now + NEVER_RECHECK
    assert hold.reason == "held: connector 'ISP' schedule is never open"


def test_closed_grid_holds_until_the_exact_opening_with_a_reason():
    hold = delivery_window(connector(WORKDAY), message(), at("2026-11-30 07:59:59"))
    assert isinstance(hold, Hold) and hold.until == at("2026-11-30 08:00:00")
    assert hold.reason == "held: connector 'ISP' schedule, opens at 2026-11-30 08:00 UTC"
    assert delivery_window(connector(WORKDAY), message(), at("2026-11-30 08:00:00")) is None
    assert delivery_window(connector(WORKDAY), message(), at("2026-11-30 17:59:59")) is None
    # closing time: the next opening is a week later
    assert delivery_window(connector(WORKDAY), message(), at("2026-11-30 18:00:00")).until == at("2026-12-07 08:00:00")


def test_quarter_hour_boundary():
    c = connector({"mon": ["08:15-08:30"]})
    assert delivery_window(c, message(), at("2026-11-30 08:14:59")).until == at("2026-11-30 08:15:00")
    assert delivery_window(c, message(), at("2026-11-30 08:15:00")) is None
    assert delivery_window(c, message(), at("2026-11-30 08:29:59")) is None
    assert delivery_window(c, message(), at("2026-11-30 08:30:00")).until == at("2026-12-07 08:15:00")


def test_window_across_midnight_sunday_into_monday():
    c = connector({"sun": ["22:00-02:00"]})
    assert delivery_window(c, message(), at("2026-11-29 21:59:59")).until == at("2026-11-29 22:00:00")
    assert delivery_window(c, message(), at("2026-11-29 23:59:59")) is None
    assert delivery_window(c, message(), at("2026-11-30 00:00:00")) is None      # Monday, still open
    assert delivery_window(c, message(), at("2026-11-30 01:59:59")) is None
    assert delivery_window(c, message(), at("2026-11-30 02:00:00")).until == at("2026-12-06 22:00:00")


def test_grid_is_read_in_the_connector_time_zone():
    paris = connector(WORKDAY, tz="Europe/Paris")
    # 07:30 UTC is 08:30 in Paris: open there, closed in UTC
    assert delivery_window(paris, message(), at("2026-11-30 07:30:00")) is None
    assert delivery_window(connector(WORKDAY), message(), at("2026-11-30 07:30:00")).until == at("2026-11-30 08:00:00")
    hold = delivery_window(paris, message(), at("2026-11-30 06:30:00"))
    assert hold.until == at("2026-11-30 07:00:00") == at("2026-11-30 08:00:00", "Europe/Paris")
    assert hold.reason.endswith("opens at 2026-11-30 08:00 Europe/Paris")


def test_grid_follows_the_wall_clock_across_a_dst_change():
    # Sunday 2026-03-29 Europe/Paris goes from UTC+1 to UTC+2; Monday's 08:00 is 06:00 UTC
    paris = connector(WORKDAY, tz="Europe/Paris")
    hold = delivery_window(paris, message(), at("2026-03-28 12:00:00"))
    assert hold.until == at("2026-03-30 08:00:00", "Europe/Paris") == at("2026-03-30 06:00:00")


def test_every_two_hours():
    c = connector("every 2h")
    assert delivery_window(c, message(), at("2026-11-30 01:00:00")).until == at("2026-11-30 02:00:00")
    assert delivery_window(c, message(), at("2026-11-30 02:10:00")) is None
    assert delivery_window(c, message(), at("2026-11-30 02:15:00")).until == at("2026-11-30 04:00:00")


def test_oversize_mail_waits_for_its_own_window_while_small_mail_flows():
    c = connector("always", threshold=1024 * 1024, oversize={"mon": ["20:00-22:00"]})
    now = at("2026-11-30 10:00:00")
    assert delivery_window(c, message(1024 * 1024), now) is None          # at the threshold: not above it
    assert delivery_window(c, message(100), now) is None
    hold = delivery_window(c, message(2 * 1024 * 1024), now)
    assert hold.until == at("2026-11-30 20:00:00")
    assert hold.reason == ("held: connector 'ISP' oversize schedule (message 2MB > 1MB), "
                           "opens at 2026-11-30 20:00 UTC")
    assert delivery_window(c, message(2 * 1024 * 1024), at("2026-11-30 20:00:00")) is None


def test_oversize_window_replaces_the_normal_schedule_for_large_mail():
    c = connector(WORKDAY, threshold=1000, oversize="always")
    night = at("2026-11-30 23:00:00")
    assert delivery_window(c, message(5000), night) is None
    assert delivery_window(c, message(500), night).until == at("2026-12-07 08:00:00")


def test_core_policy_answers_the_hook_and_a_site_hook_can_add_a_rule():
    from mta.policy.core import CorePolicy
    from mta.plugin.hookspecs import hookimpl
    from mta.plugin.manager import Hooks

    gateway = SimpleNamespace(reactor=SimpleNamespace(seconds=lambda: at("2026-11-30 07:00:00")))
    hooks = Hooks()
    hooks.register(CorePolicy(gateway), name="core")
    c = connector(WORKDAY)
    assert hooks.delivery_window(c, message()).until == at("2026-11-30 08:00:00")
    assert hooks.delivery_window(connector(), message()) is None

    class Freeze:
        @hookimpl
        def smtpgw_delivery_window(self, connector, envelope):
            return Hold(at("2026-12-01 00:00:00"), "held: change freeze") if envelope.size > 10 else None

    hooks.register(Freeze(), name="local:freeze")
    assert hooks.delivery_window(connector(), message(20)).reason == \
        "held: change freeze"
    assert hooks.delivery_window(c, message(5)).until == at("2026-11-30 08:00:00")


# -- configuration -------------------------------------------------------------------------------

def config(**connector_keys) -> dict:
    c = {"name": "ISP", "address_spaces": ["*"]}
    c.update(connector_keys)
    return {"gateway": {"hostname": "gw.example.test", "spool": "/nonexistent"},
            "virtual_servers": [{"name": "vs", "listen": ["127.0.0.90:2525"]}],
            "connectors": [c], "plugins": {"enabled": []}}


def error(**connector_keys) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(config(**connector_keys))
    return str(e.value)


def test_schedule_keys_are_read():
    cfg = parse_config(config(delivery={"schedule": {"mon": ["08:00-18:00"]}, "timezone": "Europe/Paris",
                                        "oversize": {"threshold": "2MB", "schedule": "every 2h"}},
                              content_restrictions={"max_message_size": "10MB"}))
    d = cfg.connectors[0].delivery
    assert d.timezone == "Europe/Paris" and d.schedule.kind == "weekly" and len(d.schedule.slots) == 40
    assert d.oversize.threshold == 2 * 1024 * 1024 and d.oversize.schedule.every == 7200
    assert parse_config(config()).connectors[0].delivery.timezone == "UTC"


@pytest.mark.parametrize("delivery, words", [
    ({"schedule": {"mon": ["08:10-09:00"]}}, "connectors[0].delivery.schedule.mon[0]: 08:10 in '08:10-09:00' "
                                             "is not on a 15-minute boundary"),
    ({"schedule": {"monday": ["8-9"]}}, 'connectors[0].delivery.schedule.monday[0]: expected a time range'),
    ({"schedule": {"funday": ["08:00-09:00"]}}, "connectors[0].delivery.schedule.funday: unknown key"),
    ({"schedule": "every fortnight"}, 'connectors[0].delivery.schedule: expected "every <duration>"'),
    ({"schedule": "sometimes"}, "connectors[0].delivery.schedule: expected always, never"),
    ({"oversize": {"threshold": "2MB"}}, "connectors[0].delivery.oversize.schedule: required when threshold is set"),
    ({"timezone": "Mars/Olympus"}, "connectors[0].delivery.timezone: unknown time zone 'Mars/Olympus'"),
])
def test_bad_schedules_are_configuration_errors(delivery, words):
    assert error(delivery=delivery).startswith(words)


def test_oversize_threshold_above_the_connector_size_limit_is_an_error():
    text = error(content_restrictions={"max_message_size": "2MB"},
                 delivery={"oversize": {"threshold": "3MB", "schedule": "every 2h"}})
    assert text == ("connectors[0].delivery.oversize.threshold: 3MB is larger than "
                    "content_restrictions.max_message_size (2MB)")
    parse_config(config(content_restrictions={"max_message_size": "2MB"},
                        delivery={"oversize": {"threshold": "2MB", "schedule": "every 2h"}}))
