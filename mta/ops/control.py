"""The control socket: how ``smtpgw queue`` works on a running gateway without racing it.

The daemon owns the queue: only it may change a queued message while it runs, because its queue
manager holds every entry in memory and writes their states back after each attempt. So the tool
does not touch the spool of a running gateway; it asks the daemon, over a UNIX stream socket
(``gateway.control_socket``, default ``<spool>/control.sock``, mode 0600, so only the daemon's user
and root may use it), and the daemon does the work in its reactor thread like any other queue event.

Protocol: one JSON object per line in each direction, one reply per request, in order::

    {"op": "list"}                                  -> {"ok": true, "entries": [SUMMARY, ...]}
    {"op": "show", "id": ID}                        -> {"ok": true, "entry": DETAIL} (with ``why``: the
                                                       trace of mta/ops/trace.py)
    {"op": "retry" | "hold" | "release", "ids": [ID, ...]} or {"domain": D} or {"all": true}
                                                    -> {"ok": true, "results": [{"id", "result"}, ...]}
    {"op": "delete", "ids": [ID, ...] or "domain" or "all", "dsn": bool}
                                                    -> {"ok": true, "results": [{"id", "result", "dsn"}]}
    {"op": "requeue", "ids": [ID, ...]} or {"all": true} -> like retry, and the retry schedule starts over
    {"op": "cat", "id": ID}                         -> {"ok": true, "message": BASE64}
    {"op": "pickup"}                                -> {"ok": true} (the maildrop is read now)
    {"op": "ping"}                                  -> {"ok": true, "hostname": ..., "pid": ...}
    {"op": "trigger", "trigger": {...}}             -> {"ok": true, "released": N}   (between workers:
    {"op": "hand_over", "request": {...}}           -> {"ok": true, "ids": [...]}     mta.cluster.triggers)
    {"op": "take_in", "transfer": T, "worker": i}   -> {"ok": true, "id": ID}  (between nodes, for ATRN:
                                                       mta.cluster.handover)
    {"op": "adopt", "ids": [ID, ...]}               -> {"ok": true, "ids": [...]}
    {"op": "metrics"}                               -> {"ok": true, "families": [...]} (this process's
                                                       Prometheus figures: worker 0 adds them up)
    {"op": "tls_rpt_show"}                          -> {"ok": true, "period": COUNTS} (TLS-RPT counts so far)
    {"op": "tls_rpt_send"}                          -> {"ok": true, "results": [{"domain", "rua", "result"}]}
    {"op": "tls_rpt_close"}                         -> {"ok": true} (one worker's period ends now)
    {"op": "drain" | "undrain" | "drain_status"}    -> {"ok": true, "node", "state", "changed", "since",
                                                       "messages", "held"} (mta/ops/drain.py)
    {"op": "cluster"}                               -> {"ok": true, "node", "nodes": [...]} (cluster status)
    {"op": "cluster_list"}                          -> {"ok": true, "node", "nodes", "entries": [ROW, ...]}
                                                       (every node's queue, mta/cluster/queue_index.py)
    {"op": "cluster_command", "node": N, "request": {...}, "timeout": s}
                                                    -> node N's answer to the request (one of the ops
                                                       above it takes from other nodes, through Redis)
    {"op": "cluster_each", "request": {...}, "timeout": s}
                                                    -> {"ok": every node answered, "nodes": [{"node",
                                                       "ok", "results" | "error"}, ...]} (a bulk
                                                       retry/requeue/hold/release/delete on every node)

An error is ``{"ok": false, "error": TEXT}``, whatever the request was: bad JSON (also nested too deeply
for the parser), a value of the wrong type, an unknown op. SUMMARY and DETAIL are built by :func:`summary` and
:func:`detail`, which ``smtpgw queue`` also uses on a stopped gateway's spool, so the output is the
same either way.
"""
from __future__ import annotations

