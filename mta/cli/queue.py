"""``smtpgw queue``: look at the queue and act on it, like Exchange's queue viewer or Postfix's
mailq/postqueue/postsuper.

    smtpgw queue list                         # id, sender, pending recipients, size, age, next attempt,
                                              # last error, why held
    smtpgw queue summary                      # messages by destination domain and age (qshape)
    smtpgw queue show ID                      # envelope, per-recipient state, headers
    smtpgw queue cat ID                       # the whole message (postcat -q)
    smtpgw queue retry ID... | --domain D | --all     # attempt now; the retry schedule is kept
    smtpgw queue requeue ID... | --domain D | --all   # attempt now, the retry schedule starts over
    smtpgw queue hold ID... | --domain D | --all      # no attempts until released
    smtpgw queue release ID... | --domain D | --all   # and attempt now
    smtpgw queue delete [--dsn] ID... | --domain D | --all   # --dsn: tell the sender (a failure DSN, 5.3.0)
    ... --json                                # the same as JSON, for scripts

    smtpgw queue list --cluster               # every node's messages (gateway.cluster), with a NODE column
    smtpgw queue hold mx2:ID ...              # NODE:ID acts on that node's message, through Redis
    smtpgw queue hold --domain D --cluster    # (or --all) on every node; a node that does not answer: exit 1

An ID may be given by any unique prefix of it. Printed into a pipe, ``list`` cuts no column.

With a running gateway every request goes through its control socket (mta/ops/control.py), so the tool
never races the queue manager. When the socket does not answer (the gateway is stopped) the tool
works on the spool files itself, in the formats of mta/spool/store.py with the same write-sync-rename
steps; changes then take effect when the gateway starts. The output is the same either way; the
JSON says which (``"gateway": "running"`` or ``"stopped"``).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import sys
import time
from datetime import datetime, timezone
from typing import Any

from mta.cli.output import escape_bytes
from mta.cli.main import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, add_config_option, command, load_config
from mta.config import Config
from mta.config.values import human_duration
from mta.ops.control import (
    DONE, HELD_SKIPPED, NOT_FOUND, UNCHANGED, corrupt_summary, detail, encode_message, selector, summary,
)
from mta.ops.trace import explain, text_lines
from mta.spool.traces import read_steps, trace_dir
from mta.cluster.commands import DEFAULT_TIMEOUT as NODE_TIMEOUT

CLIENT_TIMEOUT = 300.0      # a delete waits for an attempt in flight, which may wait on a slow host


class ControlError(Exception):
    """The gateway answered with an error, or answered nonsense."""


# -- talking to the running gateway ------------------------------------------------------------------

def ask(path: str, request: dict[str, Any], timeout: float = CLIENT_TIMEOUT) -> dict[str, Any] | None:
    """Send one request over the control socket; None when no gateway listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        sock.sendall(json.dumps(request).encode("utf-8") + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ControlError("the gateway closed the control connection without answering")
            buf += chunk
    except socket.timeout:
        raise ControlError(f"no answer on {path} within {timeout:g}s") from None
    finally:
        sock.close()
    try:
        reply = json.loads(buf)
    except ValueError as e:
        raise ControlError(f"bad answer from the gateway: {e}") from None
    if not isinstance(reply, dict):
        raise ControlError("bad answer from the gateway: not an object")
    return reply


# -- a stopped gateway: the spool files ----------------------------------------------------------------

class SpoolQueue:
    """The control requests, answered from the spool directory of a stopped gateway."""

    def __init__(self, config: Config) -> None:
        from mta.spool.store import Spool

        self.config = config
        self.spool = Spool(config.gateway.spool, reactor=_NoReactor())

    def _entries(self) -> list[Any]:
        if not os.path.isdir(self.spool.queue_dir):
            return []
        return self.spool.scan_sync()

    def _body(self, entry_id: str) -> bytes | None:
        try:
            return self.spool._read_body(self.spool._path(entry_id))
        except Exception:
            return None

    def _write_state(self, entry: Any) -> None:
        from mta.spool.store import encode_state
        from mta.spool.files import STATE_SUFFIX, write_synced

        final = self.spool._path(entry.id) + STATE_SUFFIX
        write_synced(self._tmp(entry.id + STATE_SUFFIX), final, [encode_state(entry)])
        self._sync_dir()

    def _tmp(self, name: str) -> str:
        os.makedirs(self.spool.tmp_dir, mode=0o700, exist_ok=True)
        return os.path.join(self.spool.tmp_dir, f"{name}.cli{os.getpid()}")

    def _sync_dir(self) -> None:
        from mta.spool.files import sync_directory

        sync_directory(self.spool.queue_dir)

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return getattr(self, "op_" + request["op"])(request)
        except (ValueError, KeyError) as e:
            return {"ok": False, "error": str(e)}

    def op_list(self, request: dict) -> dict[str, Any]:
        now = time.time()
        rows = [summary(e, now) for e in self._entries()]
        return {"ok": True, "entries": rows + [corrupt_summary(c, now) for c in self.spool.corrupt_messages_sync()]}

    def op_show(self, request: dict) -> dict[str, Any]:
        entry = next((e for e in self._entries() if e.id == request["id"]), None)
        if entry is None:
            return {"ok": False, "error": f"no message {request['id']!r} in the queue"}
        now = time.time()
        steps = read_steps(trace_dir(self.config.gateway.spool), entry.id)       # kept while it is queued
        return {"ok": True, "entry": detail(entry, now, self._body(entry.id), why=explain(self.config, entry, now, steps))}

    def _apply(self, request: dict, change: Any) -> dict[str, Any]:
        match = selector(request)
        entries = [e for e in self._entries() if match(e) and not e.is_done()]
        found = {e.id for e in entries}
        results = [{"id": i, "result": NOT_FOUND} for i in request.get("ids") or [] if i not in found]
        for e in entries:
            result = change(e)
            if result == DONE:
                self._write_state(e)
            results.append({"id": e.id, "result": result})
        return {"ok": True, "results": results}

    @staticmethod
    def _due_now(entry: Any) -> None:
        for r in entry.pending():
            r.next_attempt = 0.0

    def op_retry(self, request: dict) -> dict[str, Any]:
        def retry(e: Any) -> str:
            if e.extra.get("held"):
                return HELD_SKIPPED
            self._due_now(e)
            return DONE
        return self._apply(request, retry)

    def op_requeue(self, request: dict) -> dict[str, Any]:
        def requeue(e: Any) -> str:
            if e.extra.get("held"):
                return HELD_SKIPPED
            for r in e.pending():
                r.attempts, r.next_attempt, r.held_reason = 0, 0.0, None
            return DONE
        return self._apply(request, requeue)

    def op_cat(self, request: dict) -> dict[str, Any]:
        if not any(e.id == request["id"] for e in self._entries()):
            return {"ok": False, "error": f"no message {request['id']!r} in the queue"}
        body = self._body(request["id"])
        if body is None:
            return {"ok": False, "error": f"message {request['id']!r} cannot be read from the spool"}
        return {"ok": True, "id": request["id"], "message": encode_message(body)}

    def op_hold(self, request: dict) -> dict[str, Any]:
        def hold(e: Any) -> str:
            if e.extra.get("held"):
                return UNCHANGED
            e.extra["held"] = True
            return DONE
        return self._apply(request, hold)

    def op_release(self, request: dict) -> dict[str, Any]:
        def release(e: Any) -> str:
            if not e.extra.pop("held", None):
                return UNCHANGED
            self._due_now(e)
            return DONE
        return self._apply(request, release)

    def op_delete(self, request: dict) -> dict[str, Any]:
        from mta.queue.manager import deletion_report, wants_deletion_report

        from mta.spool.files import unlink_message

        entries = {e.id: e for e in self._entries()}
        results = []
        ids = request.get("ids") or [i for i, e in entries.items() if selector(request)(e)]
        for entry_id in ids:
            entry = entries.get(entry_id)
            if entry is None:
                results.append({"id": entry_id, "result": NOT_FOUND, "dsn": None})
                continue
            dsn_id = None
            if request.get("dsn") and wants_deletion_report(self.config, entry):
                to, report, extra = deletion_report(self.config, entry, self._body(entry_id), time.time())
                dsn_id = self._inject(to, report, extra)
            unlink_message(self.spool._path(entry_id))
            results.append({"id": entry_id, "result": DONE, "dsn": dsn_id})
        return {"ok": True, "results": results}

    def _inject(self, to: str, data: bytes, extra: dict[str, Any]) -> str:
        """Queue a message the way QueueManager.inject does, durable before the original goes."""
        from mta.model.envelope import new_id
        from mta.model.queue_entry import QueueEntry, RecipientState
        from mta.spool.store import encode_message_header
        from mta.spool.files import checksum, write_synced

        entry = QueueEntry(id=new_id(), sender="", rcpts=[RecipientState(to)], received_at=time.time(),
                           size=len(data), virtual_server="", peer_host="localhost", extra=extra)
        final = self.spool._path(entry.id)
        write_synced(self._tmp(entry.id), final, [encode_message_header(entry, len(data), checksum([data])), data])
        self._sync_dir()
        return entry.id


class _NoReactor:
    """The offline tool uses the spool's synchronous helpers only; nothing may need a reactor."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"smtpgw queue (offline) does not run a reactor (asked for {name})")


def run_request(config: Config, request: dict[str, Any]) -> dict[str, Any]:
    """Through the running gateway if there is one, else on the spool; adds ``gateway``."""
    reply = ask(config.gateway.control_socket_path, request)
    if reply is not None:
        reply["gateway"] = "running"
        return reply
    reply = _offline(config, request)
    reply["gateway"] = "stopped"
    return reply


def _offline(config: Config, request: dict[str, Any]) -> dict[str, Any]:
    """Work on the spool, holding the control socket's lock file (the one a starting gateway takes
    before it listens): if a gateway holds it without answering on the socket, refuse rather than
    change files under a running queue manager."""
    from twisted.python.lockfile import FilesystemLock

    path = config.gateway.control_socket_path
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        return SpoolQueue(config).handle(request)      # no spool yet: nothing to change, nothing to race
    lock = FilesystemLock(path + ".lock")
    if not lock.lock():
        raise ControlError(f"a gateway holds {path}.lock but does not answer on {path}; "
                           "is it starting or stopping? Try again, or check its log")
    try:
        return SpoolQueue(config).handle(request)
    finally:
        lock.unlock()


# -- text output --------------------------------------------------------------------------------------

def when_text(t: float | None, now: float, active: bool = False) -> str:
    if active:
        return "in delivery"
    if t is None:
        return "-"
    return "now" if t <= now else f"in {human_duration(t - now)}"


def timestamp(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _cut_text(text: str | None, width: int | None) -> str:
    """One line of at most ``width`` characters (None: the whole text, for pipes and scripts)."""
    text = " ".join((text or "-").split())
    return text if width is None or len(text) <= width else text[:width - 1] + "…"


def format_table(entries: list[dict[str, Any]], now: float, wide: bool = False) -> list[str]:
    """The ``list`` table; on a terminal long columns are cut, into a pipe (``wide``) nothing is."""
    header = ["ID", "SENDER", "PENDING", "SIZE", "AGE", "NEXT ATTEMPT", "LAST ERROR", "WHY HELD"]
    rows = []
    def _cut(text: str | None, width: int) -> str:
        return _cut_text(text, None if wide else width)

    for e in entries:
        pending = e["recipients_pending"]
        rcpts = f"{len(pending)}/{e['recipients_total']}"
        if pending:
            rcpts += " " + _cut(pending[0] + (f" +{len(pending) - 1}" if len(pending) > 1 else ""), 40)
        rows.append([e["id"], _cut(f"<{e['sender']}>" if e["sender"] is not None else "?", 40), rcpts, str(e["size"]), human_duration(e["age"]),
                     when_text(e["next_attempt"], now, e.get("active", False)), _cut(e["last_error"], 50),
                     _cut(e["why_held"], 40)])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    corrupt = sum(bool(e.get("corrupt")) for e in entries)
    queued = len(entries) - corrupt
    lines.append(f"{queued} message{'s' if queued != 1 else ''} in the queue"
                 + (f"; {corrupt} corrupt (never attempted again; their files are under the spool's "
                    "corrupt/, for the postmaster to inspect and remove)" if corrupt else ""))
    return lines


def format_detail(e: dict[str, Any], now: float) -> list[str]:
    lines = [
        f"id:          {e['id']}",
        f"sender:      <{e['sender']}>",
        f"received:    {timestamp(e['received_at'])} ({human_duration(e['age'])} ago) from {e['peer_host']}"
        + (f" (HELO {e['helo']})" if e.get("helo") else "")
        + (f" on {e['virtual_server']}" if e.get("virtual_server") else ""),
        f"size:        {e['size']} bytes",
    ]
    if e.get("authenticated_user"):
        lines.append(f"auth user:   {e['authenticated_user']}")
    if e.get("dsn"):
        lines.append(f"report:      a {e['dsn']} DSN about {e['extra'].get('about', '?')}")
    lines.append(f"next:        {when_text(e['next_attempt'], now, e.get('active', False))}")
    lines.append(f"held:        {e['why_held'] or 'no'}")
    lines.append("recipients:")
    for r in e["recipients"]:
        state = r["status"]
        if state == "pending":
            state += f", {r['attempts']} failed attempt{'s' if r['attempts'] != 1 else ''}, next " \
                     f"{when_text(r['next_attempt'], now) if not e['held'] else '(held)'}"
        lines.append(f"  <{r['address']}>  {state}")
        if r.get("last_error"):
            lines.append(f"      last error: {r['last_error']}")
        if r.get("last_hop"):
            lines.append(f"      last hop:   {r['last_hop']}")
        if r.get("held_reason"):
            lines.append(f"      waiting:    {r['held_reason']}")
    lines.append("headers:")
    lines += [f"  {name}: {value}" for name, value in e["headers"]] or ["  (message not readable)"]
    return lines + text_lines(e.get("why"), timestamp)


# qshape's age buckets, in minutes: a message older than the last is counted in a last "+" column
AGE_BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)


def shape(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Postfix's qshape: messages by destination domain (of their pending recipients) and age."""
    labels = [str(b) for b in AGE_BUCKETS] + [f"{AGE_BUCKETS[-1]}+"]
    rows: dict[str, list[int]] = {}
    total = [0] * len(labels)
    for e in entries:
        minutes = e["age"] / 60
        col = next((i for i, b in enumerate(AGE_BUCKETS) if minutes <= b), len(AGE_BUCKETS))
        total[col] += 1
        for domain in sorted({a.rpartition("@")[2].lower() or "(no domain)" for a in e["recipients_pending"]}):
            rows.setdefault(domain, [0] * len(labels))[col] += 1
    ordered = sorted(rows.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
    return {"buckets_minutes": labels,
            "total": {"messages": sum(total), "by_age": total},
            "domains": [{"domain": d, "messages": sum(c), "by_age": c} for d, c in ordered]}


def format_shape(s: dict[str, Any]) -> list[str]:
    header = ["", "T", *s["buckets_minutes"]]
    rows = [["TOTAL", str(s["total"]["messages"]), *map(str, s["total"]["by_age"])]]
    rows += [[d["domain"], str(d["messages"]), *map(str, d["by_age"])] for d in s["domains"]]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = [" ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in [header] + rows]
    lines.append("(messages by destination domain and age in minutes, as Postfix's qshape)")
    if s.get("shaping"):
        lines += ["", *format_shaping(s["shaping"], time.time())]
    return lines


def format_shaping(rows: list[dict[str, Any]], now: float) -> list[str]:
    """The destinations of ``gateway.shaping`` the running gateway has met, and how each is doing."""
    def limit(n: Any) -> str:
        return "-" if n is None else str(n)

    header = ["destination", "rule", "state", "connections", "in flight", "per minute", "sent", "back-offs"]
    table = [header]
    for r in rows:
        state = r["state"]
        if r.get("paused_until"):
            state += f" {max(0, r['paused_until'] - now):.0f}s"
        table.append([r["destination"], r["match"], state, f"{limit(r['connections'])}/{limit(r['max_connections'])}",
                      str(r["in_flight"]), limit(r["messages_per_minute"]), str(r["sent"]), str(r["back_offs"])])
    widths = [max(len(t[i]) for t in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip() for t in table]
    trouble = [f"  {r['destination']}: last slowed by {r['last_trouble']}" for r in rows
               if r["state"] != "normal" and r["last_trouble"]]
    return lines + trouble + ["(traffic shaping per destination: gateway.shaping)"]


def resolve_ids(config: Config, request: dict[str, Any]) -> dict[str, Any] | str:
    """Queue ids may be given by a unique prefix, as with Postfix's tools; an ambiguous one is an error."""
    key = "ids" if request.get("ids") else ("id" if "id" in request else None)
    if key is None:
        return request
    wanted = request[key] if key == "ids" else [request[key]]
    reply = run_request(config, {"op": "list"})
    known = [e["id"] for e in reply.get("entries", [])]
    full = []
    for w in wanted:
        matches = [w] if w in known else [k for k in known if k.startswith(w)]
        if len(matches) > 1:
            return (f"{w}: {len(matches)} queued messages have ids starting so ({', '.join(matches[:3])}"
                    f"{', ...' if len(matches) > 3 else ''}); give more of the id")
        full.append(matches[0] if matches else w)
    return {**request, key: full if key == "ids" else full[0]}


RESULT_TEXT = {
    "retry": {DONE: "will be attempted now", UNCHANGED: "nothing pending"},
    "requeue": {DONE: "will be attempted now, retry schedule started over", UNCHANGED: "nothing pending"},
    "hold": {DONE: "held", UNCHANGED: "was already held"},
    "release": {DONE: "released, will be attempted now", UNCHANGED: "was not held"},
    "delete": {DONE: "deleted", UNCHANGED: "unchanged"},
}


def format_results(op: str, results: list[dict[str, Any]], stopped: bool) -> list[str]:
    lines = []
    for r in results:
        text = RESULT_TEXT[op].get(r["result"], r["result"])
        if r["result"] == NOT_FOUND:
            text = "not in the queue"
        elif r["result"] == HELD_SKIPPED:
            text = "is held: release it first"
        if op == "delete" and r["result"] == DONE:
            text += f"; failure report queued as {r['dsn']}" if r.get("dsn") else "; no report sent"
        lines.append(f"{r['id']}: {text}")
    if not results:
        lines.append("no message matches")
    if stopped and any(r["result"] == DONE for r in results) and op != "delete":
        lines.append("(the gateway is not running: the spool was changed; it takes effect when it starts)")
    return lines


# -- the command ----------------------------------------------------------------------------------------

def _common(parser: argparse.ArgumentParser, top: bool) -> None:
    """``-c`` and ``--json`` are accepted before or after the action (``queue --json list``)."""
    if top:
        add_config_option(parser)
        parser.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    else:
        parser.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                            help="the gateway configuration")
        parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                            help="print JSON (for scripts)")


def _select_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ids", metavar="ID", nargs="*", help="queue ids (from `smtpgw queue list`); "
                        "NODE:ID for another node's (gateway.cluster)")
    parser.add_argument("--domain", metavar="D", help="every message with a pending recipient in domain D")
    parser.add_argument("--all", action="store_true", help="every message in the queue")
    parser.add_argument("--cluster", action="store_true",
                        help="with --domain or --all: on every node of the cluster (gateway.cluster)")


