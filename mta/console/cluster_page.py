"""The Cluster page: every gateway sharing this one's Redis (``gateway.cluster``), as
``smtpgw cluster status`` lists them -- the same control request (``cluster``), answered from Redis by
:meth:`mta.cluster.node.Cluster.status` -- and, where the gateway keeps a cluster-wide queue index
(the ``cluster_list`` request of ``smtpgw queue list --cluster``), every node's queued messages;
refreshed every few seconds without reloading.
"""
from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

from mta.console.html import age, esc, table, when

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


def queue_table(listed: dict[str, Any] | None, now: float) -> str:
    """Every node's queued messages (the control request ``cluster_list``, from the index each node
    keeps in Redis); this node's link to their pages. Empty when the gateway has no such view."""
    if listed is None:
        return ""
    if not listed.get("ok"):
        return f'<p class="error" role="alert">The cluster\'s queue cannot be listed: {esc(listed.get("error"))}</p>'
    entries = listed.get("entries") or []
    if not entries:
        return '<p class="empty">No message is queued on any node.</p>'
    this = listed.get("node")
    rows = []
    for e in entries:
        ident = esc(e.get("id"))
        link = f'<a href="/message?{esc(urlencode({"id": e.get("id") or ""}))}">{ident}</a>' if e.get("node") == this else ident
        state = esc(e.get("state") or "")
        rows.append([esc(e.get("node")) + (" (stale: the node is gone)" if e.get("stale") else ""), link,
                     esc(e.get("sender") or "<>"), esc(", ".join(e.get("recipients_pending") or [])),
                     f'<span class="state state-{state or "none"}">{state}</span>',
                     esc(age(max(0.0, now - (e.get("received_at") or now)))),
                     esc(e.get("last_error") or e.get("why_held") or "")])
    return table(f"{len(entries)} message{'s' if len(entries) != 1 else ''} queued on the cluster's nodes",
                 ["Node", "Queue ID", "Sender", "Pending recipients", "State", "Age", "Last error or hold"],
                 rows, "cluster-queue")


def cluster_body(answer: dict[str, Any], redis: str, now: float, listed: dict[str, Any] | None = None) -> str:
    return (f'<p class="summary">The gateways sharing <code>{esc(redis)}</code>, as '
            '<code>smtpgw cluster status</code> lists them. A node that stops sending heartbeats (every 5 s) '
            'shows <em>gone</em> once its entry expires (15 s).</p>'
            f'<div data-poll="/cluster.json" data-every="{POLL_SECONDS}">'
            f'<p class="updated" id="updated" aria-live="polite">Updated {esc(time.strftime("%H:%M:%S UTC", time.gmtime(now)))}</p>'
            f'<div data-chart="nodes">{nodes_table(answer)}</div>'
            + (f'<h2>Queued on every node</h2><div data-chart="queue">{queue_table(listed, now)}</div>'
               if listed is not None else "") + '</div>')