import base64
import json
import os
import stat
import time
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from mta.cluster.commands import DEFAULT_TIMEOUT, REMOTE_OPS, NodeNotAnswering, ask_node
from mta.cluster.queue_index import cluster_queue
from mta.cluster.redis import Unavailable
from mta.dsn.reports import header_block
from mta.model.queue_entry import QueueEntry
from mta.ops.trace import explain

log = Logger(namespace="smtpgw.control")

MAX_REQUEST = 64 * 1024
ADMIN_HOLD = "held by the administrator"
TLS_RPT_OFF = "TLS reporting is off: set gateway.tls_rpt.enabled: true"

# what ``cluster_each`` takes to every node (``smtpgw queue ... --cluster``)
BULK_OPS = frozenset({"retry", "requeue", "hold", "release", "delete"})

# results per entry
NOT_FOUND, DONE, UNCHANGED, HELD_SKIPPED = "not found", "done", "unchanged", "held (release it first)"


# -- what the tool shows (shared with the offline path in mta/cli/queue.py) --------------------------

def why_held(entry: QueueEntry) -> str | None:
    """The administrator's hold, else the first reason a recipient waits besides retry (schedule,
    remote-triggered delivery)."""
    if entry.extra.get("held"):
        return ADMIN_HOLD
    for r in entry.pending():
        if r.held_reason:
            return r.held_reason
    return None


def next_attempt(entry: QueueEntry) -> float | None:
    """The earliest retry time of a pending recipient; None when held or nothing is pending."""
    pending = entry.pending()
    if entry.extra.get("held") or not pending:
        return None
    return min(r.next_attempt for r in pending)


def last_error(entry: QueueEntry) -> str | None:
    for r in entry.pending() + entry.rcpts:
        if r.last_error:
            return r.last_error
    return None


def encode_message(data: bytes | list[bytes]) -> str:
    """A message for a JSON reply: base64 of its bytes as queued."""
    raw = data if isinstance(data, (bytes, bytearray)) else b"".join(data)
    return base64.b64encode(raw).decode("ascii")


def summary(entry: QueueEntry, now: float, active: bool = False) -> dict[str, Any]:
    """One row of ``smtpgw queue list``."""
    pending = entry.pending()
    return {
        "id": entry.id,
        "sender": entry.sender,
        "recipients_pending": [r.address for r in pending],
        "recipients_total": len(entry.rcpts),
        "size": entry.size,
        "received_at": entry.received_at,
        "age": max(0.0, now - entry.received_at),
        "next_attempt": next_attempt(entry),
        "last_error": last_error(entry),
        "held": bool(entry.extra.get("held")),
        "why_held": why_held(entry),
        "active": active,
        "dsn": entry.extra.get("dsn"),
    }


def corrupt_summary(message: Any, now: float) -> dict[str, Any]:
    """A row of ``smtpgw queue list`` for a message in the spool's ``corrupt/`` area
    (a :class:`mta.spool.store.CorruptMessage`): never attempted again, shown so that it is not lost
    from sight."""
    entry = message.entry
    reason = (entry.extra.get("corrupt") if entry is not None else None) or "unreadable spool file"
    row = summary(entry, now) if entry is not None else {
        "id": message.id, "sender": None, "recipients_pending": [], "recipients_total": 0, "size": 0,
        "received_at": message.since, "age": max(0.0, now - message.since), "last_error": None,
        "held": False, "active": False, "dsn": None}
    row.update({"next_attempt": None, "why_held": f"corrupt: {reason}", "corrupt": True,
                "files": [f"corrupt/{name}" for name in message.files]})
    return row


def parse_headers(message: bytes | None) -> list[list[str]]:
    """``[[name, value], ...]`` of the message's header section, unfolded, as text (8-bit as latin-1)."""
    out: list[list[str]] = []
    for line in header_block(message).split(b"\r\n"):
        if not line:
            continue
        text = line.decode("utf-8", "replace")
        if text[:1] in (" ", "\t") and out:
            out[-1][1] += " " + text.strip()
        elif ":" in text:
            name, _, value = text.partition(":")
            out.append([name.strip(), value.strip()])
    return out


