"""The console's page frame and the small formatting helpers every page uses.

Pages are plain server-rendered HTML: every value goes through :func:`esc`, forms carry the session's
CSRF token (:func:`csrf_field`), and the only script and stylesheet are the console's own static
files (``static/``), so nothing is fetched from elsewhere and a strict Content-Security-Policy holds.
"""
from __future__ import annotations

import html
import time
from typing import Iterable

from mta.config.values import human_duration

# (path, label): the navigation, in order
NAV: list[tuple[str, str]] = [("/dashboard", "Dashboard"), ("/queues", "Queues"), ("/connectors", "Connectors"),
                              ("/virtual-servers", "Virtual servers"), ("/diagnostics", "Diagnostics")]

# the queue actions, as the control socket names them (``delete_ndr`` is delete with ``dsn: true``)
ACTIONS: list[tuple[str, str]] = [
    ("retry", "Retry now"),
    ("requeue", "Requeue (the retry schedule starts over)"),
    ("hold", "Hold"),
    ("release", "Release"),
    ("delete", "Delete (no report)"),
    ("delete_ndr", "Delete and send an NDR to the sender"),
]


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def age(seconds: float | None) -> str:
    """An age as ``smtpgw queue list`` writes it (``45s``, ``12m``, ``3h05m``)."""
    return "" if seconds is None else human_duration(seconds)


def when(ts: float | None) -> str:
    """A Unix time as UTC wall-clock time."""
    if not ts:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def size(n: int | None) -> str:
    n = int(n or 0)
    for unit in ("bytes", "KB", "MB"):
        if n < 1024 or unit == "MB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def csrf_field(token: str) -> str:
    return f'<input type="hidden" name="csrf" value="{esc(token)}">'


def action_select(label: str, ident: str) -> str:
    """The action menu of a form, with a visible-to-screen-readers label."""
    options = "".join(f'<option value="{op}">{esc(text)}</option>' for op, text in ACTIONS)
    return (f'<label class="sr" for="{esc(ident)}">{esc(label)}</label>'
            f'<select name="op" id="{esc(ident)}">{options}</select>')


def table(caption: str, headers: Iterable[str], rows: Iterable[Iterable[str]], cls: str = "") -> str:
    """A data table; cells are HTML already escaped. Each cell carries its column's name so the
    phone layout can show it beside the value. The table sits in a box of its own that scrolls
    sideways when it is wider than the window (the page itself never does; the script lets the
    keyboard reach such a box)."""
    heads = list(headers)
    head = "".join(f'<th scope="col">{esc(h)}</th>' for h in heads)
    body = "".join(
        "<tr>" + "".join(f'<td data-label="{esc(h)}">{c}</td>' for h, c in zip(heads, row)) + "</tr>"
        for row in rows)
    return (f'<div class="table-box"><table class="{esc(cls)}"><caption>{esc(caption)}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


CLUSTER_NAV = ("/cluster", "Cluster")          # shown when gateway.cluster.redis is set


def page(title: str, body: str, *, user: str | None, csrf: str, hostname: str, current: str = "",
         notices: Iterable[str] = (), scripts: Iterable[str] = (),
         nav: Iterable[tuple[str, str]] = NAV) -> bytes:
    """A whole page: header with navigation and logout, the notices, the body."""
    if user is not None:
        links = "".join(
            f'<li><a href="{p}"{" aria-current=page" if p == current else ""}>{esc(text)}</a></li>'
            for p, text in nav)
        nav = (f'<nav aria-label="Main"><ul>{links}</ul></nav>'
               f'<form method="post" action="/logout" class="logout">{csrf_field(csrf)}'
               f'<span class="user">{esc(user)}</span> <button type="submit">Log out</button></form>')
    else:
        nav = ""
    notes = "".join(f'<p class="notice" role="status">{esc(n)}</p>' for n in notices)
    extra = "".join(f'<script src="{esc(s)}" defer></script>' for s in scripts)
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} - smtpgw {esc(hostname)}</title>"
        '<link rel="stylesheet" href="/static/console.css">'
        f'<script src="/static/console.js" defer></script>{extra}</head><body>'
        '<a class="skip" href="#main">Skip to the content</a>'
        f'<header><a class="brand" href="/">smtpgw <span>{esc(hostname)}</span></a>{nav}</header>'
        f'<main id="main" tabindex="-1"><h1>{esc(title)}</h1>{notes}{body}</main></body></html>'
    ).encode("utf-8")
