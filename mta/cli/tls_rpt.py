"""``smtpgw tls-rpt``: TLS reporting (RFC 8460, ``gateway.tls_rpt``).

    smtpgw tls-rpt show [--json]     # the sessions counted so far in this period, per policy
    smtpgw tls-rpt send [--json]     # end the period now and send its reports

A running gateway answers through its control socket (mta/ops/control.py ``tls_rpt_show``,
``tls_rpt_send``); ``show`` on a stopped gateway reads the counts it saved under ``<spool>/tls-rpt``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from mta.cli.main import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, add_config_option, command, load_config
from mta.cli.queue import ControlError, ask
from mta.delivery.tls_report import merge_periods, read_current, rfc3339, summary_rows

SEND_TIMEOUT = 300.0        # DNS lookups and POSTs for every domain


def _arguments(parser: argparse.ArgumentParser) -> None:
    add_config_option(parser)
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    p = sub.add_parser("show", help="the TLS sessions counted so far in this period, per policy")
    p.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    p = sub.add_parser("send", help="end the period now and send its reports")
    p.add_argument("--json", action="store_true", help="print JSON (for scripts)")


def format_counts(period: dict[str, Any], now: float) -> list[str]:
    rows = summary_rows(period)
    begin = period.get("begin")
    head = f"TLS-RPT period from {rfc3339(begin) if begin else '-'} to {rfc3339(now)} (so far)"
    if not rows:
        return [head, "no sessions under a destination's TLS policy yet"]
    table = [["policy domain", "type", "mx", "successful", "failed", "failures"]]
    for r in rows:
        failures = ", ".join(f"{k}={v}" for k, v in sorted(r["failures"].items())) or "-"
        table.append([r["policy_domain"], r["policy_type"], " ".join(r["mx_host"]) or "-",
                      str(r["successful"]), str(r["failed"]), failures])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [head] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]


def format_sent(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return ["nothing to report: no sessions under a destination's TLS policy in this period"]
    return [f"{r['domain']}: {r['rua'] or '-'}: {r['result']}" for r in results]


@command("tls-rpt", "TLS reporting (RFC 8460, gateway.tls_rpt): show the counts, send the reports now",
         _arguments)
def tls_rpt(args: argparse.Namespace) -> int:
    action = getattr(args, "action", None)
    if action not in ("show", "send"):
        print("smtpgw tls-rpt: name an action: show or send", file=sys.stderr)
        return EXIT_USAGE
    config = load_config(args)
    if not config.gateway.tls_rpt.enabled:
        print("smtpgw tls-rpt: TLS reporting is off: set gateway.tls_rpt.enabled: true", file=sys.stderr)
        return EXIT_FAILURE
    path = config.gateway.control_socket_path
    try:
        reply = ask(path, {"op": f"tls_rpt_{action}"}, timeout=SEND_TIMEOUT if action == "send" else 30.0)
    except (ControlError, OSError) as e:
        print(f"smtpgw tls-rpt: {e}", file=sys.stderr)
        return EXIT_FAILURE
    if reply is None:
        if action == "send":
            print(f"smtpgw tls-rpt: the gateway is not running (nothing answers on {path}); start it: it "
                  "sends what was counted", file=sys.stderr)
            return EXIT_FAILURE
        reply = {"ok": True, "period": merge_periods(read_current(config.gateway.tls_rpt_directory)),
                 "now": time.time(), "running": False}
    if not reply.get("ok"):
        print(f"smtpgw tls-rpt: {reply.get('error', 'failed')}", file=sys.stderr)
        return EXIT_FAILURE
    if action == "show":
        if args.json:
            print(json.dumps({"begin": reply["period"].get("begin"), "now": reply.get("now"),
                              "policies": summary_rows(reply["period"])}, indent=2, sort_keys=True))
        else:
            print("\n".join(format_counts(reply["period"], reply.get("now") or time.time())))
        return EXIT_OK
    if args.json:
        print(json.dumps(reply["results"], indent=2, sort_keys=True))
    else:
        print("\n".join(format_sent(reply["results"])))
    return EXIT_OK
