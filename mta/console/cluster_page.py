"""The Cluster page: every gateway sharing this one's Redis (``gateway.cluster``), as
``smtpgw cluster status`` lists them -- the same control request (``cluster``), answered from Redis by
:meth:`mta.cluster.node.Cluster.status` -- and, where the gateway keeps a cluster-wide queue index
(the ``cluster_list`` request of ``smtpgw queue list --cluster``), every node's queued messages, each
with the actions ``smtpgw queue hold NODE:ID`` offers; refreshed every few seconds without reloading
(a part holding the keyboard focus is left as it is until the focus leaves it).
"""
from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

from mta.console.html import action_select, age, csrf_field, esc, table, when

POLL_SECONDS = 5


def nodes_table(answer: dict[str, Any]) -> str:
    """The nodes (this one marked), or what keeps the console from listing them."""
    if not answer.get("ok"):
        return f'<p class="error" role="alert">The cluster cannot be listed: {esc(answer.get("error"))}</p>'
    now = answer.get("now") or time.time()
    rows = []
    for n in answer.get("nodes") or []:
        name = esc(n["node"]) + (' <span class="this">(this node)</span>' if n["node"] == answer.get("node") else "")
        beat = "never" if n.get("heartbeat") is None else f"{age(max(0.0, now - n['heartbeat']))} ago"
        state = esc(n.get("state") or "")
        rows.append([name, f'<span class="state state-{state.split()[0] if state else "none"}">{state}</span>',
                     f'<span title="{esc(when(n.get("heartbeat")))}">{esc(beat)}</span>',
                     esc("-" if n.get("queue") is None else n["queue"]),
                     esc("-" if n.get("leases") is None else n["leases"]),
                     esc(n.get("host") or "-"), esc(n.get("pid") or "-")])
    if not rows:
        return '<p class="empty">No node is registered in Redis yet.</p>'
    return table(f"{len(rows)} node{'s' if len(rows) != 1 else ''} in the cluster",
                 ["Node", "State", "Last heartbeat", "Queued messages", "Connection leases", "Host", "PID"],
                 rows, "nodes")


def row_actions(csrf: str, node: str, ident: str, n: int) -> str:
    """One message's action form: posted to ``/action`` with its node, which sends it as
    ``smtpgw queue hold NODE:ID`` does (the control request ``cluster_command``)."""
    return (f'<form method="post" action="/action" class="act">{csrf_field(csrf)}'
            f'<input type="hidden" name="node" value="{esc(node)}"><input type="hidden" name="id" value="{esc(ident)}">'
            '<input type="hidden" name="back" value="/cluster">'
            f'{action_select(f"Action for message {ident} on {node}", f"cq{n}")}'
            '<button type="submit">Apply</button></form>')


def queue_table(listed: dict[str, Any] | None, now: float, csrf: str = "") -> str:
    """Every node's queued messages (the control request ``cluster_list``, from the index each node
    keeps in Redis); this node's link to their pages; with ``csrf``, each row's action form (retry,
    requeue, hold, release, delete on the node that holds it). Empty when the gateway has no such view."""
    if listed is None:
        return ""
    if not listed.get("ok"):
        return f'<p class="error" role="alert">The cluster\'s queue cannot be listed: {esc(listed.get("error"))}</p>'
    entries = listed.get("entries") or []
    if not entries:
        return '<p class="empty">No message is queued on any node.</p>'
    this = listed.get("node")
    rows = []
    for n, e in enumerate(entries):
        ident = esc(e.get("id"))
        link = f'<a href="/message?{esc(urlencode({"id": e.get("id") or ""}))}">{ident}</a>' if e.get("node") == this else ident
        state = esc(e.get("state") or "")
        rows.append([esc(e.get("node")) + (" (stale: the node is gone)" if e.get("stale") else ""), link,
                     esc(e.get("sender") or "<>"), esc(", ".join(e.get("recipients_pending") or [])),
                     f'<span class="state state-{state or "none"}">{state}</span>',
                     esc(age(max(0.0, now - (e.get("received_at") or now)))),
                     esc(e.get("last_error") or e.get("why_held") or "")]
                    + ([row_actions(csrf, e.get("node") or "", e.get("id") or "", n)] if csrf else []))
    return table(f"{len(entries)} message{'s' if len(entries) != 1 else ''} queued on the cluster's nodes",
                 ["Node", "Queue ID", "Sender", "Pending recipients", "State", "Age", "Last error or hold"]
                 + (["Action"] if csrf else []), rows, "cluster-queue")


def cluster_body(answer: dict[str, Any], redis: str, now: float, listed: dict[str, Any] | None = None,
                 csrf: str = "") -> str:
    return (f'<p class="summary">The gateways sharing <code>{esc(redis)}</code>, as '
            '<code>smtpgw cluster status</code> lists them. A node that stops sending heartbeats (every 5 s) '
            'shows <em>gone</em> once its entry expires (15 s).</p>'
            f'<div data-poll="/cluster.json" data-every="{POLL_SECONDS}">'
            f'<p class="updated" id="updated" aria-live="polite">Updated {esc(time.strftime("%H:%M:%S UTC", time.gmtime(now)))}</p>'
            f'<div data-chart="nodes">{nodes_table(answer)}</div>'
            + (f'<h2>Queued on every node</h2><div data-chart="queue">{queue_table(listed, now, csrf)}</div>'
               if listed is not None else "") + '</div>')
