"""Why a message is where it is: the "why" trace that ``smtpgw queue show`` and the console's message
page print, from one function (:func:`explain`) over what the gateway records anyway.

Two parts:

* **Recorded** (:class:`Traces`, one per process): the mail log's lines for the queue id (each
  attempt's ``relay=``, ``status=`` and reply, the notifications, ``removed``) and the diagnostic
  events that name it (``id=``): the connectors chosen, the next hops (MX names and addresses), a hop
  that could not be used and why, holds by schedule, remote trigger, traffic shaping or TLS policy.
  Memory keeps the steps of messages still queued, of the last :data:`KEEP_MESSAGES` at most (and
  :data:`KEEP_STEPS` steps each): a message's steps go when it leaves the queue (``removed``, or
  deleted by the administrator), since nothing shows a message that is no longer queued, so a busy
  gateway does not hold 5,000 delivered messages' steps (about 1.4 KB each); a
  message that stays queued (attempted and deferred, or held) has its steps appended to its trace
  file in the spool (:mod:`mta.spool.traces`), so they are shown after a restart too, and by
  ``smtpgw queue show`` on a stopped gateway.
* **Computed** from the configuration now: which connectors' address spaces match each domain, the
  matching space and its cost, in the order they would be tried, and whether each connector's
  delivery window is open (when it opens next); and the holds in force with their times.

The record listens to ``smtpgw_event`` like a plugin but asks for the message categories only, never
the per-command ``maximum`` events, so it adds no protocol detail to a session's work.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Callable, Iterable

from twisted.internet import defer
from twisted.logger import Logger

from mta.config import Config
from mta.delivery.connectors import connectors_for
from mta.delivery.windows import delivery_window
from mta.maillog.lines import MailLine
from mta.model.queue_entry import PENDING, QueueEntry
from mta.plugin.hookspecs import hookimpl
from mta.spool.store import Spool
from mta.spool.traces import TraceFiles

log = Logger(namespace="smtpgw.queue")

KEEP_MESSAGES = 5000
KEEP_STEPS = 100
# the diagnostic categories whose events are about one queued message
CATEGORIES = frozenset({"routing_engine", "queuing_engine", "categorizer", "ndr", "transport_security"})
MAIL_LOG = "mail log"
ADMIN_HOLD = "held by the administrator"
# a last reply that says a TLS policy kept the message back (MTA-STS, REQUIRETLS, a failed TLS check)
TLS_REFUSAL = re.compile(r"\b(4\.7\.5|5\.7\.10)\b|MTA-STS|REQUIRETLS")


FLUSH_DELAY = 0.5          # steps of a message that stays queued are written this long after they come
DELETED = "message deleted by the administrator"


class Traces:
    """The recorded steps per queue id, fed by the mail log (:meth:`mail_line`, a
    :class:`mta.maillog.MailLog` observer) and the diagnostic events (registered as a plugin).

    With ``files`` (:class:`mta.spool.traces.TraceFiles`) and ``lookup`` (the queue's entry for an
    id), the steps of a message that stays queued -- attempted and deferred, or held -- are also
    appended to its trace file, a moment after they come (several steps in one write), and that
    file is what :meth:`history` reads, so they outlive a restart; the file goes with the message."""

    def __init__(self, clock: Callable[[], float], files: Any = None,
                 lookup: Callable[[str], QueueEntry | None] | None = None, reactor: Any = None) -> None:
        self.clock = clock
        self.files = files
        self.lookup = lookup
        self.reactor = reactor
        self._by_id: OrderedDict[str, list[dict[str, Any] | _Pending]] = OrderedDict()
        self._kept: set[str] = set()                    # ids with a trace file
        self._unwritten: dict[str, list[dict[str, Any]]] = {}
        self._dirty: set[str] = set()
        self._flush_call: Any = None

    def add(self, queue_id: str, step: "dict[str, Any] | _Pending") -> None:
        """Record a step: a dict, or a :class:`_Pending` one made into its dict only when read."""
        steps = self._by_id.get(queue_id)
        if steps is None:
            if len(self._by_id) >= KEEP_MESSAGES:
                self._by_id.popitem(last=False)
            steps = self._by_id[queue_id] = []     # a list: a deque's first block alone is about 600 bytes
        else:
            self._by_id.move_to_end(queue_id)
        steps.append(step)
        if len(steps) > KEEP_STEPS:
            del steps[0]
        if self.files is not None:
            if queue_id in self._kept:
                self._unwritten.setdefault(queue_id, []).append(_made(step))
            elif queue_id in self._dirty:
                return                          # queued at an earlier step: flush() looks again
            elif self.lookup is None or self.lookup(queue_id) is None:
                return                          # not (or no longer) queued: nothing to keep
            self._dirty.add(queue_id)
            if self._flush_call is None:
                self._flush_call = self.reactor.callLater(FLUSH_DELAY, self.flush)

    def steps(self, queue_id: str) -> list[dict[str, Any]]:
        """The steps recorded in memory since the gateway started."""
        steps = self._by_id.get(queue_id)
        if not steps:
            return []
        made = [_made(step) for step in steps]
        steps.clear()
        steps.extend(made)                  # made once, whoever asks again
        return list(made)

    def history(self, queue_id: str) -> defer.Deferred:
        """Every step kept for the message: its trace file (earlier runs of the gateway included)
        and what is not written yet; without a file, the steps in memory."""
        if self.files is None or queue_id not in self._kept:
            return defer.succeed(self.steps(queue_id))
        pending = list(self._unwritten.get(queue_id, ()))
        return self.files.read(queue_id).addCallback(lambda kept: ((kept or []) + pending)[-KEEP_STEPS:])

    @staticmethod
    def _stays(entry: QueueEntry) -> bool:
        """Worth a file: attempted and still queued, or held (a first attempt under way is not)."""
        return bool(entry.extra.get("held")) or any(
            r.attempts or r.last_error or r.held_reason for r in entry.rcpts if r.status == PENDING)

    def flush(self) -> defer.Deferred:
        """Write the steps of the messages that stay queued; forget those that left."""
        self._flush_call = None
        dirty, self._dirty = self._dirty, set()
        writes = []
        for queue_id in dirty:
            entry = self.lookup(queue_id) if self.lookup is not None else None
            if entry is None:
                self.forget(queue_id)
            elif queue_id in self._kept:
                steps = self._unwritten.pop(queue_id, None)
                if steps:
                    writes.append(self.files.append(queue_id, steps))
            elif self._stays(entry):
                self._kept.add(queue_id)
                writes.append(self.files.append(queue_id, self.steps(queue_id)))
        for d in writes:
            d.addErrback(lambda f: log.warn("queue trace not written: {e}", e=f.getErrorMessage()))
        return defer.DeferredList(writes)

    def gone(self, queue_id: str) -> None:
        """The message left the queue: its steps go from memory, and its file."""
        self._by_id.pop(queue_id, None)
        if self.files is not None:
            self.forget(queue_id)

    def forget(self, queue_id: str) -> None:
        """The message left the queue: its file goes."""
        self._dirty.discard(queue_id)
        self._unwritten.pop(queue_id, None)
        if queue_id in self._kept:
            self._kept.discard(queue_id)
            self.files.remove(queue_id).addErrback(lambda f: None)

    def start(self, owns: Callable[[str], bool] | None) -> defer.Deferred:
        """After the queue is loaded: the files of messages still queued are kept (and read on
        request), the others removed."""
        if self.files is None or self.lookup is None:
            return defer.succeed(None)
        lookup = self.lookup

        def found(ids: set[str]) -> None:
            self._kept |= {i for i in ids if lookup(i) is not None}

        return self.files.tidy(lambda i: lookup(i) is not None, owns).addCallback(found)

    def mail_line(self, line: MailLine, when: float) -> None:
        if line.queue_id and line.about_message:
            if line.event == "removed":
                self.gone(line.queue_id)
                return
            self.add(line.queue_id, _Pending(_line_step, line, when))

    def wants_event(self, category: str, level: str) -> bool:
        return category in CATEGORIES and level != "maximum"

    def takes_event(self, category: str, level: str) -> bool:
        """What ``smtpgw_event`` keeps: the message categories, at every level."""
        return category in CATEGORIES

    @hookimpl
    def smtpgw_event(self, category: str, level: str, message: str, fields: Any) -> None:
        queue_id = fields.get("id") if category in CATEGORIES else None
        if isinstance(queue_id, str) and queue_id:
            self.add(queue_id, _Pending(_event_step, (category, message, dict(fields)), self.clock()))
            if message == DELETED:
                self.gone(queue_id)


class _Pending:
    """A step as it came (a mail log line, an event's fields), made into its dict when the trace is
    read or written (:func:`_made`): a relayed message brings about ten steps, nearly always
    forgotten unread, and making each dict at once (the line's text and record a second time, every
    field as a string) was about 3% of a worker's CPU under the bench's load."""

    __slots__ = ("make", "what", "at")

    def __init__(self, make: Callable[[Any, float], dict[str, Any]], what: Any, at: float) -> None:
        self.make, self.what, self.at = make, what, at


def _made(step: "dict[str, Any] | _Pending") -> dict[str, Any]:
    return step.make(step.what, step.at) if isinstance(step, _Pending) else step


def _line_step(line: MailLine, when: float) -> dict[str, Any]:
    record = line.record(when)
    record.pop("time", None)
    text = line.text()                      # without its "ID: " (the trace is the message's own)
    if text.startswith(line.queue_id + ": "):
        text = text[len(line.queue_id) + 2:]
    return {"at": when, "source": MAIL_LOG, "text": text, **record}


def _event_step(event: tuple[str, str, dict[str, Any]], when: float) -> dict[str, Any]:
    category, message, fields = event
    extra = {str(k): str(v) for k, v in fields.items() if k != "id"}
    return {"at": when, "source": category, "text": message, "fields": extra}


def attach(gateway: Any) -> Traces:
    """A record for ``gateway``: fed by its mail log and its diagnostic events; with a spool on disk,
    the steps of messages that stay queued kept in ``trace/`` beside them."""
    real = hasattr(gateway.reactor, "callFromThread") and hasattr(gateway.reactor, "addSystemEventTrigger")
    files = (TraceFiles(gateway.reactor, gateway.config.gateway.spool)
             if isinstance(gateway.spool, Spool) and real else None)      # not on a test's Clock
    traces = Traces(gateway.reactor.seconds, files, gateway.queue.get, gateway.reactor)
    gateway.mail_log.observers.append(traces.mail_line)
    gateway.hooks.register(traces, name="queue-trace")
    if files is not None:
        # "during", not "before": the queue's stop (a "before" trigger, with the service) lets the
        # attempts under way finish, and an attempt's mail log lines come after its state file is
        # written; flushed alongside that stop, the last deferral of a message was lost from its trace
        gateway.reactor.addSystemEventTrigger("during", "shutdown", traces.flush)
    return traces


# -- the explanation -----------------------------------------------------------------------------------

def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def _match_reason(space: Any, domain: str) -> str:
    if space.domain == "*":
        return "the default address space * matches any domain"
    if space.domain.startswith("*."):
        return f"{space.domain} covers {domain}"
    return f"{space.domain} names the domain exactly"


def routes(config: Config, entry: QueueEntry, now: float) -> list[dict[str, Any]]:
    """Per recipient domain: local delivery, or the connectors whose address spaces match, best
    first (most specific space, then lowest cost, then configuration order), each with the space
    that matched, its cost, its next hops' source and whether its window is open now."""
    by_domain: dict[str, list[str]] = {}
    for r in entry.rcpts:
        by_domain.setdefault(_domain(r.address), []).append(r.address)
    out = []
    for domain, addresses in by_domain.items():
        row: dict[str, Any] = {"domain": domain, "recipients": addresses,
                               "local": config.is_local_domain(domain), "connectors": []}
        if not row["local"]:
            for rank, connector in enumerate(connectors_for(config, domain)):
                space = min((s for s in connector.address_spaces if s.matches(domain)),
                            key=lambda s: (-s.specificity, s.cost))
                hold = delivery_window(connector, entry, now)
                window = "open now" if hold is None else hold.reason
                if connector.delivery.remote_triggered:
                    window += "; remote-triggered: mail waits for an ETRN or ATRN from an authorized client"
                row["connectors"].append({
                    "name": connector.name, "address_space": space.domain, "cost": space.cost,
                    "why": _match_reason(space, domain) + (f", cost {space.cost}"
                                                           + ("" if rank == 0 else ": tried if those before it cannot deliver")),
                    "next_hops": ("smart hosts " + ", ".join(connector.smart_hosts)) if connector.smart_hosts
                                 else "the domain's MX records",
                    "window": window,
                    "opens_at": None if hold is None else hold.until})
        out.append(row)
    return out


def hold_kind(reason: str) -> str:
    text = reason.lower()
    if reason == ADMIN_HOLD:
        return "administrator"
    if "remote-triggered" in text or "etrn" in text:
        return "ETRN"
    if "shaping" in text:
        return "traffic shaping"
    if "schedule" in text:
        return "schedule"
    if "mta-sts" in text or "tls" in text:
        return "TLS policy"
    return "other"


def holds(entry: QueueEntry, shaping: Iterable[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """What keeps the message back now: the administrator's hold, each pending recipient's hold
    (schedule, remote trigger, shaping, with the time it ends), a TLS policy (MTA-STS, REQUIRETLS, a
    failed TLS check) that refused every hop, until the next retry, and a shaping pause in force for
    one of its domains (from the running gateway)."""
    out: list[dict[str, Any]] = []
    if entry.extra.get("held"):
        out.append({"kind": "administrator", "text": ADMIN_HOLD, "until": None,
                    "recipients": [r.address for r in entry.pending()]})
    grouped: dict[str, dict[str, Any]] = {}
    for r in entry.pending():
        if r.held_reason:
            hold = grouped.setdefault(r.held_reason, {"kind": hold_kind(r.held_reason), "text": r.held_reason,
                                                      "until": r.next_attempt or None, "recipients": []})
            hold["recipients"].append(r.address)
    out += grouped.values()
    for r in entry.pending():           # not a hold but a wait all the same: a TLS policy refused every hop
        if not r.held_reason and r.last_error and TLS_REFUSAL.search(r.last_error):
            out.append({"kind": "TLS policy", "text": f"retrying: {r.last_error}",
                        "until": r.next_attempt or None, "recipients": [r.address]})
    domains = {_domain(r.address) for r in entry.pending()}
    for row in shaping:
        if row.get("paused_until") and row.get("destination") in domains:
            out.append({"kind": "traffic shaping", "until": row["paused_until"],
                        "text": f"destination {row['destination']} paused by traffic shaping"
                                + (f" after {row['last_trouble']}" if row.get("last_trouble") else ""),
                        "recipients": [r.address for r in entry.pending() if _domain(r.address) == row["destination"]]})
    return out


def attempts(steps: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The replies received, one per recipient per attempt: the mail log's delivery lines."""
    return [{"at": s["at"], "recipient": s.get("to"), "relay": s.get("relay"), "status": s.get("status"),
             "dsn": s.get("dsn"), "reply": s.get("reply"), "tls": s.get("tls")}
            for s in steps if s.get("source") == MAIL_LOG and s.get("event") == "delivery"]


def explain(config: Config, entry: QueueEntry, now: float, steps: list[dict[str, Any]] | None,
            shaping: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
    """The "why" of ``smtpgw queue show`` (``why`` in its DETAIL). ``steps`` is the record for the
    message (None when the gateway is stopped and no trace file was kept for it)."""
    pending = [r for r in entry.rcpts if r.status == PENDING]
    return {
        "routes": routes(config, entry, now),
        "holds": holds(entry, shaping),
        "attempts": attempts(steps or []),
        "steps": steps or [],
        "recorded": steps is not None,
        "last_replies": [{"recipient": r.address, "reply": r.last_error, "hop": r.last_hop, "attempts": r.attempts}
                         for r in pending if r.last_error],
    }


def text_lines(why: dict[str, Any] | None, stamp: Callable[[float], str]) -> list[str]:
    """``smtpgw queue show``'s "why" section (the console draws the same dict as tables)."""
    if not why:
        return []
    lines = ["why:", "  routing:"]
    for route in why["routes"]:
        head = f"    {route['domain']} ({len(route['recipients'])} recipient{'s' if len(route['recipients']) != 1 else ''}): "
        if route["local"]:
            lines.append(head + "local domain: delivered to its Maildirs")
        elif not route["connectors"]:
            lines.append(head + "no connector's address space matches")
        else:
            lines.append(head + "connectors in the order tried:")
            for n, c in enumerate(route["connectors"], 1):
                lines.append(f"      {n}. {c['name']}: {c['why']}; next hops: {c['next_hops']}; window: {c['window']}")
    if why["holds"]:
        lines.append("  holds:")
        for h in why["holds"]:
            until = f" until {stamp(h['until'])}" if h.get("until") else ""
            lines.append(f"    {h['kind']}{until}: {h['text']}")
    if why["recorded"]:
        lines.append("  steps (as recorded; kept across restarts while the message is queued):")
        lines += [f"    {stamp(s['at'])} {s['source']}: {s['text']}" for s in why["steps"]] or ["    (none recorded)"]
    else:
        lines.append("  steps: none kept (the gateway is not running)")
    return lines


__all__ = ["Traces", "text_lines", "attach", "explain", "routes", "holds", "attempts", "KEEP_MESSAGES", "KEEP_STEPS"]
