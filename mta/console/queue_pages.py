"""The Queue Viewer's pages: destinations, the messages of one, and one message.

Each function takes what the control socket answered and returns the page body (HTML); the web
layer (:mod:`mta.console.web`) asks, checks the login and wraps the body in the page frame.
"""
from __future__ import annotations

import base64
import time
from typing import Any
from urllib.parse import urlencode

from mta.console.html import action_select, age, csrf_field, esc, size, table, when
from mta.console.queues import CORRUPT, Destination, message_state

BODY_LIMIT = 1024 * 1024        # show at most this much of a message body in the page


def _state(state: str, why: str = "", next_attempt: float | None = None, now: float = 0.0) -> str:
    out = f'<span class="state state-{esc(state.split()[0] if state else "none")}">{esc(state)}</span>'
    if why:
        out += f'<span class="why">{esc(why)}</span>'
    if next_attempt and state == "retrying":
        out += f'<span class="next">next attempt in {esc(age(next_attempt - now))}</span>'
    return out


def _action_form(csrf: str, back: str, ident: str, label: str, hidden: dict[str, str]) -> str:
    fields = "".join(f'<input type="hidden" name="{esc(k)}" value="{esc(v)}">' for k, v in hidden.items())
    return (f'<form method="post" action="/action" class="act">{csrf_field(csrf)}{fields}'
            f'<input type="hidden" name="back" value="{esc(back)}">{action_select(label, ident)}'
            f'<button type="submit">Apply</button></form>')


def messages_link(domain: str) -> str:
    return "/messages?" + urlencode({"domain": domain})


def queues_body(rows: list[Destination], now: float, csrf: str) -> str:
    total = len({m["id"] for r in rows for m in r.messages})
    lines = []
    for i, r in enumerate(rows):
        if r.connector == CORRUPT:
            dest = f'<a href="/messages?corrupt=1">{len(r.messages)} damaged spool files</a>'
            actions = ""
        else:
            dest = f'<a href="{esc(messages_link(r.domain))}">{esc(r.domain)}</a>'
            actions = _action_form(csrf, "/queues", f"row{i}", f"Action for every message to {r.domain}",
                                   {"domain": r.domain})
        lines.append([esc(r.connector), dest, str(len(r.messages)), str(r.recipients),
                      esc(age(r.oldest_age)), _state(r.state, r.why, r.next_attempt, now), actions])
    if not rows:
        return '<p class="empty">The queue is empty: every message has been delivered.</p>'
    summary = (f'<p class="summary">{total} message{"s" if total != 1 else ""} queued for '
               f'{len(rows)} destination{"s" if len(rows) != 1 else ""} '
               f'(<a href="/messages">list them all</a>).</p>')
    return summary + table("Queued mail by connector and destination",
                           ["Connector", "Destination", "Messages", "Recipients", "Oldest", "State", "Action"],
                           lines, "queues")


def messages_body(entries: list[dict[str, Any]], now: float, csrf: str, back: str, domain: str | None) -> str:
    if not entries:
        return '<p class="empty">No message is queued here.</p><p><a href="/queues">Back to the queues</a></p>'
    lines = []
    for e in entries:
        ident = esc(e["id"])
        check = (f'<input type="checkbox" name="id" value="{ident}" id="sel-{ident}" form="selection">'
                 f'<label class="sr" for="sel-{ident}">Select message {ident}</label>')
        state = message_state(e)
        lines.append([check, f'<a href="/message?{esc(urlencode({"id": e["id"]}))}">{ident}</a>',
                      esc(e.get("sender") or "<>"), esc(", ".join(e.get("recipients_pending") or [])),
                      esc(size(e.get("size"))), esc(age(e.get("age"))),
                      _state(state, e.get("last_error") if state == "retrying" else (e.get("why_held") or ""),
                             e.get("next_attempt"), now)])
    selection = (f'<form method="post" action="/action" id="selection" class="act">{csrf_field(csrf)}'
                 f'<input type="hidden" name="back" value="{esc(back)}">'
                 f'{action_select("Action for the selected messages", "sel-op")}'
                 '<button type="submit">Apply to the selected messages</button></form>')
    select_all = ('<p class="select-all" hidden><input type="checkbox" id="select-all">'
                  '<label for="select-all">Select every message on this page</label></p>')
    whole = ""
    if domain:
        whole = ("<h2>Every message to this destination</h2>"
                 + _action_form(csrf, back, "dest-op", f"Action for every message to {domain}", {"domain": domain}))
    return (selection + select_all
            + table(f"{len(entries)} queued message{'s' if len(entries) != 1 else ''}",
                    ["Select", "Queue ID", "Sender", "Pending recipients", "Size", "Age", "State"], lines, "messages")
            + whole + '<p><a href="/queues">Back to the queues</a></p>')