def detail(entry: QueueEntry, now: float, message: bytes | None, active: bool = False,
           why: dict[str, Any] | None = None) -> dict[str, Any]:
    """``smtpgw queue show``: the summary, the whole envelope, every recipient's state, the headers,
    and ``why`` (:func:`mta.ops.trace.explain`): its routing, holds, attempts and recorded steps."""
    doc = summary(entry, now, active)
    doc.update({
        "virtual_server": entry.virtual_server,
        "peer_host": entry.peer_host,
        "helo": entry.helo,
        "authenticated_user": entry.authenticated_user,
        "delay_notified": entry.delay_notified,
        "extra": entry.extra,
        "recipients": [vars(r).copy() for r in entry.rcpts],
        "headers": parse_headers(message),
        "why": why,
    })
    return doc


def selector(request: dict[str, Any]) -> Callable[[QueueEntry], bool]:
    """The entries a retry/hold/release request names: ``ids``, a recipient ``domain``, or ``all``."""
    if request.get("all") is True:
        return lambda e: True
    domain = request.get("domain")
    if isinstance(domain, str) and domain:
        d = domain.lower().rstrip(".")
        return lambda e: any(r.address.rpartition("@")[2].lower() == d for r in e.pending())
    ids = request.get("ids")
    if isinstance(ids, list) and ids and all(isinstance(i, str) for i in ids):
        wanted = set(ids)
        return lambda e: e.id in wanted
    raise ValueError('name the messages: "ids": [...], "domain": "...", or "all": true')


# -- the daemon's side -------------------------------------------------------------------------------