def _arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    p = sub.add_parser("list", help="one line per queued message")
    _common(p, top=False)
    p.add_argument("--cluster", action="store_true",
                   help="every node's messages (gateway.cluster), from the index each node keeps in Redis")
    p = sub.add_parser("show", help="envelope, per-recipient state and headers of one message")
    _common(p, top=False)
    p.add_argument("id", metavar="ID")
    p = sub.add_parser("cat", help="the whole message as queued (Postfix's postcat -q)")
    _common(p, top=False)
    p.add_argument("id", metavar="ID")
    p = sub.add_parser("summary", help="messages by destination domain and age (Postfix's qshape)")
    _common(p, top=False)
    for name, text in (("retry", "attempt now (the retry schedule is kept)"),
                       ("requeue", "attempt now, routed by today's configuration, retry schedule started over"),
                       ("hold", "attempt no more until released"),
                       ("release", "undo hold, and attempt now")):
        p = sub.add_parser(name, help=f"{text}: ID..., --domain D or --all")
        _common(p, top=False)
        _select_arguments(p)
    p = sub.add_parser("delete", help="remove messages from the queue (--dsn: send the sender a failure report)")
    _common(p, top=False)
    p.add_argument("--dsn", action="store_true",
                   help="send the sender a failure DSN (5.3.0, deleted by the administrator)")
    _select_arguments(p)