def message_body(entry: dict[str, Any], now: float, csrf: str, body: bytes | None) -> str:
    ident = entry["id"]
    back = "/message?" + urlencode({"id": ident})
    dsn = entry.get("dsn") or {}
    envelope = [
        ("Queue ID", ident), ("Sender", entry.get("sender") or "<> (null sender)"),
        ("Received", f"{when(entry.get('received_at'))} ({age(entry.get('age'))} ago)"),
        ("Size", size(entry.get("size"))), ("Virtual server", entry.get("virtual_server")),
        ("Client", entry.get("peer_host")), ("HELO", entry.get("helo")),
        ("Authenticated user", entry.get("authenticated_user")),
        ("State", message_state(entry) + (f": {entry['why_held']}" if entry.get("why_held") else "")),
        ("DSN", ", ".join(f"{k}={v}" for k, v in dsn.items()) if isinstance(dsn, dict) else dsn),
        ("Delay notice sent", "yes" if entry.get("delay_notified") else "no"),
    ]
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in envelope if v not in (None, ""))
    rcpts = table("Recipients", ["Recipient", "Status", "Attempts", "Next attempt", "Last reply", "Last hop", "Held"],
                  [[esc(r.get("address")), f'<span class="state state-{esc(r.get("status"))}">{esc(r.get("status"))}</span>',
                    esc(r.get("attempts")),
                    esc(when(r.get("next_attempt")) if r.get("status") == "pending" and r.get("next_attempt") else ""),
                    esc(r.get("last_error")), esc(r.get("last_hop")), esc(r.get("held_reason"))]
                   for r in entry.get("recipients") or []], "recipients")
    headers = table("Headers", ["Name", "Value"],
                    [[esc(n), esc(v)] for n, v in entry.get("headers") or []], "headers")
    if body is None:
        shown = f'<p><a href="{esc(back)}&amp;body=1">Show the whole message</a></p>'
    else:
        text = body[:BODY_LIMIT].decode("utf-8", "replace")
        more = f"<p>(the first {BODY_LIMIT} of {len(body)} bytes)</p>" if len(body) > BODY_LIMIT else ""
        shown = f'<h2>The message as queued</h2>{more}<pre class="raw" tabindex="0">{esc(text)}</pre>'
    return (f'<dl class="envelope">{dl}</dl>'
            f'<h2>Act on this message</h2>{_action_form(csrf, back, "msg-op", "Action for this message", {"id": ident})}'
            f"{rcpts}{why_section(entry.get('why'), now)}{headers}{shown}"
            '<p><a href="/queues">Back to the queues</a></p>')


def clock(ts: float) -> str:
    """``18:46:23`` with the whole date and time as its tooltip (the steps of one message are close)."""
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
    return f'<time datetime="{iso}" title="{esc(when(ts))}">{iso[11:19]}</time>'


def why_section(why: dict[str, Any] | None, now: float) -> str:
    """The "why" trace (:func:`mta.ops.trace.explain`, as ``smtpgw queue show`` prints it): routing,
    holds, the replies received, and every recorded step."""
    if not why:
        return ""
    parts = ['<section id="why" aria-labelledby="why-h"><h2 id="why-h">Why: routing, holds, attempts</h2>']
    rows = []
    for route in why.get("routes") or []:
        rcpts = esc(", ".join(route["recipients"]))
        if route["local"]:
            rows.append([esc(route["domain"]), rcpts, "", "local domain: its Maildirs", "", ""])
        elif not route["connectors"]:
            rows.append([esc(route["domain"]), rcpts, "", "no connector's address space matches", "", ""])
        for n, c in enumerate(route["connectors"], 1):
            rows.append([esc(route["domain"]), rcpts, str(n), f"<strong>{esc(c['name'])}</strong><br>{esc(c['why'])}",
                         esc(c["next_hops"]), esc(c["window"])])
    parts.append(table("Routing: the connectors whose address spaces match, in the order tried",
                       ["Domain", "Recipients", "Order", "Connector and why", "Next hops", "Delivery window"],
                       rows, "routing"))
    if why.get("holds"):
        parts.append(table("Holds in force", ["Kind", "Until", "Reason", "Recipients"],
                           [[esc(h["kind"]), esc(when(h.get("until"))), esc(h["text"]),
                             esc(", ".join(h.get("recipients") or []))] for h in why["holds"]], "holds"))
    if why.get("attempts"):
        parts.append(table("Replies received, per attempt and recipient",
                           ["Time (UTC)", "Recipient", "Relay", "Status", "Reply", "TLS"],
                           [[clock(a["at"]), esc(a.get("recipient")), esc(a.get("relay")), esc(a.get("status")),
                             esc(a.get("reply")), esc(a.get("tls"))] for a in why["attempts"]], "attempts"))
    if not why.get("recorded"):
        parts.append('<p class="empty">No steps recorded: the gateway that holds this message is not running.</p>')
    elif why.get("steps"):
        parts.append(table("Every step recorded (mail log and diagnostic events; kept across restarts while the message is queued)",
                           ["Time (UTC)", "Source", "Step", "Details"],
                           [[clock(s["at"]), esc(s["source"]), esc(s["text"]),
                             esc(" ".join(f"{k}={v}" for k, v in (s.get("fields") or {}).items()))]
                            for s in why["steps"]], "steps"))
    else:
        parts.append('<p class="empty">No step recorded yet for this message (it has not been attempted since '
                     'it was queued).</p>')
    return "".join(parts) + "</section>"


def decode_message(answer: dict[str, Any]) -> bytes:
    return base64.b64decode(answer.get("message") or "")
