"""The queue manager: from "on disk" to "delivered, bounced or given up" (Postfix's qmgr).

It owns the in-memory view of the queue (one :class:`QueueEntry` per message), asks the
:class:`~mta.queue.scheduler.Scheduler` when each is next due, runs at most ``max_active`` deliveries at
once (the rest wait in order), and after each attempt records every recipient's outcome durably
*before* telling the hooks, so a crash never makes a recipient receive the same message twice.

Retry, expiry and notices follow ``gateway.queue`` in the configuration:

* a temporary failure is retried after ``retry[attempts-1]`` (the last interval repeats);
* a recipient still pending ``expire`` after arrival fails with 4.4.7;
* once per message, after ``delay_notification``, the sender gets a "delayed" DSN;
* failures get one "failed" DSN per attempt. A message from the null sender never gets one: the
  report goes to the postmaster instead, marked so that if *that* fails it is only logged.

A DSN is queued (durably) before the states that caused it are written, so a crash in between can
at worst send a report twice, never lose it.
"""
from __future__ import annotations

import collections
import json
from typing import Any, Callable

from twisted.internet import defer, task
from twisted.logger import Logger

from mta.dsn import reports as dsn
from mta import maillog
from mta.queue import mail_lines
from mta.dsn import params as dsn_params
from mta.workers import identity as workers
from mta.model.envelope import Envelope, Session
from mta.model.message import MessageData
from mta.model.nexthop import Outcome, RecipientResult
from mta.model.queue_entry import DELIVERED, FAILED, PENDING, QueueEntry, RecipientState
from mta.smtp import replies as R
from mta.smtp.reply import Reply
from mta.spool.store import CORRUPT_REASON, MOVED_FROM, CorruptFile, ScanResult, SpoolError, file_fault
from mta.queue.scheduler import Scheduler

log = Logger(namespace="smtpgw.queue")

Data = bytes | list[bytes]       # what the deliverer takes: the spooled bytes, or the received chunks

OUTCOMES_PER_TURN = 200         # recipients' outcomes told per reactor turn (a message may have 64,000)
ATTEMPTS_PER_TURN = 2           # delivery attempts started before the loop gets a turn (see _pump)
MIN_INTERVAL = 1.0               # seconds; no configuration or hold answer may make an entry spin

# entry.extra keys
DSN_KIND = "dsn"                 # on a report we generated: "failed" or "delayed"
DOUBLE_BOUNCE = "double_bounce"  # on a postmaster copy: its own failure is only logged
MAIL_PARAMS, RCPT_PARAMS = "mail_params", "rcpt_params"
HELD = "held"                    # set by `smtpgw queue hold`: no attempt, expiry or notice until released
HANDING = "handing_to"           # being handed over to another node (ATRN there): its name, until settled
HANDED_FROM = "handed_from"      # on a copy taken in from another node: "<node>:<its id there>"
CORRUPT = CORRUPT_REASON         # on an entry moved to the spool's corrupt/ area: why


class NotHandedOver(Exception):
    """A hand-over to another node did not happen, for sure: the entry stays here (mta/cluster/handover.py)."""


class UnreadableMessage(Exception):
    """The spool cannot give back a queued message's bytes (file missing, unreadable or damaged):
    retrying cannot help, so the queue moves the message to ``corrupt/`` instead."""


def unreadable_reason(error: BaseException) -> str:
    """A short reason for the log and the DSN: ``message file missing``, ``... unreadable: <why>``."""
    return f"message file {file_fault(error)}"


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _first_unsettled(states: list[RecipientState] | None, settled: set[int]) -> RecipientState | None:
    """The first of ``states`` (same address) that has no result yet: duplicates settle in order."""
    for state in states or ():
        if id(state) not in settled:
            return state
    return None


def is_held(entry: QueueEntry) -> bool:
    """Held by the administrator (``smtpgw queue hold``)."""
    return bool(entry.extra.get(HELD))


def wants_deletion_report(config: Any, entry: QueueEntry) -> bool:
    """Whether ``queue delete --dsn`` sends a report: pending recipients, someone to tell, no
    NOTIFY=NEVER, and not about a postmaster copy (that would be a triple bounce)."""
    pending = entry.pending()
    return bool(pending and (entry.sender or config.gateway.postmaster) and not entry.extra.get(DOUBLE_BOUNCE)
                and QueueManager._notify_allows(entry, "FAILURE", [r.address for r in pending]))


def deletion_report(config: Any, entry: QueueEntry, original: bytes | None,
                    now: float) -> tuple[str, bytes, dict[str, Any]]:
    """``(to, DSN bytes, extra)`` telling the sender that the administrator deleted ``entry``; shared
    by the running queue and ``smtpgw queue`` working on a stopped gateway's spool."""
    to = entry.sender or config.gateway.postmaster
    extra: dict[str, Any] = {DSN_KIND: dsn.FAILED, "about": entry.id}
    if not entry.sender:
        extra[DOUBLE_BOUNCE] = True
    report = dsn.build_dsn(config, entry, [(r, R.DELETED) for r in entry.pending()], dsn.FAILED, original,
                           to=to, now=now)
    return to, report, extra