def _request(args: argparse.Namespace) -> dict[str, Any] | str:
    """The control request for the command line, or a usage error text."""
    if args.action in ("list", "summary"):
        return {"op": "list"}
    if args.action in ("show", "cat"):
        return {"op": args.action, "id": args.id}
    given = sum(bool(x) for x in (args.ids, args.domain, args.all))
    if given != 1:
        return f"{args.action}: name the messages with ID..., --domain D or --all (one of them)"
    if args.cluster and args.ids:
        return (f"{args.action}: --cluster goes with --domain D or --all; name another node's messages "
                "as NODE:ID")
    extra = {"dsn": args.dsn} if args.action == "delete" else {}
    if args.all:
        return {"op": args.action, "all": True, **extra}
    if args.domain:
        return {"op": args.action, "domain": args.domain, **extra}
    return {"op": args.action, "ids": args.ids, **extra}


@command("queue", "list, show, retry, hold, release or delete queued messages", _arguments)
def queue(args: argparse.Namespace) -> int:
    if not args.action:
        print("smtpgw queue: name an action: list, summary, show, cat, retry, requeue, hold, release, delete",
              file=sys.stderr)
        return EXIT_USAGE
    request = _request(args)
    if isinstance(request, str):
        print(f"smtpgw queue {request}", file=sys.stderr)
        return EXIT_USAGE
    config = load_config(args)
    if getattr(args, "cluster", False) or names_nodes(request):
        return cluster_queue(args, config, request)
    try:
        request = resolve_ids(config, request)
        if isinstance(request, str):
            print(f"smtpgw queue {args.action}: {request}", file=sys.stderr)
            return EXIT_USAGE
        reply = run_request(config, request)
    except (ControlError, OSError) as e:
        print(f"smtpgw queue: {e}", file=sys.stderr)
        return EXIT_FAILURE
    if args.action == "summary" and reply.get("ok"):
        reply = {"ok": True, "gateway": reply["gateway"], **shape(reply["entries"]),
                 "shaping": reply.get("shaping", [])}
    if args.action == "cat" and reply.get("ok") and not args.json:
        return _write_message(reply)
    if _print_reply(args, reply, lambda r: _lines(args.action, r, time.time())) != EXIT_OK:
        return EXIT_FAILURE
    # a named message that was not found, or was held and so not retried, is a failure for scripts
    named = bool(getattr(args, "ids", None))
    bad = [r for r in reply.get("results", [])
           if r["result"] == NOT_FOUND or (named and r["result"] == HELD_SKIPPED)]
    return EXIT_FAILURE if bad else EXIT_OK


