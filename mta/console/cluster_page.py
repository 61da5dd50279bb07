"""The Cluster page: every gateway sharing this one's Redis (``gateway.cluster``), as
``smtpgw cluster status`` lists them -- the same control request (``cluster``), answered from Redis by
:meth:`mta.cluster.node.Cluster.status` -- refreshed every few seconds without reloading.
"""
from __future__ import annotations

import time
from typing import Any

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


def cluster_body(answer: dict[str, Any], redis: str, now: float) -> str:
    return (f'<p class="summary">The gateways sharing <code>{esc(redis)}</code>, as '
            '<code>smtpgw cluster status</code> lists them. A node that stops sending heartbeats (every 5 s) '
            'shows <em>gone</em> once its entry expires (15 s).</p>'
            f'<div data-poll="/cluster.json" data-every="{POLL_SECONDS}">'
            f'<p class="updated" id="updated" aria-live="polite">Updated {esc(time.strftime("%H:%M:%S UTC", time.gmtime(now)))}</p>'
            f'<div data-chart="nodes">{nodes_table(answer)}</div></div>')