class QueueControl:
    """The requests, answered from a running gateway's queue manager (reactor thread only)."""

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway

    @property
    def queue(self) -> Any:
        return self.gateway.queue

    def _now(self) -> float:
        return self.gateway.reactor.seconds()

    def handle(self, request: Any) -> defer.Deferred:
        """A reply dict for ``request``; never fails (errors become ``ok: false``)."""
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return defer.succeed({"ok": False, "error": 'a request is a JSON object with an "op"'})
        op = getattr(self, "op_" + request["op"], None)
        if op is None:
            return defer.succeed({"ok": False, "error": f"unknown op {request['op']!r}"})
        d = defer.maybeDeferred(op, request)

        def failed(f: Any) -> dict[str, Any]:
            if f.check(ValueError, KeyError, TypeError, RecursionError):   # the request's fault
                return {"ok": False, "error": str(f.value)[:500]}
            log.failure("control request {op} failed", f, op=request["op"])
            return {"ok": False, "error": f"internal error: {f.getErrorMessage()}"}

        return d.addErrback(failed)

    def op_ping(self, request: dict) -> dict[str, Any]:
        return {"ok": True, "hostname": self.gateway.config.gateway.hostname, "pid": os.getpid()}

    def op_metrics(self, request: dict) -> dict[str, Any]:
        """This process's figures (mta.ops.metrics), for worker 0's page on a gateway of several workers."""
        metrics = self.gateway.metrics
        if metrics is None:
            return {"ok": False, "error": "metrics are not enabled (gateway.metrics.enabled)"}
        return {"ok": True, "families": metrics.snapshot()}

    def _cluster(self) -> Any:
        cluster = self.gateway.cluster
        if cluster is None:
            raise ValueError("this gateway is not in a cluster: gateway.cluster.redis is not set")
        return cluster

    @staticmethod
    def _redis_down(cluster: Any) -> dict[str, Any]:
        """One line: what is wrong, what it means for mail, what to do."""
        since = cluster.degraded_since
        when = time.strftime(" since %H:%M:%S UTC", time.gmtime(since)) if since else ""
        return {"ok": False, "degraded": True, "degraded_since": since,
                "error": f"Redis at {cluster.address} does not answer{when}: node {cluster.name} runs on its "
                         f"own with local limits (degraded; mail still flows, nothing is lost); check that Redis "
                         f"runs and that this host reaches it: the node registers again by itself when it answers"}

    async def op_cluster(self, request: dict) -> dict[str, Any]:
        """``smtpgw cluster status``: every node, from Redis (mta.cluster.node)."""
        cluster = self._cluster()
        try:
            nodes = await cluster.status()
        except Unavailable:
            return self._redis_down(cluster)
        return {"ok": True, "node": cluster.name, "nodes": nodes, "now": time.time()}

    def op_tls_rpt_show(self, request: dict) -> dict[str, Any]:
        """``smtpgw tls-rpt show``: this process's TLS-RPT counts of the period under way."""
        if not self.gateway.config.gateway.tls_rpt.enabled:
            return {"ok": False, "error": TLS_RPT_OFF}
        return {"ok": True, "period": self.gateway.tls_reports.snapshot(), "now": time.time()}

    async def op_tls_rpt_close(self, request: dict) -> dict[str, Any]:
        """End this process's TLS-RPT period now (its counts go to a closed file for the reporter)."""
        if not self.gateway.config.gateway.tls_rpt.enabled:
            return {"ok": False, "error": TLS_RPT_OFF}
        await self.gateway.tls_reports.close()
        return {"ok": True}

    async def op_tls_rpt_send(self, request: dict) -> dict[str, Any]:
        """``smtpgw tls-rpt send``: end the period now and send its reports (worker 0)."""
        reporter = self.gateway.tls_reporter
        if reporter is None:
            return {"ok": False, "error": TLS_RPT_OFF}
        if not request.get("closed_others"):
            await self.gateway.tls_reports.close()
        return {"ok": True, "results": await reporter.send_closed()}

    async def op_cluster_list(self, request: dict) -> dict[str, Any]:
        """``smtpgw queue list --cluster``: every node's messages, from the index each keeps in Redis."""
        cluster = self._cluster()
        try:
            view = await cluster_queue(cluster)
        except Unavailable:
            return self._redis_down(cluster)
        return {"ok": True, "node": cluster.name, **view, "now": time.time()}

    async def op_cluster_command(self, request: dict) -> dict[str, Any]:
        """A queue or drain request for the node that holds the message (``smtpgw queue hold mx2:ID``),
        sent to it through Redis (mta.cluster.commands); this node's own is answered here."""
        cluster = self._cluster()
        node, inner = request.get("node"), request.get("request")
        if not isinstance(node, str) or not node or not isinstance(inner, dict) or inner.get("op") not in REMOTE_OPS:
            raise ValueError(f'cluster_command needs "node" and a "request" whose op is one of '
                             f'{", ".join(sorted(REMOTE_OPS))}')
        timeout = request.get("timeout", DEFAULT_TIMEOUT)
        if not isinstance(timeout, (int, float)) or not 0 < timeout <= 600:
            raise ValueError('"timeout" is a number of seconds, at most 600')
        if node == cluster.name:
            return {**await self.handle(inner), "node": node}
        try:
            return await ask_node(cluster, node, inner, float(timeout))
        except NodeNotAnswering as e:
            return {"ok": False, "error": str(e), "node": node, "not_answering": True}
        except Unavailable:
            return self._redis_down(cluster)

    async def op_cluster_each(self, request: dict) -> dict[str, Any]:
        """A bulk queue request (``--domain D`` or ``--all``) for every node that is up, asked at once,
        each as :meth:`op_cluster_command` asks one; ``nodes`` has each node's answer (``ok`` false,
        with the reason, for one that did not answer). A node gone from the cluster is asked only if
        the queue view still lists messages of it (it then cannot answer, and says so)."""
        cluster = self._cluster()
        inner = request.get("request")
        if not isinstance(inner, dict) or inner.get("op") not in BULK_OPS or inner.get("ids"):
            raise ValueError(f'cluster_each needs a "request" whose op is one of {", ".join(sorted(BULK_OPS))}, '
                             f'with "domain" or "all"')
        selector(inner)                                     # a bad selection is an error before any node acts
        try:
            view = await cluster_queue(cluster)
        except Unavailable:
            return self._redis_down(cluster)
        listed = {e["node"] for e in view["entries"]}
        names = [n["node"] for n in view["nodes"] if n["state"] != "gone" or n["node"] in listed]
        if cluster.name not in names:
            names.append(cluster.name)
        asks = [defer.Deferred.fromCoroutine(self.op_cluster_command(
                {"node": n, "request": inner, "timeout": request.get("timeout", DEFAULT_TIMEOUT)}))
                for n in sorted(names)]
        answers = await defer.gatherResults(asks, consumeErrors=True)
        nodes = [{**a, "node": n} for n, a in zip(sorted(names), answers)]
        return {"ok": all(a.get("ok") for a in nodes), "node": cluster.name, "nodes": nodes}

    # -- drain (mta/ops/drain.py) --------------------------------------------------------------------

    async def _drain_answer(self, changed: bool) -> dict[str, Any]:
        drain = self.gateway.drain
        listed = await self.handle({"op": "list"})          # every worker's share (mta.ops.fanout)
        answer = {"ok": True, "node": self.gateway.config.gateway.node_name, "changed": changed,
                  "since": drain.since, "messages": None, "held": None}
        if not listed.get("ok"):            # a worker restarting: the change is made, the count unknown
            return {**answer, "state": drain.state(), "count_error": listed.get("error")}
        live = [e for e in listed["entries"] if not e.get("corrupt")]
        drain.note(len(live))
        return {**answer, "state": drain.state(), "messages": len(live),
                "held": sum(1 for e in live if e.get("why_held"))}

    async def op_drain(self, request: dict) -> dict[str, Any]:
        """Refuse new connections with 421 4.3.2 and deliver what the node holds."""
        return await self._drain_answer(await self.gateway.drain.set(True))

    async def op_undrain(self, request: dict) -> dict[str, Any]:
        return await self._drain_answer(await self.gateway.drain.set(False))

    async def op_drain_status(self, request: dict) -> dict[str, Any]:
        return await self._drain_answer(False)

    def op_trigger(self, request: dict) -> dict[str, Any]:
        """Another worker answered an ETRN/ATRN/DEQUEUE: release what this one holds for it
        (mta.cluster.triggers)."""
        return {"ok": True, "released": self.gateway.triggers.receive(request.get("trigger"))}

    async def op_hand_over(self, request: dict) -> dict[str, Any]:
        """Another worker got ATRN: hand it the entries it names (mta.cluster.triggers)."""
        return {"ok": True, "ids": await self.gateway.triggers.give(request.get("request"))}

    async def op_take_in(self, request: dict) -> dict[str, Any]:
        """Another node hands over an entry for an ATRN here (mta.cluster.handover)."""
        return {"ok": True, "id": await self.gateway.triggers.take_in(request.get("transfer"))}

    async def op_adopt(self, request: dict) -> dict[str, Any]:
        """Another worker found copies it had handed over to this one before a crash: take them in."""
        ids = request.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError('adopt needs "ids": [...]')
        return {"ok": True, "ids": await self.queue.adopt(ids)}

    def op_pickup(self, request: dict) -> dict[str, Any]:
        """``smtpgw sendmail`` dropped a message: pick it up now rather than at the next minute."""
        self.gateway.pickup.run()
        return {"ok": True}

    async def op_list(self, request: dict) -> dict[str, Any]:
        now = self._now()
        rows = [summary(e, now, self.queue.is_active(e.id)) for e in self.queue.entries()]
        corrupt = await self.gateway.spool.corrupt_messages()
        return {"ok": True, "entries": rows + [corrupt_summary(c, now) for c in corrupt],
                "shaping": self.gateway.deliverer.shaper.snapshot()}

    async def op_show(self, request: dict) -> dict[str, Any]:
        entry_id = request.get("id")
        entry = self.queue.get(entry_id) if isinstance(entry_id, str) else None
        if entry is None:
            return {"ok": False, "error": f"no message {entry_id!r} in the queue"}
        try:
            message = await self.gateway.spool.read(entry_id)
        except Exception as e:
            message = None
            log.warn("queue show {id}: cannot read the message: {e}", id=entry_id, e=e)
        traces = getattr(self.gateway, "traces", None)
        steps = await traces.history(entry_id) if traces is not None else None
        entry = self.queue.get(entry_id) or entry
        now = self._now()
        why = explain(self.gateway.config, entry, now, steps, self.gateway.deliverer.shaper.snapshot())
        return {"ok": True, "entry": detail(entry, now, message, self.queue.is_active(entry_id), why)}

    def _selected(self, request: dict) -> tuple[list[QueueEntry], list[str]]:
        """The live entries selected, and requested ids that are not queued."""
        match = selector(request)
        entries = [e for e in self.queue.entries() if match(e)]
        found = {e.id for e in entries}
        missing = [i for i in request.get("ids") or [] if i not in found]
        return entries, missing

    def op_requeue(self, request: dict) -> dict[str, Any]:
        """Start the selected messages' retry schedules over and attempt them now (held ones skipped)."""
        entries, missing = self._selected(request)
        results = [{"id": i, "result": NOT_FOUND} for i in missing]
        results += [{"id": e.id, "result": DONE if self.queue.requeue(e.id) else HELD_SKIPPED} for e in entries]
        return {"ok": True, "results": results}

    async def op_cat(self, request: dict) -> dict[str, Any]:
        """The whole message as queued (``smtpgw queue cat``, Postfix's ``postcat -q``)."""
        entry_id = request.get("id")
        if not isinstance(entry_id, str) or self.queue.get(entry_id) is None:
            return {"ok": False, "error": f"no message {entry_id!r} in the queue"}
        data = await self.gateway.spool.read(entry_id)
        return {"ok": True, "id": entry_id, "message": encode_message(data)}

    def op_retry(self, request: dict) -> dict[str, Any]:
        """Attempt now every pending recipient of the selected messages (held ones are skipped)."""
        entries, missing = self._selected(request)
        results = [{"id": i, "result": NOT_FOUND} for i in missing]
        ready = {e.id for e in entries if not e.extra.get("held")}
        if ready:
            self.queue.wake(lambda x: x.id in ready)
        results += [{"id": e.id, "result": DONE if e.id in ready else HELD_SKIPPED} for e in entries]
        return {"ok": True, "results": results}

    async def _each(self, request: dict, action: Callable[[str], Any]) -> dict[str, Any]:
        entries, missing = self._selected(request)
        results = [{"id": i, "result": NOT_FOUND} for i in missing]
        for e in entries:
            try:
                changed = await action(e.id)
            except KeyError:
                results.append({"id": e.id, "result": NOT_FOUND})
                continue
            results.append({"id": e.id, "result": DONE if changed else UNCHANGED})
        return {"ok": True, "results": results}

    async def op_hold(self, request: dict) -> dict[str, Any]:
        return await self._each(request, self.queue.hold)

    async def op_release(self, request: dict) -> dict[str, Any]:
        return await self._each(request, self.queue.release)

    async def op_delete(self, request: dict) -> dict[str, Any]:
        entries, missing = self._selected(request)          # ids, a domain or all
        notify = bool(request.get("dsn"))
        results = []
        for entry_id in missing + [e.id for e in entries]:
            try:
                dsn_id = await self.queue.delete(entry_id, notify_sender=notify)
            except KeyError:
                results.append({"id": entry_id, "result": NOT_FOUND, "dsn": None})
                continue
            results.append({"id": entry_id, "result": DONE, "dsn": dsn_id})
        return {"ok": True, "results": results}