def _lines(action: str, reply: dict[str, Any], now: float) -> list[str]:
    if action == "list":
        lines = format_table(reply["entries"], now, wide=not sys.stdout.isatty())
        if reply["gateway"] == "stopped":
            lines.append("(the gateway is not running: read from the spool)")
        return lines
    if action == "show":
        return format_detail(reply["entry"], now)
    if action == "summary":
        return format_shape(reply)
    return format_results(action, reply["results"], reply["gateway"] == "stopped")


def _write_message(reply: dict[str, Any]) -> int:
    """``cat``: the message's bytes as queued (line ends as the terminal expects; escaped on a terminal)."""
    sys.stdout.flush()
    message = base64.b64decode(reply["message"]).replace(b"\r\n", b"\n")
    sys.stdout.buffer.write(escape_bytes(message) if sys.stdout.isatty() else message)
    return EXIT_OK


# -- the cluster: every node's queue, and NODE:ID ------------------------------------------------------

def names_nodes(request: dict[str, Any]) -> bool:
    """Does the request name a message as ``NODE:ID`` (a queue id never holds a colon)?"""
    ids = request.get("ids") or ([request["id"]] if isinstance(request.get("id"), str) else [])
    return any(":" in i for i in ids)


def by_node(ids: list[str], own: str) -> dict[str, list[str]]:
    """``NODE:ID`` grouped by node, in the order given; a bare ID is this node's."""
    groups: dict[str, list[str]] = {}
    for qualified in ids:
        node, _, entry_id = qualified.rpartition(":")
        groups.setdefault(node or own, []).append(entry_id)
    return groups