class _Active:
    """Book-keeping for one entry being delivered."""

    __slots__ = ("_done", "again")

    def __init__(self) -> None:
        self._done: defer.Deferred | None = None
        self.again = False            # wake() arrived meanwhile: run again right after

    @property
    def done(self) -> defer.Deferred:
        """Fires when the attempt has ended. Made only when someone waits for it (a stop, a hold or
        a delete during the attempt): nearly every attempt ends with nobody waiting."""
        if self._done is None:
            self._done = defer.Deferred()
        return self._done

    def finish(self) -> None:
        if self._done is not None:
            self._done.callback(None)


def keep_schedule(due: list[RecipientState], early: dict[int, tuple[int, float]]) -> None:
    """An attempt made before its time (``smtpgw queue retry``, ETRN) that fails again does not move
    the retry schedule on: the recipient keeps the attempt count and the next attempt it had."""
    for r in due:
        before = early.get(id(r))
        if before is not None and r.status == PENDING and r.held_reason is None:
            r.attempts, r.next_attempt = before


class QueueManager:
    def __init__(self, gateway: Any, max_active: int = 200, stop_timeout: float = 30.0,
                 first_attempt_memory: int = 64 * 1024 * 1024) -> None:
        self.gateway = gateway
        self.max_active = max_active
        self.stop_timeout = stop_timeout
        self.first_attempt_memory = first_attempt_memory
        self._entries: dict[str, QueueEntry] = {}
        self._first_data: dict[str, list[bytes]] = {}
        self._first_bytes = 0
        self._ready: collections.deque[tuple[str, bool]] = collections.deque()
        self._pump_call: Any = None     # set once this turn's share of attempts has started (_pump)
        self._started_in_turn = 0
        self._ready_ids: set[str] = set()
        self._active: dict[str, _Active] = {}
        self._scheduler = Scheduler(gateway.reactor, self._due)
        self._not_before: dict[str, float] = {}     # after an attempt that raised: back off
        self._running = False
        # ``watcher(entry_id)`` after an entry was queued, attempted, held, released, woken or removed
        # (the cluster's queue index, mta.cluster.queue_index): a cheap call, in the reactor thread
        self.watchers: list[Callable[[str], None]] = []

    # -- shortcuts ----------------------------------------------------------------------------------

    @property
    def _reactor(self) -> Any:
        return self.gateway.reactor

    @property
    def _spool(self) -> Any:
        return self.gateway.spool

    @property
    def _qcfg(self) -> Any:
        return self.gateway.config.gateway.queue

    def _now(self) -> float:
        return self._reactor.seconds()

    def _event(self, message: str, **fields: Any) -> None:
        self.gateway.hooks.event("queuing_engine", "medium", message, **fields)

    def _touched(self, entry_id: str) -> None:
        for watcher in self.watchers:
            watcher(entry_id)

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> defer.Deferred:
        """Open the spool, read it back (in a thread) and schedule every entry by its next attempt.
        What the scan could not queue was moved to ``corrupt/``: it is logged and reported exactly as
        a message found unreadable at run time (:meth:`_quarantine`)."""
        self._spool.open()
        self._running = True
        d = self._spool.load()

        def loaded(found: ScanResult) -> int:
            for note in found.notes:
                log.warn("spool: {note}", note=note)
            for damaged in found.damaged:
                if damaged.entry is None:
                    log.error("spool: {line}", line=damaged.line())
                else:
                    report = defer.Deferred.fromCoroutine(self._lost(damaged.entry, damaged.reason, damaged.where))
                    report.addErrback(self._log_failure, "report on a damaged message", damaged.name)
            for entry in found.entries:
                if entry.is_done():             # crashed between the last update and remove()
                    self._spool.remove(entry.id).addErrback(self._log_failure, "remove", entry.id)
                    continue
                self._entries[entry.id] = entry
                if not is_held(entry):
                    self._scheduler.schedule(entry.id, self._next_time(entry))
            self._event("queue loaded", entries=len(self._entries))
            return len(self._entries)

        def unreadable(failure: Any) -> int:
            error = failure.value
            why = (f"{error.filename}: {error.strerror}" if isinstance(error, OSError) and error.filename
                   else str(error))
            log.error("queue: cannot read the spool ({why}); the mail queued there is not attempted until "
                      "the gateway is restarted with the spool readable; new mail is queued as usual", why=why)
            return 0

        return d.addCallbacks(loaded, unreadable)

    def stop(self) -> defer.Deferred:
        """Stop scheduling and wait (at most ``stop_timeout``) for deliveries in flight."""
        self._running = False
        self._scheduler.stop()
        if self._pump_call is not None and self._pump_call.active():
            self._pump_call.cancel()
        self._pump_call = None
        self._ready.clear()
        self._ready_ids.clear()
        waiting = [a.done for a in self._active.values()]
        done: defer.Deferred = defer.Deferred()
        timer = None
        if waiting:
            timer = self._reactor.callLater(self.stop_timeout, lambda: done.called or done.callback(False))
            dl = defer.DeferredList(waiting, consumeErrors=True)
            dl.addCallback(lambda _: done.called or done.callback(True))
        else:
            done.callback(True)

        def finish(clean: bool) -> Any:
            if timer is not None and timer.active():
                timer.cancel()
            if clean:
                close = getattr(self._spool, "close", None)
                if close is not None:
                    return close()          # a filesystem spool's writer finishes and exits
            else:
                log.warn("queue stop: {n} deliveries still running", n=len(self._active))

        return done.addCallback(finish)

    # -- intake -------------------------------------------------------------------------------------

    def submit(self, session: Session, envelope: Envelope, message: MessageData) -> defer.Deferred:
        """Queue a received message; fires with its id once it is durable (then the 250 may go)."""
        extra = {k: v for k, v in envelope.extra.items() if _jsonable(v)}
        if envelope.mail_params and _jsonable(envelope.mail_params):
            extra[MAIL_PARAMS] = dict(envelope.mail_params)
        rcpt_params = {k: dict(v) for k, v in envelope.rcpt_params.items() if v}
        if rcpt_params:                 # strings from the RCPT line: JSON as they are, no costly check
            extra[RCPT_PARAMS] = rcpt_params
        now = self._now()
        entry = QueueEntry(
            id=envelope.id, sender=envelope.sender,
            rcpts=[RecipientState(a) for a in envelope.recipients],
            received_at=now, arrived_at=envelope.started_at if 0 < envelope.started_at <= now else now,
            size=message.size, virtual_server=session.virtual_server,
            peer_host=session.peer_host, helo=session.helo,
            authenticated_user=session.authenticated_user, extra=extra)
        return self._enqueue(entry, message.chunks())

    def inject(self, sender: str, recipients: list[str], data: bytes,
               extra: dict | None = None) -> defer.Deferred:
        """Queue a locally generated message (a DSN, or one from the maildrop), with the same
        durability as received mail. ``smtpgw_before_queue`` sees it first, with no session."""
        envelope = Envelope(id=workers.queue_id(self.gateway), sender=sender, recipients=list(recipients),
                            extra=dict(extra or {}))
        message = MessageData([data])
        edits = self.gateway.hooks.before_queue(None, envelope, message)

        def enqueue(_: Any = None) -> defer.Deferred:
            entry = QueueEntry(id=envelope.id, sender=sender,
                               rcpts=[RecipientState(a) for a in recipients],
                               received_at=self._now(), size=message.size, virtual_server="",
                               peer_host="localhost", extra=dict(extra or {}))
            return self._enqueue(entry, message.chunks())

        return enqueue() if edits is None else edits.addCallback(enqueue)

    def _enqueue(self, entry: QueueEntry, chunks: list[bytes]) -> defer.Deferred:
        d = self._spool.put(entry, chunks)

        def durable(_: Any) -> str:
            self._entries[entry.id] = entry
            if self._first_bytes + entry.size <= self.first_attempt_memory:
                self._first_data[entry.id] = chunks
                self._first_bytes += entry.size
            maillog.of(self.gateway).write(mail_lines.queued(entry))
            self._event("message queued", id=entry.id, sender=entry.sender,
                        recipients=len(entry.rcpts), size=entry.size)
            if self._running:
                self._scheduler.schedule(entry.id, self._now())
            self._touched(entry.id)
            return entry.id

        return d.addCallback(durable)

    # -- tools --------------------------------------------------------------------------------------

    def ids(self) -> list[str]:
        """Every queued entry's id (no copies: look each up with :meth:`get`)."""
        return list(self._entries)

    def entries(self) -> list[QueueEntry]:
        """A snapshot (copies) of every queued entry, oldest first."""
        out = [QueueEntry.from_dict(e.to_dict()) for e in self._entries.values()]
        return sorted(out, key=lambda e: (e.received_at, e.id))

    def wake(self, predicate: Callable[[QueueEntry], bool] | None = None) -> int:
        """Attempt matching entries now, every pending recipient (ETRN, ``queue retry``)."""
        n = 0
        for entry in list(self._entries.values()):
            if entry.is_done() or is_held(entry) or (predicate is not None and not predicate(entry)):
                continue
            n += 1
            self._touched(entry.id)
            if entry.id in self._active:
                self._active[entry.id].again = True
            elif self._running:
                self._scheduler.discard(entry.id)
                self._make_ready(entry.id, force=True)
        if n:
            self._event("queue woken", entries=n)
            self._reactor.callLater(0, self._pump)
        return n

    def requeue(self, entry_id: str) -> bool:
        """``smtpgw queue requeue``: start the retry schedule over and attempt now, routed afresh by the
        configuration in force (routing is decided at every attempt). False for a held message."""
        entry = self._entries[entry_id]
        if is_held(entry):
            return False
        now = self._now()
        for r in entry.pending():
            r.attempts, r.next_attempt, r.held_reason = 0, now, None
        self.wake(lambda e: e.id == entry_id)
        return True

    # -- administration (`smtpgw queue` through mta.ops.control) ----------------------------------------

    def get(self, entry_id: str) -> QueueEntry | None:
        """The live entry (not a copy): callers in the reactor thread only, and read-only."""
        return self._entries.get(entry_id)

    def next_attempt(self, entry_id: str) -> float | None:
        """When the scheduler will next look at ``entry_id`` (None: held, active or unknown)."""
        return self._scheduler.when(entry_id)

    def is_active(self, entry_id: str) -> bool:
        return entry_id in self._active

    def stats(self) -> dict[str, float]:
        """Numbers for the metrics endpoint: one pass over the queue, in the reactor thread."""
        messages = held = recipients = 0
        oldest: float | None = None
        for entry in self._entries.values():
            messages += 1
            held += is_held(entry)
            recipients += len(entry.pending())
            if oldest is None or entry.received_at < oldest:
                oldest = entry.received_at
        return {"messages": messages, "held": held, "recipients": recipients, "active": len(self._active),
                "oldest_age": (self._now() - oldest) if oldest is not None else 0.0}

    async def hold(self, entry_id: str) -> bool:
        """Stop attempting ``entry_id`` until :meth:`release` (durable; an attempt in flight ends first).
        Returns False when it was already held. Raises KeyError for an unknown id."""
        entry = self._entries[entry_id]
        if is_held(entry):
            return False
        entry.extra[HELD] = True
        self._scheduler.discard(entry_id)
        self._unready(entry_id)
        try:
            await self._spool.update(entry)
        except Exception:
            entry.extra.pop(HELD, None)
            self._reschedule(entry)
            raise
        self._touched(entry_id)
        self._admin_event("message held by the administrator", id=entry_id)
        return True

    async def release(self, entry_id: str) -> bool:
        """Undo :meth:`hold` and attempt the entry now. Returns False when it was not held."""
        entry = self._entries[entry_id]
        if not is_held(entry):
            return False
        del entry.extra[HELD]
        try:
            await self._spool.update(entry)
        except Exception:
            entry.extra[HELD] = True
            raise
        self._touched(entry_id)
        self._admin_event("message released by the administrator", id=entry_id)
        if self._running and entry_id not in self._active:
            self._make_ready(entry_id, force=True)
            self._reactor.callLater(0, self._pump)
        return True

    async def delete(self, entry_id: str, notify_sender: bool = False) -> str | None:
        """Remove ``entry_id`` from the queue; with ``notify_sender``, first queue a failure DSN for
        its pending recipients (5.3.0, deleted by the administrator; RFC 3461 NOTIFY=NEVER is honoured).

        An attempt in flight is allowed to finish first, so nothing is half-delivered. The DSN is
        durable before the message is removed. Returns the DSN's queue id, or None when none was sent.
        Raises KeyError for an unknown id (or one that finished meanwhile).
        """
        if entry_id not in self._entries:
            raise KeyError(entry_id)
        while entry_id in self._active:
            waiter: defer.Deferred = defer.Deferred()
            self._active[entry_id].done.addBoth(lambda r, w=waiter: (w.callback(None), r)[1])
            await waiter
        entry = self._entries.pop(entry_id, None)       # from here on nothing schedules it
        if entry is None:
            raise KeyError(entry_id)
        self._scheduler.discard(entry_id)
        self._unready(entry_id)
        self._not_before.pop(entry_id, None)
        dsn_id = None
        try:
            if notify_sender and wants_deletion_report(self.gateway.config, entry):
                try:
                    data = await self._load(entry)
                    original: bytes | None = data if isinstance(data, bytes) else b"".join(data)
                except UnreadableMessage:
                    original = None             # the report says the message could not be read
                to, report, extra = deletion_report(self.gateway.config, entry, original, self._now())
                dsn_id = await self.inject("", [to], report, extra)
            await self._spool.remove(entry_id)
        except Exception:
            self._entries[entry_id] = entry             # nothing lost: put it back as it was
            self._reschedule(entry)
            raise
        self._drop_first_data(entry)
        self._touched(entry_id)
        self._admin_event("message deleted by the administrator", id=entry_id, sender=entry.sender,
                          report=dsn_id or "")
        return dsn_id

    # -- hand-over between workers (ATRN collecting what the other workers hold) -------------------

    async def hand_over(self, pick: Callable[[QueueEntry], bool], to: int,
                        send: Callable[[QueueEntry, Data], Any] | None = None) -> list[str]:
        """Give worker ``to`` the entries ``pick`` chooses (ATRN received there: the client's
        connection is the only way to them). Each is copied, durably, under the id worker ``to``
        owns (:func:`mta.workers.identity.retag`, its ``extra`` naming the old id), and only then
        removed here; an attempt in flight ends first and nothing schedules it meanwhile, so no
        recipient is delivered by both workers. A crash between the copy and the removal leaves
        both files: the scan keeps the copy (mta/spool/store.py). Returns the new ids.

        With ``send`` the entry goes to another node instead (ATRN at that node, mta/cluster/handover.py):
        ``send(entry, data)`` returns the id the other node stored it under, and only then is it
        removed here; see :meth:`_send_away`."""
        moved: list[str] = []
        for entry_id in [e.id for e in self._entries.values() if not is_held(e) and pick(e)]:
            while entry_id in self._active:
                waiter: defer.Deferred = defer.Deferred()
                self._active[entry_id].done.addBoth(lambda r, w=waiter: (w.callback(None), r)[1])
                await waiter
            entry = self._entries.get(entry_id)
            if entry is None or entry.is_done() or is_held(entry) or not pick(entry):
                continue
            del self._entries[entry_id]                 # from here on nothing schedules it
            self._scheduler.discard(entry_id)
            self._unready(entry_id)
            self._not_before.pop(entry_id, None)
            try:
                new_id = await (self._copy_for(entry, to) if send is None else self._send_away(entry, send))
            except Exception as e:
                if send is None:
                    log.failure("queue {id}: cannot hand it over to worker {to}; it stays here", id=entry_id, to=to)
                else:
                    log.warn("queue {id}: not handed over to another node ({e}); it stays here", id=entry_id, e=e)
                self._entries[entry_id] = entry
                self._reschedule(entry)
                continue
            self._drop_first_data(entry)
            self._touched(entry_id)
            moved.append(new_id)
            log.info("queue {id}: handed over to {to} as {new}", id=entry_id,
                     to=f"worker {to}" if send is None else "node", new=new_id)
        return moved

    async def _send_away(self, entry: QueueEntry, send: Callable[[QueueEntry, Data], Any]) -> str:
        """Copy then remove, between nodes: the entry is marked durably (:data:`HANDING`) before it
        leaves, so that a crash after the other node stored it and before it is removed here is
        settled at the next start (:meth:`settle_hand_over`) rather than delivered twice. ``send``
        raises :class:`NotHandedOver` when the other node surely does not have it (the mark is
        taken off); any other failure leaves the mark for the settling."""
        data = await self._load(entry)
        entry.extra[HANDING] = True
        await self._spool.update(entry)
        try:
            new_id = await send(entry, data)
        except NotHandedOver:
            entry.extra.pop(HANDING, None)
            await self._spool.update(entry)
            raise
        await self._spool.remove(entry.id)
        return str(new_id)

    def handing(self) -> list[QueueEntry]:
        """Entries a hand-over to another node left unsettled (a crash, Redis gone in the middle)."""
        return [e for e in self._entries.values() if e.extra.get(HANDING)]

    async def settle_hand_over(self, entry_id: str, handed: bool) -> None:
        """The other node has the entry (``handed``): forget it here, silently; or it has not: take
        the mark off and keep it."""
        entry = self._entries.get(entry_id)
        if entry is None or not entry.extra.get(HANDING) or entry_id in self._active:
            return
        if handed:
            del self._entries[entry_id]
            self._scheduler.discard(entry_id)
            self._unready(entry_id)
            await self._spool.remove(entry_id)
            self._drop_first_data(entry)
            log.info("queue {id}: the other node had taken it over before a stop; removed here", id=entry_id)
        else:
            entry.extra.pop(HANDING, None)
            await self._spool.update(entry)
            self._reschedule(entry)
        self._touched(entry_id)

    async def take_in(self, entry: QueueEntry, data: bytes, origin: str) -> str:
        """Queue an entry handed over by another node (``origin``: ``node:id``) under a new id of
        this worker, durably, with its recipients' states as they were there."""
        copy = QueueEntry.from_dict(entry.to_dict())
        copy.id = workers.queue_id(self.gateway)
        copy.extra.pop(HANDING, None)
        copy.extra[HANDED_FROM] = origin
        await self._spool.put(copy, [data])
        self._entries[copy.id] = copy
        self._touched(copy.id)
        if self._running and not is_held(copy):
            self._scheduler.schedule(copy.id, self._next_time(copy))
        log.info("queue {id}: taken over from node {origin}", id=copy.id, origin=origin)
        return copy.id

    async def _copy_for(self, entry: QueueEntry, to: int) -> str:
        data = await self._load(entry)
        copy = QueueEntry.from_dict(entry.to_dict())
        copy.id = workers.retag(entry.id, to)
        copy.extra[MOVED_FROM] = entry.id
        await self._spool.put(copy, [data] if isinstance(data, bytes) else list(data))
        await self._spool.remove(entry.id)
        return copy.id

    async def adopt(self, entry_ids: list[str]) -> list[str]:
        """Take into this queue the entries another worker has just handed over (read from disk);
        returns the ids now queued here."""
        wanted = [i for i in entry_ids if i not in self._entries and self.gateway.worker.owns(i)]
        adopted = []
        for entry in await self._spool.load_entries(wanted) if wanted else []:
            if entry.id in self._entries or entry.is_done():
                continue
            self._entries[entry.id] = entry
            self._touched(entry.id)
            adopted.append(entry.id)
            if self._running and not is_held(entry):
                self._scheduler.schedule(entry.id, self._next_time(entry))
        return adopted

    def _admin_event(self, message: str, **fields: Any) -> None:
        self.gateway.hooks.event("queuing_engine", "minimum", message, **fields)

    def _unready(self, entry_id: str) -> None:
        if entry_id in self._ready_ids:
            self._ready_ids.discard(entry_id)
            self._ready = collections.deque((i, f) for i, f in self._ready if i != entry_id)

    def _reschedule(self, entry: QueueEntry) -> None:
        if self._running and not is_held(entry) and entry.id not in self._active:
            self._scheduler.schedule(entry.id, self._next_time(entry))

    # -- scheduling ---------------------------------------------------------------------------------

    def _next_time(self, entry: QueueEntry) -> float:
        """When something next has to happen to ``entry``: an attempt, expiry or the delay notice."""
        q = self._qcfg
        times = [r.next_attempt for r in entry.pending()]
        times.append(entry.received_at + q.expire)
        if self._wants_delay_notice(entry) and q.delay_notification > 0:
            times.append(entry.received_at + q.delay_notification)
        return max(min(times), self._not_before.get(entry.id, 0.0))

    def _due(self, ids: list[str]) -> None:
        for entry_id in ids:
            self._make_ready(entry_id, force=False)
        self._pump()

    def _make_ready(self, entry_id: str, force: bool) -> None:
        if entry_id in self._ready_ids:
            if force:   # upgrade the waiting item in place
                self._ready = collections.deque((i, f or i == entry_id) for i, f in self._ready)
            return
        self._ready_ids.add(entry_id)
        self._ready.append((entry_id, force))

    def _pump(self) -> None:
        """Start the ready attempts; after every :data:`ATTEMPTS_PER_TURN` started, the loop polls
        (and writes the 250s whose spool writes are done) before the next ones start. Why:
        an attempt runs about 0.7 ms before its first wait (the hooks, the route, the pipelined
        commands written), and the scheduler's timer or a burst of new messages made ready five or
        more at once: 20-66 ms in which no 250 could go out, though the spool writer's replies
        were waiting. The rest start in the next turns, after the loop has polled."""
        while self._running and self._ready and len(self._active) < self.max_active:
            if self._pump_call is not None:
                return                  # this turn's share is started; the next turn goes on
            entry_id, force = self._ready.popleft()
            self._ready_ids.discard(entry_id)
            entry = self._entries.get(entry_id)
            if entry is None or entry_id in self._active or is_held(entry):
                continue
            self._started_in_turn += 1
            if self._started_in_turn >= ATTEMPTS_PER_TURN:
                self._pump_call = self._reactor.callLater(0, self._next_turn)
            active = self._active[entry_id] = _Active()
            self._touched(entry_id)
            d = defer.Deferred.fromCoroutine(self._attempt(entry, force))
            d.addCallbacks(self._attempt_ended, self._attempt_raised, callbackArgs=(entry,),
                           errbackArgs=(entry,))
            d.addErrback(self._log_failure, "attempt", entry_id)
            d.addBoth(self._finished, entry, active)

    def _next_turn(self) -> None:
        self._pump_call, self._started_in_turn = None, 0
        self._pump()

    def _attempt_ended(self, _: Any, entry: QueueEntry) -> None:
        self._not_before.pop(entry.id, None)

    def _attempt_raised(self, failure: Any, entry: QueueEntry) -> Any:
        """Whatever went wrong, the entry waits at least the first retry interval (so a fault can
        never make the queue spin), and the attempt is logged once. A message the spool cannot give
        back goes to ``corrupt/`` instead: retrying would not bring it back."""
        if failure.check(UnreadableMessage):
            return defer.Deferred.fromCoroutine(self._quarantine(entry, str(failure.value)))
        delay = max(self._qcfg.retry_interval(1), MIN_INTERVAL)
        self._not_before[entry.id] = self._now() + delay
        log.failure("queue {id}: attempt failed; next attempt in {delay:.0f}s", failure, id=entry.id,
                    delay=delay)
        return None

    def _finished(self, _: Any, entry: QueueEntry, active: _Active) -> None:
        del self._active[entry.id]
        if entry.id not in self._entries:
            self._not_before.pop(entry.id, None)    # moved to corrupt/ (or deleted meanwhile)
        elif entry.is_done():
            self._entries.pop(entry.id, None)
            self._not_before.pop(entry.id, None)
        elif self._running and not is_held(entry):
            if active.again:
                self._make_ready(entry.id, force=True)
            else:
                self._scheduler.schedule(entry.id, self._next_time(entry))
        self._touched(entry.id)
        active.finish()
        self._pump()

    # -- one attempt --------------------------------------------------------------------------------

    async def _attempt(self, entry: QueueEntry, force: bool) -> None:
        now = self._now()
        q = self._qcfg
        failures: list[tuple[RecipientState, Reply]] = []
        outcomes: list[tuple[Outcome, str, Reply, RecipientResult | None]] = []
        data: Data | None = None
        removed = False

        expiring = now >= entry.received_at + q.expire
        if (expiring and entry.pending()) or self._delay_notice_due(entry, now) or any(
                force or r.next_attempt <= now for r in entry.pending()):
            data = await self._load(entry)      # before anything changes: an unreadable message stays whole
        if expiring:
            for r in entry.pending():
                last = dsn.reply_from_text(r.last_error, R.no_attempt())
                reply = R.expired(last.code, last.text or str(last))
                r.status, r.last_error = FAILED, str(reply)
                failures.append((r, reply))
                outcomes.append((Outcome.FAILED, r.address, reply, None))

        due = [r for r in entry.pending() if force or r.next_attempt <= now]
        early = {id(r): (r.attempts, r.next_attempt) for r in due if r.next_attempt > now}
        successes: list = []            # NOTIFY=SUCCESS reports owed: [(action, [(state, reply)])]
        if due:
            if data is None:
                data = await self._load(entry)
            results = await self._deliver(entry, data, due)
            self._apply(entry, due, results, self._now(), failures, outcomes)
            keep_schedule(due, early)
            successes = dsn_params.success_notices(entry, due, results)

        delayed: list[tuple[RecipientState, Reply]] = []
        if self._delay_notice_due(entry, self._now()):
            delayed = [(r, dsn.reply_from_text(r.last_error, R.no_attempt(r.held_reason or "delayed", "4.0.0")))
                       for r in entry.pending()]
        if failures or delayed or successes:
            if data is None:
                data = await self._load(entry)
            original = data if isinstance(data, bytes) else b"".join(data)
            if failures:
                await self._report(entry, failures, dsn.FAILED, original)
            if delayed:
                await self._report(entry, delayed, dsn.DELAYED, original)
                entry.delay_notified = True
            for action, delivered in successes:
                await self._report(entry, delivered, action, original)

        if entry.is_done():
            self._drop_first_data(entry)
            try:
                await self._spool.remove(entry.id)
            except SpoolError as e:
                log.error("queue {id}: could not remove from the spool: {e}", id=entry.id, e=e)
            except Exception:
                log.failure("queue {id}: could not remove from the spool", id=entry.id)
            else:
                removed = True
        elif due or failures or delayed:
            try:
                await self._spool.update(entry)
            except SpoolError as e:
                log.error("queue {id}: could not record recipient states: {e}", id=entry.id, e=e)
            except Exception:
                log.failure("queue {id}: could not record recipient states", id=entry.id)
        mail_log, ended = maillog.of(self.gateway), self._now()
        states = {r.address: r for r in reversed(entry.rcpts)} if outcomes else {}   # the first of duplicates
        for n, (outcome, address, reply, result) in enumerate(outcomes):
            if n and not n % OUTCOMES_PER_TURN:     # a mail log line, an event and a hook per recipient:
                await task.deferLater(self._reactor, 0, lambda: None)   # other sessions go on between
            mail_log.write(mail_lines.outcome(entry, outcome, address, reply, result, now, ended))
            self._outcome_event(entry, outcome, address, reply, states.get(address))
            self.gateway.hooks.recipient_outcome(outcome, entry, address, reply)
        if removed:
            mail_log.write(mail_lines.removed(entry))
        if entry.is_done():
            self._event("message done", id=entry.id,
                        delivered=sum(r.status == DELIVERED for r in entry.rcpts),
                        failed=sum(r.status == FAILED for r in entry.rcpts))

    def _outcome_event(self, entry: QueueEntry, outcome: Outcome, address: str, reply: Reply,
                       state: RecipientState | None) -> None:
        """queuing_engine/medium, per recipient: delivered, deferred, bounced or expired (the mail log
        has the outcome at every level; this adds the attempts and the hop's label)."""
        status = mail_lines.status_of(outcome, reply)
        what = "delivered" if status == "sent" else status
        self.gateway.hooks.event("queuing_engine", "medium", f"message {what}",
                                 **mail_lines.diag_fields(entry, address, reply, state))

    async def _load(self, entry: QueueEntry) -> Data:
        """The message: the received chunks on the first attempt (no re-read), else from the spool."""
        data = self._first_data.pop(entry.id, None)
        if data is not None:
            self._first_bytes -= entry.size
            return data
        try:
            return await self._spool.read(entry.id)
        except (OSError, CorruptFile) as e:
            raise UnreadableMessage(unreadable_reason(e)) from e

    def _drop_first_data(self, entry: QueueEntry) -> None:
        if self._first_data.pop(entry.id, None) is not None:
            self._first_bytes -= entry.size

    async def _deliver(self, entry: QueueEntry, data: Data,
                       due: list[RecipientState]) -> list[RecipientResult]:
        deliverer = self.gateway.deliverer
        # the gateway's Deliverer offers its coroutine: awaited directly, without the Deferreds of
        # ``deliver`` and maybeDeferred (a test's stand-in may offer ``deliver`` alone); looked up on
        # the class, so a wrapper passing unknown names on through __getattr__ keeps its ``deliver``
        direct = deliverer.deliver_async if getattr(type(deliverer), "deliver_async", None) is not None else None
        try:
            if direct is not None:
                results = await direct(entry, data, due)
            else:
                results = await defer.maybeDeferred(deliverer.deliver, entry, data, due)
        except Exception:
            log.failure("queue {id}: delivery raised", id=entry.id)
            return [RecipientResult(r.address, R.QUEUE_ERROR) for r in due]
        return list(results or [])

    def _apply(self, entry: QueueEntry, due: list[RecipientState], results: list[RecipientResult],
               now: float, failures: list, outcomes: list) -> None:
        """Fold the delivery agent's answers into the recipient states."""
        # address (as given, then case-folded) -> the states still waiting for a result, in order:
        # one pass, whatever the number of recipients
        exact: dict[str, list[RecipientState]] = {}
        folded: dict[str, list[RecipientState]] = {}
        for r in due:
            exact.setdefault(r.address, []).append(r)
            folded.setdefault(r.address.lower(), []).append(r)
        settled: set[int] = set()
        for result in results:
            state = (_first_unsettled(exact.get(result.recipient), settled)
                     or _first_unsettled(folded.get(result.recipient.lower()), settled))
            if state is None:
                log.warn("queue {id}: result for unknown recipient {rcpt}", id=entry.id, rcpt=result.recipient)
                continue
            settled.add(id(state))
            self._apply_one(state, result, now, failures, outcomes)
        for state in due:
            if id(state) not in settled:
                self._apply_one(state, RecipientResult(state.address, R.NO_RESULT), now, failures, outcomes)

    def _apply_one(self, r: RecipientState, result: RecipientResult, now: float,
                   failures: list, outcomes: list) -> None:
        reply = result.reply
        r.last_hop = result.hop or r.last_hop
        outcome = result.outcome
        if outcome is Outcome.DELIVERED:
            r.status, r.held_reason = DELIVERED, None
            outcomes.append((outcome, r.address, reply, result))
        elif outcome is Outcome.FAILED:
            r.status, r.last_error, r.held_reason = FAILED, str(reply), None
            failures.append((r, reply))
            outcomes.append((outcome, r.address, reply, result))
        elif outcome is Outcome.HELD:
            r.next_attempt = max(float(result.held_until or 0), now + MIN_INTERVAL)
            r.held_reason = reply.text or str(reply)
        else:
            r.attempts += 1
            r.next_attempt = now + max(self._qcfg.retry_interval(r.attempts), MIN_INTERVAL)
            r.last_error, r.held_reason = str(reply), None
            outcomes.append((outcome, r.address, reply, result))

    # -- a message the spool cannot give back -------------------------------------------------------

    async def _quarantine(self, entry: QueueEntry, reason: str) -> None:
        """Take ``entry`` out of the queue, move its files to the spool's ``corrupt/`` area with the
        envelope as the queue knew it (``smtpgw queue list`` shows it there), log it once, and tell
        the sender and the postmaster that its pending recipients will not get it."""
        self._entries.pop(entry.id, None)
        self._scheduler.discard(entry.id)
        self._unready(entry.id)
        self._drop_first_data(entry)
        self._not_before.pop(entry.id, None)
        entry.extra[CORRUPT] = reason
        try:
            where = "moved to " + await self._spool.quarantine(entry)
        except Exception as e:
            where = f"left where it was: cannot move it to corrupt/ ({e})"
        await self._lost(entry, reason, where)

    async def _lost(self, entry: QueueEntry, reason: str, where: str) -> None:
        """Log a message moved to ``corrupt/`` once, and tell its sender and the postmaster (5.3.0)
        that its pending recipients will not get it; at run time and for what a start-up scan found."""
        lost = entry.pending()
        log.error("queue {id}: {reason}; {where}; {n} recipient(s) not delivered, sender <{sender}>",
                  id=entry.id, reason=reason, where=where, n=len(lost), sender=entry.sender)
        if lost and not entry.extra.get(DOUBLE_BOUNCE):
            reply = R.message_lost(reason)
            results = [(r, reply) for r in lost]
            await self._report(entry, results, dsn.FAILED, None)
            if entry.sender:                    # _report told the sender; the postmaster gets a copy
                await self._report(entry, results, dsn.FAILED, None, to_postmaster=True)

    # -- notices ------------------------------------------------------------------------------------

    def _wants_delay_notice(self, entry: QueueEntry) -> bool:
        if entry.delay_notified or not entry.sender or entry.extra.get(DSN_KIND):
            return False
        return self._notify_allows(entry, "DELAY", [r.address for r in entry.pending()])

    def _delay_notice_due(self, entry: QueueEntry, now: float) -> bool:
        q = self._qcfg
        return (q.delay_notification > 0 and not entry.is_done() and self._wants_delay_notice(entry)
                and now >= entry.received_at + q.delay_notification)

    @staticmethod
    def _notify_allows(entry: QueueEntry, kind: str, addresses: list[str]) -> bool:
        """RFC 3461 NOTIFY: absent means FAILURE (and DELAY at our discretion); NEVER means none."""
        params = entry.extra.get(RCPT_PARAMS) or {}
        for address in addresses:
            notify = (params.get(address) or {}).get("NOTIFY")
            if not notify:
                return True
            if kind in {n.strip().upper() for n in notify.split(",")}:
                return True
        return False

    async def _report(self, entry: QueueEntry, results: list[tuple[RecipientState, Reply]],
                      action: str, original: bytes | None, to_postmaster: bool = False) -> None:
        """Queue a DSN about ``results``; never to the null sender, never about a double bounce.
        Success reports come already filtered by NOTIFY (mta.dsn.params.success_notices).
        ``to_postmaster``: a copy for the postmaster whatever the sender asked (its own failure is
        only logged)."""
        success = action in dsn.SUCCESS_ACTIONS
        if not success and not to_postmaster:
            kind = "FAILURE" if action == dsn.FAILED else "DELAY"
            results = [(r, rep) for r, rep in results if self._notify_allows(entry, kind, [r.address])]
        if not results:
            return
        addresses = ", ".join(r.address for r, _ in results)
        if entry.extra.get(DOUBLE_BOUNCE):
            log.warn("queue {id}: postmaster notice undeliverable to {rcpts}; dropped",
                     id=entry.id, rcpts=addresses)
            self.gateway.hooks.event("ndr", "minimum", "double bounce dropped", id=entry.id, recipients=addresses)
            return
        postmaster = self.gateway.config.gateway.postmaster
        to = postmaster if to_postmaster else (entry.sender or postmaster)
        if not to:
            log.warn("queue {id}: no postmaster configured; report on {rcpts} dropped", id=entry.id, rcpts=addresses)
            return
        extra: dict[str, Any] = {DSN_KIND: action, "about": entry.id}
        if not entry.sender or to_postmaster:
            extra[DOUBLE_BOUNCE] = True
        build = dsn.build_success_dsn if success else dsn.build_dsn
        data = build(self.gateway.config, entry, results, action, original, to=to, now=self._now())
        try:
            dsn_id = await self.inject("", [to], data, extra)
        except Exception:
            log.failure("queue {id}: could not queue the {action} report to {to}", id=entry.id, action=action, to=to)
            return
        maillog.of(self.gateway).write(mail_lines.notification(entry, action, dsn_id))
        self.gateway.hooks.event("ndr", "medium", f"{action} report queued", id=entry.id, report=dsn_id,
                                 to=to, recipients=addresses)

    # -- misc ---------------------------------------------------------------------------------------

    @staticmethod
    def _log_failure(failure: Any, what: str, entry_id: str) -> None:
        log.failure("queue {id}: {what} failed", failure, id=entry_id, what=what)


__all__ = ["QueueManager", "PENDING", "DELIVERED", "FAILED", "HELD", "HANDING", "HANDED_FROM", "CORRUPT", "is_held",
           "NotHandedOver", "UnreadableMessage"]
