"""``smtpgw cluster``: the gateways sharing one Redis (``gateway.cluster``), as this node sees them.

    smtpgw cluster status [--json]      # each node: state, last heartbeat, queue size, host, pid

The running gateway answers through its control socket (mta/ops/control.py ``cluster``), from Redis.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from mta.cli.main import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, add_config_option, command, load_config
from mta.cli.queue import ControlError, ask


def _arguments(parser: argparse.ArgumentParser) -> None:
    add_config_option(parser)
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    p = sub.add_parser("status", help="every node: state, last heartbeat, queue size")
    p.add_argument("--json", action="store_true", help="print JSON (for scripts)")


def format_status(reply: dict[str, Any]) -> list[str]:
    now = reply.get("now") or time.time()
    table = [["node", "state", "heartbeat", "queue", "leases", "host", "pid"]]
    for n in reply["nodes"]:
        beat = "-" if n["heartbeat"] is None else f"{max(0.0, now - n['heartbeat']):.0f}s ago"
        mark = " (this node)" if n["node"] == reply["node"] else ""
        table.append([n["node"] + mark, n["state"], beat, "-" if n["queue"] is None else str(n["queue"]),
                      "-" if n.get("leases") is None else str(n["leases"]),
                      n["host"] or "-", str(n["pid"] or "-")])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]


@command("cluster", "the gateways sharing this one's Redis (gateway.cluster): status", _arguments)
def cluster(args: argparse.Namespace) -> int:
    if getattr(args, "action", None) != "status":
        print("smtpgw cluster: name an action: status", file=sys.stderr)
        return EXIT_USAGE
    config = load_config(args)
    if not config.gateway.cluster.redis:
        print("smtpgw cluster: this gateway is not in a cluster (set gateway.cluster.redis)", file=sys.stderr)
        return EXIT_FAILURE
    try:
        reply = ask(config.gateway.control_socket_path, {"op": "cluster"}, timeout=30.0)
    except (ControlError, OSError) as e:
        print(f"smtpgw cluster: {e}", file=sys.stderr)
        return EXIT_FAILURE
    if reply is None:
        print(f"smtpgw cluster: the gateway is not running (nothing answers on "
              f"{config.gateway.control_socket_path}); start it first", file=sys.stderr)
        return EXIT_FAILURE
    if not reply.get("ok"):
        print(f"smtpgw cluster: {reply.get('error', 'failed')}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
    else:
        print("\n".join(format_status(reply)))
    return EXIT_OK