def _ask_running(config: Config, request: dict[str, Any]) -> dict[str, Any]:
    reply = ask(config.gateway.control_socket_path, request)
    if reply is None:
        raise ControlError(f"the gateway is not running here (nothing answers on "
                           f"{config.gateway.control_socket_path}); --cluster and NODE:ID go through its "
                           "link to Redis: start it, or run the command on the node that holds the message")
    return reply


def _resolve_on(rows: list[dict[str, Any]], node: str, ids: list[str]) -> list[str] | str:
    """Prefixes of ``node``'s ids, resolved against the cluster view as :func:`resolve_ids` does locally."""
    known = [r["id"] for r in rows if r.get("node") == node]
    full = []
    for w in ids:
        matches = [w] if w in known else [k for k in known if k.startswith(w)]
        if len(matches) > 1:
            return f"{node}:{w}: {len(matches)} messages on {node} have ids starting so; give more of the id"
        full.append(matches[0] if matches else w)
    return full


def cluster_queue(args: argparse.Namespace, config: Config, request: dict[str, Any]) -> int:
    """``queue list --cluster``, ``--domain D --cluster``/``--all --cluster`` and ``NODE:ID``: through
    the running gateway's control socket, which reads the cluster's index or sends the request to the
    node that holds the message (every node, for a bulk action). This node's own messages are
    worked on locally, so ``NODE:ID`` naming this node works while Redis is down."""
    if not config.gateway.cluster.redis:
        print("smtpgw queue: --cluster and NODE:ID need a cluster (gateway.cluster.redis is not set)", file=sys.stderr)
        return EXIT_USAGE
    if args.action not in ("list", "show", "cat", "retry", "requeue", "hold", "release", "delete"):
        print(f"smtpgw queue {args.action}: not for the cluster; use list --cluster, or name messages "
              "as NODE:ID", file=sys.stderr)
        return EXIT_USAGE
    own = config.gateway.node_name
    try:
        if args.action == "list":
            view = _ask_running(config, {"op": "cluster_list"})
            return _print_reply(args, view, lambda r: format_cluster_table(r, time.time(), not sys.stdout.isatty()))
        if "ids" not in request and "id" not in request:
            return cluster_bulk(args, config, request)
        single = "id" in request
        groups = by_node([request["id"]] if single else request["ids"], own)
        view: dict[str, Any] | None = None
        results: list[dict[str, Any]] = []
        for node, ids in groups.items():
            if node == own:
                inner = resolve_ids(config, {**request, "id": ids[0]} if single else {**request, "ids": ids})
                if isinstance(inner, str):
                    print(f"smtpgw queue {args.action}: {inner}", file=sys.stderr)
                    return EXIT_USAGE
                reply = {**run_request(config, inner), "node": own}
            else:
                if view is None:
                    view = _ask_running(config, {"op": "cluster_list"})
                    if not view.get("ok"):
                        return _print_reply(args, view, lambda r: [])
                full = _resolve_on(view["entries"], node, ids)
                if isinstance(full, str):
                    print(f"smtpgw queue {args.action}: {full}", file=sys.stderr)
                    return EXIT_USAGE
                inner = {**request, "id": full[0]} if single else {**request, "ids": full}
                reply = _ask_running(config, {"op": "cluster_command", "node": node, "request": inner,
                                              "timeout": NODE_TIMEOUT})
            if not reply.get("ok") or single:
                return _single(args, reply)
            results += [{**r, "id": f"{node}:{r['id']}"} for r in reply.get("results", [])]
    except (ControlError, OSError) as e:
        print(f"smtpgw queue: {e}", file=sys.stderr)
        return EXIT_FAILURE
    reply = {"ok": True, "results": results, "gateway": "running"}
    code = _print_reply(args, reply, lambda r: format_results(args.action, r["results"], False))
    named_bad = [r for r in results if r["result"] in (NOT_FOUND, HELD_SKIPPED)]
    return EXIT_FAILURE if named_bad else code