class ControlProtocol(LineOnlyReceiver):
    """One JSON request per line; replies go out in request order."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST

    def connectionMade(self) -> None:
        self._chain: defer.Deferred = defer.succeed(None)

    def lineReceived(self, line: bytes) -> None:
        line = line.strip()
        if not line:
            return
        try:
            request = json.loads(line)
        except RecursionError:
            answer = {"ok": False, "error": "bad JSON: nested too deeply"}
            self._chain.addCallback(lambda _: self._reply(answer))
            return
        except ValueError as e:
            answer = {"ok": False, "error": f"bad JSON: {e}"}     # ``e`` is unbound after the block
            self._chain.addCallback(lambda _: self._reply(answer))
            return
        control: QueueControl = self.factory.control
        self._chain.addCallback(lambda _: control.handle(request)).addCallback(self._reply)

    def _reply(self, doc: dict[str, Any]) -> None:
        if self.transport is not None and self.connected:
            try:
                text = json.dumps(doc, separators=(",", ":"))
            except (ValueError, TypeError, RecursionError) as e:
                log.error("control: an answer could not be encoded: {e}", e=e)
                text = json.dumps({"ok": False, "error": "internal error: the answer could not be encoded"})
            self.sendLine(text.encode("utf-8"))

    def lineLengthExceeded(self, line: bytes) -> None:
        self._reply({"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"})
        self.transport.loseConnection()


class ControlFactory(Factory):
    protocol = ControlProtocol
    noisy = False               # no "Starting/Stopping factory" lines

    def __init__(self, control: QueueControl) -> None:
        self.control = control


class ControlService(service.Service):
    """Listens on the control socket while the gateway runs (after privileges are dropped, so the
    socket belongs to the daemon's user); removes it on stop.

    A second gateway on the same spool cannot take the socket (its lock file is held), which is
    logged: two daemons on one spool would deliver everything twice.
    """

    name = "smtpgw-control"
    control_class: Callable[[Any], QueueControl] = QueueControl    # mta.ops.fanout: worker 0's

    def __init__(self, gateway: Any, path: str) -> None:
        self.gateway = gateway
        self.path = os.path.abspath(path)
        self._port: Any = None

    def startService(self) -> None:
        super().startService()
        from twisted.internet.endpoints import UNIXServerEndpoint

        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        except OSError as e:
            log.error("control socket {path}: cannot create its folder: {e}", path=self.path, e=e)
            return
        endpoint = UNIXServerEndpoint(self.gateway.reactor, self.path, mode=0o600, wantPID=True)
        d = endpoint.listen(ControlFactory(self.control_class(self.gateway)))

        def listening(port: Any) -> None:
            self._port = port
            log.info("control socket listening on {path}", path=self.path)

        def failed(f: Any) -> None:
            if os.path.lexists(self.path) and not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                log.error("control socket {path}: something that is not a socket is in the way (a "
                          "{kind}); remove it and restart: `smtpgw queue` will not reach this gateway",
                          path=self.path, kind="directory" if os.path.isdir(self.path) else "file")
                return
            log.error("control socket {path}: cannot listen ({e}); `smtpgw queue` will not reach this "
                      "gateway (is another one running on the same spool?)", path=self.path,
                      e=f.getErrorMessage())

        d.addCallbacks(listening, failed)

    def stopService(self) -> Any:
        super().stopService()
        port, self._port = self._port, None
        if port is not None:
            return port.stopListening()
        return None


__all__ = ["ControlService", "QueueControl", "summary", "corrupt_summary", "detail", "selector", "parse_headers"]
