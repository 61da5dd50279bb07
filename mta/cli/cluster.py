"""``smtpgw cluster``: the gateways sharing one Redis (``gateway.cluster``), as this node sees them.

    smtpgw cluster status [--json]      # each node: state, last heartbeat, queue size, host, pid
    smtpgw cluster drain [NODE] [--wait [--timeout S]]   # refuse new connections (421 4.3.2), deliver,
                                                          # report when empty
    smtpgw cluster undrain [NODE]       # back in service

The running gateway answers through its control socket (mta/ops/control.py ``cluster``), from Redis;
a drain of another node goes to that node through Redis (mta/cluster/commands.py). Without NODE, or
with this gateway's own name, drain works on a single machine too (no cluster needed).
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
    p = sub.add_parser("drain", help="refuse new connections with 421 4.3.2, deliver what the node holds")
    p.add_argument("node", metavar="NODE", nargs="?", help="the node (default: this one)")
    p.add_argument("--wait", action="store_true", help="wait until its queue is empty")
    p.add_argument("--timeout", type=float, default=0.0, metavar="S",
                   help="with --wait: give up after S seconds (exit 1); default: wait as long as it takes")
    p.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    p = sub.add_parser("undrain", aliases=["resume"], help="accept connections again")
    p.add_argument("node", metavar="NODE", nargs="?", help="the node (default: this one)")
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


def drain_text(reply: dict[str, Any]) -> str:
    held = f" ({reply['held']} held: they leave only when released, triggered or expired)" if reply.get("held") else ""
    count = reply["messages"]
    if count is None:
        count = f"? (not counted: {reply.get('count_error')})"
    if reply["state"] == "up":
        return f"{reply['node']}: in service, accepting connections; {count} messages queued"
    if reply["state"] == "drained":
        return f"{reply['node']}: drained, its queue is empty; new connections get 421 4.3.2"
    return f"{reply['node']}: draining, new connections get 421 4.3.2; {count} messages left{held}"


def _control(config: Any, request: dict[str, Any], node: str | None) -> dict[str, Any]:
    """``request`` answered by this node, or by ``node`` through the cluster's Redis."""
    own = config.gateway.node_name
    if node and node != own:
        if not config.gateway.cluster.redis:
            raise ControlError(f"{node} is not this gateway ({own}), and this one is not in a cluster "
                               "(gateway.cluster.redis is not set)")
        request = {"op": "cluster_command", "node": node, "request": request}
    reply = ask(config.gateway.control_socket_path, request, timeout=60.0)
    if reply is None:
        raise ControlError(f"the gateway is not running (nothing answers on "
                           f"{config.gateway.control_socket_path}); start it first")
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "failed"))
    return reply


def drain(args: argparse.Namespace, config: Any) -> int:
    op = "drain" if args.action == "drain" else "undrain"
    reply = _control(config, {"op": op}, args.node)
    if args.json and not getattr(args, "wait", False):
        print(json.dumps(reply, indent=2, sort_keys=True))
        return EXIT_OK
    if not args.json:
        print(drain_text(reply) if reply["changed"] or op == "drain" else
              f"{reply['node']} was not draining; " + drain_text(reply))
    if op == "undrain" or not args.wait:
        return EXIT_OK
    deadline = time.monotonic() + args.timeout if args.timeout > 0 else None
    last = reply["messages"]
    while reply["state"] != "drained":
        if deadline is not None and time.monotonic() >= deadline:
            print(f"smtpgw cluster drain: {reply['node']} still holds {reply['messages']} messages after "
                  f"{args.timeout:g}s; it goes on draining (undrain to stop)", file=sys.stderr)
            return EXIT_FAILURE
        time.sleep(WAIT_POLL)
        reply = _control(config, {"op": "drain_status"}, args.node)
        if reply["state"] == "up":
            print(f"smtpgw cluster drain: {reply['node']} was put back in service meanwhile", file=sys.stderr)
            return EXIT_FAILURE
        if reply["messages"] != last and not args.json:
            print(drain_text(reply), flush=True)
            last = reply["messages"]
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
    elif last:
        print(drain_text(reply))
    return EXIT_OK


WAIT_POLL = 1.0


@command("cluster", "the gateways sharing this one's Redis (gateway.cluster): status, drain, undrain", _arguments)
def cluster(args: argparse.Namespace) -> int:
    action = getattr(args, "action", None)
    if action not in ("status", "drain", "undrain", "resume"):
        print("smtpgw cluster: name an action: status, drain, undrain", file=sys.stderr)
        return EXIT_USAGE
    config = load_config(args)
    if action != "status":
        try:
            return drain(args, config)
        except (ControlError, OSError) as e:
            print(f"smtpgw cluster {action}: {e}", file=sys.stderr)
            return EXIT_FAILURE
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