def cluster_bulk(args: argparse.Namespace, config: Config, request: dict[str, Any]) -> int:
    """``--domain D --cluster`` or ``--all --cluster``: the request goes to every node (the control
    op ``cluster_each``, the same path as ``NODE:ID``); each result is named ``NODE:ID``, and a node
    that did not answer is named on stderr with exit 1 (the others have acted)."""
    reply = _ask_running(config, {"op": "cluster_each", "request": request, "timeout": NODE_TIMEOUT})
    if not reply.get("ok") and "nodes" not in reply:
        return _print_reply(args, reply, lambda r: [])
    results = [{**r, "id": f"{n['node']}:{r['id']}"} for n in reply["nodes"] for r in n.get("results", [])]
    failed = [n for n in reply["nodes"] if not n.get("ok")]
    if args.json:
        print(json.dumps({**reply, "results": results}, indent=2, sort_keys=True))
    else:
        lines = format_results(args.action, results, False)
        asked = [n["node"] for n in reply["nodes"] if n.get("ok")]
        lines.append(f"(on {len(asked)} node{'s' if len(asked) != 1 else ''}: {', '.join(asked) or 'none'})")
        print("\n".join(lines))
        for n in failed:
            print(f"smtpgw queue {args.action}: node {n['node']} did not act: {n.get('error', 'failed')}",
                  file=sys.stderr)
    return EXIT_FAILURE if failed else EXIT_OK


