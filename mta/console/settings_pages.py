"""Connectors and virtual servers, as Exchange's property pages showed them (read-only).

A connector's page shows its address spaces and costs, smart hosts, bridgeheads, outbound settings,
restrictions, and its delivery schedule drawn as the 7 x 96 grid of quarter-hours the seed's
Schedule dialog used, with whether it is open now and when it next opens -- on the wall clock of the
connector's ``delivery.timezone``, as the schedule is read.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

from mta.config import Connector, VirtualServer
from mta.config.schedules import DAYS, SLOTS_PER_DAY, Schedule
from mta.config.values import format_duration, format_size
from mta.console.html import esc, table

CELL_W, CELL_H, GRID_LEFT, GRID_TOP = 10, 18, 40, 18


def week_slots(schedule: Schedule, now: float, zone_name: str) -> list[bool]:
    """Whether each quarter-hour of this week (Monday 00:00 on the zone's clock) is open."""
    zone = ZoneInfo(zone_name)
    local = datetime.fromtimestamp(now, timezone.utc).astimezone(zone)
    monday = (local - timedelta(days=local.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
    if schedule.kind in ("always", "never"):
        return [schedule.kind == "always"] * (7 * SLOTS_PER_DAY)
    if schedule.kind == "weekly":
        return [i in schedule.slots for i in range(7 * SLOTS_PER_DAY)]
    return [schedule.is_open((monday + timedelta(minutes=15 * i)).replace(tzinfo=zone)) for i in range(7 * SLOTS_PER_DAY)]


def day_ranges(open_slots: list[bool], day: int) -> str:
    """``08:00-18:00, 22:00-24:00`` for one day of the grid."""
    out, start = [], None
    row = open_slots[day * SLOTS_PER_DAY:(day + 1) * SLOTS_PER_DAY] + [False]
    for i, is_open in enumerate(row):
        if is_open and start is None:
            start = i
        elif not is_open and start is not None:
            out.append(f"{start // 4:02d}:{start % 4 * 15:02d}-{i // 4:02d}:{i % 4 * 15:02d}")
            start = None
    return ", ".join(out) or "closed"


def schedule_grid(ident: str, schedule: Schedule, now: float, zone_name: str) -> str:
    """The 7 x 96 grid as SVG: a filled cell is a quarter-hour when mail may go; the current
    quarter-hour is outlined."""
    slots = week_slots(schedule, now, zone_name)
    local = datetime.fromtimestamp(now, timezone.utc).astimezone(ZoneInfo(zone_name))
    current = local.weekday() * SLOTS_PER_DAY + (local.hour * 60 + local.minute) // 15
    width, height = GRID_LEFT + 96 * CELL_W + 4, GRID_TOP + 7 * CELL_H + 4
    desc = "; ".join(f"{DAYS[d].capitalize()}: {day_ranges(slots, d)}" for d in range(7))
    parts = [f'<svg class="grid7" viewBox="0 0 {width} {height}" role="img" aria-labelledby="{ident}-t {ident}-d">'
             f'<title id="{ident}-t">Delivery schedule ({esc(zone_name)})</title><desc id="{ident}-d">{esc(desc)}</desc>']
    for hour in range(0, 24, 3):
        parts.append(f'<text class="tick" x="{GRID_LEFT + hour * 4 * CELL_W}" y="12">{hour:02d}</text>')
    for d in range(7):
        y = GRID_TOP + d * CELL_H
        parts.append(f'<text class="tick" x="0" y="{y + 13}">{DAYS[d].capitalize()}</text>')
        for q in range(SLOTS_PER_DAY):
            i = d * SLOTS_PER_DAY + q
            cls = "on" if slots[i] else "off"
            if i == current:
                cls += " now"
            parts.append(f'<rect class="{cls}" x="{GRID_LEFT + q * CELL_W}" y="{y}" width="{CELL_W - 1}" height="{CELL_H - 2}"/>')
    parts.append("</svg>")
    return "".join(parts)


def opening(schedule: Schedule | None, now: float, zone_name: str) -> str:
    """``open now (closes at ...)`` or ``closed; opens at ...``, on the zone's clock."""
    if schedule is None:
        return ""
    zone = ZoneInfo(zone_name)
    local = datetime.fromtimestamp(now, timezone.utc).astimezone(zone)
    fmt = "%a %Y-%m-%d %H:%M"
    if schedule.is_open(local):
        closes = schedule.next_close(local)
        return "open now" + (f" (closes {closes:{fmt}} {zone_name})" if closes else "")
    nxt = schedule.next_open(local)
    return "closed" + (f"; opens {nxt:{fmt}} {zone_name}" if nxt else "; never opens")


def _dl(items: list[tuple[str, Any]]) -> str:
    return '<dl class="envelope">' + "".join(
        f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items if v not in (None, "")) + "</dl>"


def describe_schedule(schedule: Schedule | None) -> str:
    if schedule is None:
        return ""
    return f"every {format_duration(schedule.every or 0)}" if schedule.kind == "every" else schedule.describe()


def connector_section(index: int, c: Connector, now: float) -> str:
    d = c.delivery
    zone = d.timezone or "UTC"
    spaces = table("Address spaces", ["Domain", "Cost"], [[esc(a.domain), esc(a.cost)] for a in c.address_spaces],
                   "spaces")
    restrictions = c.content_restrictions
    items = [
        ("Smart hosts", ", ".join(c.smart_hosts) or "none: DNS MX"),
        ("Bridgeheads", ", ".join(c.bridgeheads)),
        ("Outbound TLS", c.outbound.tls), ("Outbound AUTH", c.outbound.auth.user if c.outbound.auth else "none"),
        ("Port", c.outbound.port),
        ("Connections", f"at most {c.max_connections}, {c.max_connections_per_host} per host"),
        ("Largest message", format_size(restrictions.max_message_size) if restrictions.max_message_size else "no limit"),
        ("Message types", ", ".join(restrictions.allowed_types)),
        ("Priorities", ", ".join(restrictions.allowed_priorities)),
        ("Delivery restrictions", f"{c.delivery_restrictions.default} by default"
         + (f", except {', '.join(c.delivery_restrictions.exceptions)}" if c.delivery_restrictions.exceptions else "")),
        ("Remote-triggered (ETRN/ATRN)", "yes" if d.remote_triggered else "no"),
        ("Schedule", f"{describe_schedule(d.schedule)} ({zone}): {opening(d.schedule, now, zone)}"),
    ]
    if d.oversize.threshold is not None:
        items.append(("Oversize window", f"messages over {format_size(d.oversize.threshold)}: "
                      f"{describe_schedule(d.oversize.schedule)}: {opening(d.oversize.schedule, now, zone)}"))
    if c.etrn is not None:
        items.append(("Asks the ISP", f"{c.etrn.command} {', '.join(c.etrn.domains)} at {c.etrn.server}"))
    grid = schedule_grid(f"grid{index}", d.schedule, now, zone)
    over = ""
    if d.oversize.threshold is not None and d.oversize.schedule is not None:
        over = ("<h3>Oversize schedule</h3>"
                + schedule_grid(f"grid{index}o", d.oversize.schedule, now, zone))
    return (f'<section class="props" id="connector-{index}"><h2>{esc(c.name)}</h2>{spaces}{_dl(items)}'
            f'<h3>Delivery schedule</h3><div class="chart-box">{grid}</div>{over}</section>')


def connectors_body(connectors: tuple[Connector, ...], now: float) -> str:
    if not connectors:
        return '<p class="empty">No connector is configured: mail for other domains goes by DNS MX.</p>'
    index = "".join(f'<li><a href="#connector-{i}">{esc(c.name)}</a></li>' for i, c in enumerate(connectors))
    return (f'<nav aria-label="Connectors"><ul class="toc">{index}</ul></nav>'
            + "".join(connector_section(i, c, now) for i, c in enumerate(connectors)))


def virtual_servers_body(servers: tuple[VirtualServer, ...], active: dict[str, float]) -> str:
    out = []
    for i, vs in enumerate(servers):
        listen = ", ".join(f"{a.host}:{a.port}" + (" (TLS)" if a.tls else "") for a in vs.listen)
        items = [
            ("Listens on", listen), ("Connections open now", f"{active.get(vs.name, 0):g}"),
            ("Largest message", format_size(vs.limits.max_message_size)),
            ("Recipients per message", vs.limits.max_recipients),
            ("Connections", f"at most {vs.limits.max_connections}"),
            ("Idle timeout", format_duration(vs.limits.timeout)),
            ("Relay allowed from", ", ".join(str(n) for n in vs.relay.allow) or "nobody"),
            ("Authenticated users may relay", "yes" if vs.relay.allow_authenticated else "no"),
            ("TLS", ("certificate " + vs.tls.certificate + (", required" if vs.tls.required else ""))
             if vs.tls.certificate else "no certificate"),
            ("AUTH", ("users file " + vs.auth.users + (", required" if vs.auth.required else "")) if vs.auth.users else "off"),
            ("Protocol log", vs.protocol_log.directory if vs.protocol_log.enabled else "off"),
            ("Smart host", vs.smart_host), ("ODMR (ATRN only)", "yes" if vs.odmr else None),
            ("DSN for untrusted clients", vs.dsn.untrusted),
        ]
        out.append(f'<section class="props" id="vs-{i}"><h2>{esc(vs.name)}</h2>{_dl(items)}</section>')
    return "".join(out)