def _single(args: argparse.Namespace, reply: dict[str, Any]) -> int:
    """A show/cat answered by the node (or an error from any request)."""
    if args.action == "cat" and reply.get("ok") and not args.json:
        return _write_message(reply)
    return _print_reply(args, reply, lambda r: [f"node:        {r.get('node', '?')}"]
                        + format_detail(r["entry"], time.time()))


def _print_reply(args: argparse.Namespace, reply: dict[str, Any], lines: Any) -> int:
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
    if not reply.get("ok"):
        if not args.json:
            print(f"smtpgw queue: {reply.get('error', 'failed')}", file=sys.stderr)
        return EXIT_FAILURE
    if not args.json:
        print("\n".join(lines(reply)))
    return EXIT_OK


def format_cluster_table(reply: dict[str, Any], now: float, wide: bool = False) -> list[str]:
    """``queue list --cluster``: one line per message of every node; a node that stopped shows its
    last rows marked ``(gone)``: what it held when it was last seen."""
    header = ["NODE", "ID", "STATE", "SENDER", "PENDING", "SIZE", "AGE", "NEXT ATTEMPT", "LAST ERROR / WHY HELD"]
    rows = []
    for e in reply["entries"]:
        pending = e["recipients_pending"]
        rcpts = f"{len(pending)}/{e['recipients_total']}"
        if pending:
            rcpts += " " + _cut_text(pending[0] + (f" +{len(pending) - 1}" if len(pending) > 1 else ""),
                                     None if wide else 40)
        node = e["node"] + (" (gone)" if e.get("stale") else "")
        rows.append([node, e["id"], e["state"], _cut_text(f"<{e['sender']}>", None if wide else 40), rcpts,
                     str(e["size"]), human_duration(max(0.0, now - e["received_at"])),
                     when_text(e["next_attempt"], now, e["state"] == "active"),
                     _cut_text(e.get("why_held") or e.get("last_error"), None if wide else 50)])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    counts: dict[str, int] = {n["node"]: 0 for n in reply["nodes"]}
    for e in reply["entries"]:
        counts[e["node"]] = counts.get(e["node"], 0) + 1
    states = {n["node"]: n["state"] for n in reply["nodes"]}
    each = ", ".join(f"{n} {c}" + ("" if states.get(n, "gone") == "up" else f" ({states.get(n, 'gone')})")
                     for n, c in sorted(counts.items()))
    total = len(reply["entries"])
    lines.append(f"{total} message{'s' if total != 1 else ''} on {len(counts)} node{'s' if len(counts) != 1 else ''}"
                 + (f": {each}" if each else ""))
    return lines
