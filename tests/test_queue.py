"""The queue manager: retries, exactness across retries, expiry, notices, concurrency, restart.

Time is a ``task.Clock`` and the spool a ``MemorySpool`` (except for the restart test, which reads a
real filesystem spool back), so every schedule is checked to the second without waiting.
"""
from __future__ import annotations

import email
import email.policy
import os
import shutil
import tempfile

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mta.config import Config, GatewayConfig, QueueConfig
from mta.model.envelope import Envelope, Session
from mta.plugin.manager import Hooks
from mta.plugin.hookspecs import hookimpl
from mta.model.message import MessageData
from mta.model.nexthop import RecipientResult
from mta.queue.manager import QueueManager
from mta.model.queue_entry import QueueEntry, RecipientState
from mta.smtp.reply import Reply
from mta.spool.store import MemorySpool, Spool
from mta.workers.identity import SINGLE
from mta.maillog import MailLog

OK = Reply(250, "2.0.0", "Ok: queued")
TEMP = Reply(451, "4.4.1", "Connection timed out")
PERM = Reply(550, "5.1.1", "User unknown")
START = 1_700_000_000.0
BODY = b"From: alice@client.test\r\nSubject: hello\r\n\r\nHi\r\n"


def make_config(**queue) -> Config:
    q = dict(retry=(60.0, 120.0, 300.0, 900.0), delay_notification=3600.0, expire=4 * 3600.0)
    q.update(queue)
    return Config(gateway=GatewayConfig(hostname="gw.test", spool="unused", postmaster="postmaster@gw.test",
                                        queue=QueueConfig(**q)),
                  virtual_servers=(), connectors=())


class FakeDeliverer:
    """Answers from a script per address (the last answer repeats); unknown addresses get 250.

    ``pending=True`` makes every call return a Deferred the test fires itself.
    """

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.script: dict[str, list] = {}
        self.calls: list[tuple[float, str, bytes, list[str]]] = []
        self.pending = False
        self.waiting: list[tuple[defer.Deferred, list[RecipientResult]]] = []
        self.called: defer.Deferred | None = None
        self.entries: dict[str, QueueEntry] = {}    # as each was handed over

    def answer(self, address: str, *answers) -> None:
        self.script[address] = list(answers)

    def _result(self, address: str) -> RecipientResult:
        answers = self.script.get(address, [OK])
        a = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(a, tuple):          # (reply, held_until)
            return RecipientResult(address, a[0], hop="", held_until=a[1])
        return RecipientResult(address, a, hop="mx.far.test[127.0.31.9]:25")

    def deliver(self, entry: QueueEntry, data: bytes, rcpts: list[RecipientState]):
        data = data if isinstance(data, bytes) else b"".join(data)
        self.calls.append((self.clock.seconds(), entry.id, data, [r.address for r in rcpts]))
        self.entries[entry.id] = QueueEntry.from_dict(entry.to_dict())
        results = [self._result(r.address) for r in rcpts]
        if self.called is not None:
            d, self.called = self.called, None
            d.callback(entry.id)
        if self.pending:
            d = defer.Deferred()
            self.waiting.append((d, results))
            return d
        return defer.succeed(results)

    def release(self, index: int = 0) -> None:
        d, results = self.waiting.pop(index)
        d.callback(results)

    def calls_for(self, entry_id: str) -> list[tuple[float, list[str]]]:
        return [(t, rcpts) for t, i, _, rcpts in self.calls if i == entry_id]


class Recorder:
    """A plugin recording outcome hooks, with what the spool held at that moment."""

    def __init__(self, spool) -> None:
        self.spool = spool
        self.seen: list[tuple[str, str, str, int, dict | None]] = []

    def _record(self, hook, envelope, recipient, reply):
        states = getattr(self.spool, "states", {})
        stored = self.spool.get(envelope.id).to_dict() if envelope.id in states else None
        self.seen.append((hook, envelope.id, recipient, reply.code, stored))

    @hookimpl
    def smtpgw_delivered(self, envelope, recipient, reply):
        self._record("delivered", envelope, recipient, reply)

    @hookimpl
    def smtpgw_deferred(self, envelope, recipient, reply):
        self._record("deferred", envelope, recipient, reply)

    @hookimpl
    def smtpgw_bounced(self, envelope, recipient, reply):
        self._record("bounced", envelope, recipient, reply)


class FakeGateway:
    def __init__(self, config: Config | None = None, spool=None, clock: task.Clock | None = None) -> None:
        self.reactor = clock or task.Clock()
        self.reactor.advance(START)
        self.config = config or make_config()
        self.spool = spool if spool is not None else MemorySpool()
        self.worker = SINGLE
        self.mail_log = MailLog(self.reactor)
        self.hooks = Hooks()
        self.deliverer = FakeDeliverer(self.reactor)
        self.recorder = Recorder(self.spool)
        self.hooks.register(self.recorder, name="recorder")


def step_through(clock: task.Clock, target: float) -> None:
    while True:
        calls = [c.getTime() for c in clock.getDelayedCalls() if c.getTime() <= target]
        if not calls:
            break
        clock.advance(max(0.0, min(calls) - clock.seconds()))
    clock.advance(target - clock.seconds())


def session() -> Session:
    return Session(id="s1", virtual_server="Default", peer_host="127.0.31.1", peer_port=40000,
                   local_host="127.0.31.2", local_port=25, helo="client.test")


def envelope(sender: str = "alice@client.test", recipients=("bob@far.test",), **kw) -> Envelope:
    from mta.model.envelope import new_id
    return Envelope(id=new_id(), sender=sender, recipients=list(recipients), **kw)


def submit(qm: QueueManager, env: Envelope, body: bytes = BODY) -> str:
    ids = []
    qm.submit(session(), env, MessageData([body])).addCallback(ids.append)
    assert ids, "MemorySpool puts fire at once"
    return ids[0]


def reports(gw: FakeGateway, original_id: str | None = None) -> list[tuple[QueueEntry, email.message.Message]]:
    """DSNs the queue injected (still in the spool or already handed to the deliverer)."""
    out = {}
    for _, entry_id, data, rcpts in gw.deliverer.calls:
        out.setdefault(entry_id, data)
    for entry_id, data in gw.spool.messages.items():
        out.setdefault(entry_id, data)
    found = []
    for entry_id, data in out.items():
        msg = email.message_from_bytes(data, policy=email.policy.default)
        if msg.get_content_type() == "multipart/report":
            found.append((entry_id, msg))
    return found


def dsn_fields(msg) -> list:
    part = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"][0]
    return part.get_payload()[1:]


class QueueTests(unittest.TestCase):
    def setUp(self):
        self.gw = FakeGateway()
        self.clock = self.gw.reactor
        self.qm = QueueManager(self.gw)
        self.qm.start()

    def advance_to(self, t: float) -> None:
        """Move the clock to START + t one timer at a time, so every call sees its own time."""
        step_through(self.clock, START + t)

    def test_first_attempt_uses_memory_and_removes_when_delivered(self):
        """The first attempt needs no re-read; a delivered message leaves the spool; hooks see it."""
        self.gw.spool.read = lambda entry_id: self.fail("first attempt re-read the spool")
        env = envelope(recipients=["bob@far.test", "carol@far.test"])
        entry_id = submit(self.qm, env)
        self.assertIn(entry_id, self.gw.spool.messages)
        self.assertEqual(self.gw.deliverer.calls, [], "no delivery before the 250 went out")
        self.clock.advance(0)
        [(t, i, data, rcpts)] = self.gw.deliverer.calls
        self.assertEqual((i, data, rcpts), (entry_id, BODY, ["bob@far.test", "carol@far.test"]))
        self.assertNotIn(entry_id, self.gw.spool.messages)
        self.assertEqual([(h, r) for h, _, r, _, _ in self.gw.recorder.seen],
                         [("delivered", "bob@far.test"), ("delivered", "carol@far.test")])
        self.assertEqual(self.qm.entries(), [])

    def test_retry_schedule_first_second_third_subsequent(self):
        self.gw.deliverer.answer("bob@far.test", TEMP)
        entry_id = submit(self.qm, envelope())
        # 0; +60 (1st interval); +120 (2nd); +300 (3rd); then +900 each time
        expected = [0, 60, 180, 480, 1380, 2280, 3180]
        for t in expected:
            self.advance_to(t)
        self.assertEqual([t - START for t, _ in self.gw.deliverer.calls_for(entry_id)], expected)
        stored = self.gw.spool.get(entry_id).rcpts[0]
        self.assertEqual((stored.status, stored.attempts), ("pending", 7))
        self.assertEqual(stored.last_error, "451 4.4.1 Connection timed out")
        self.assertEqual(stored.next_attempt, START + 3180 + 900)

    def test_retry_times_exact(self):
        """Nothing is attempted a second early; the stored attempt count follows every try."""
        self.gw.deliverer.answer("bob@far.test", TEMP)
        entry_id = submit(self.qm, envelope())
        self.clock.advance(0)
        self.clock.advance(59)
        self.assertEqual(len(self.gw.deliverer.calls_for(entry_id)), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.gw.deliverer.calls_for(entry_id)), 2)
        self.assertEqual(self.gw.spool.get(entry_id).rcpts[0].attempts, 2)
        self.assertEqual(self.gw.spool.get(entry_id).rcpts[0].next_attempt, START + 60 + 120)

    def test_delivered_recipient_never_resent(self):
        self.gw.deliverer.answer("carol@far.test", TEMP, OK)
        entry_id = submit(self.qm, envelope(recipients=["bob@far.test", "carol@far.test"]))
        self.clock.advance(0)
        stored = self.gw.spool.get(entry_id)
        self.assertEqual([r.status for r in stored.rcpts], ["delivered", "pending"])
        self.advance_to(60)
        self.assertEqual(self.gw.deliverer.calls_for(entry_id),
                         [(START, ["bob@far.test", "carol@far.test"]), (START + 60, ["carol@far.test"])])
        self.assertNotIn(entry_id, self.gw.spool.messages)

    def test_retry_reads_the_spool(self):
        """Only the first attempt has the message in memory; later ones read it back intact."""
        self.gw.deliverer.answer("bob@far.test", TEMP, OK)
        entry_id = submit(self.qm, envelope())
        self.clock.advance(0)
        self.assertEqual(self.qm._first_data, {})
        self.advance_to(60)
        self.assertEqual([d for _, i, d, _ in self.gw.deliverer.calls if i == entry_id], [BODY, BODY])

    def test_state_is_durable_before_hooks_run(self):
        self.gw.deliverer.answer("carol@far.test", TEMP)
        entry_id = submit(self.qm, envelope(recipients=["bob@far.test", "carol@far.test"]))
        self.clock.advance(0)
        seen = {r: stored for h, i, r, _, stored in self.gw.recorder.seen if i == entry_id}
        for address in ("bob@far.test", "carol@far.test"):
            rc = {r["address"]: r for r in seen[address]["rcpts"]}
            self.assertEqual(rc["bob@far.test"]["status"], "delivered")
            self.assertEqual(rc["carol@far.test"]["attempts"], 1)

    def test_permanent_failure_sends_one_dsn_to_sender(self):
        self.gw.deliverer.answer("bob@far.test", PERM)
        self.gw.deliverer.answer("carol@far.test", PERM)
        entry_id = submit(self.qm, envelope(recipients=["bob@far.test", "carol@far.test", "dave@far.test"]))
        self.clock.advance(0)
        self.assertNotIn(entry_id, self.gw.spool.messages)
        [(dsn_id, msg)] = reports(self.gw)
        self.assertEqual(msg["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual([f["Final-Recipient"] for f in dsn_fields(msg)],
                         ["rfc822; bob@far.test", "rfc822; carol@far.test"])
        self.assertEqual({f["Status"] for f in dsn_fields(msg)}, {"5.1.1"})
        self.clock.advance(0)   # the DSN itself is delivered: null sender, to the original sender
        [(t, i, data, rcpts)] = [c for c in self.gw.deliverer.calls if c[1] == dsn_id]
        self.assertEqual(rcpts, ["alice@client.test"])
        self.assertEqual([h for h, i, _, _, _ in self.gw.recorder.seen if i == entry_id],
                         ["bounced", "bounced", "delivered"])

    def test_dsn_envelope_sender_is_null(self):
        self.gw.deliverer.answer("bob@far.test", PERM)
        submit(self.qm, envelope())
        self.clock.advance(0)
        [(dsn_id, _)] = reports(self.gw)
        stored = self.gw.deliverer.entries[dsn_id]
        self.assertEqual((stored.sender, stored.recipients), ("", ["alice@client.test"]))
        self.assertEqual(stored.extra["dsn"], "failed")

    def test_expiry_fails_with_4_4_7_and_reports(self):
        self.gw.deliverer.answer("bob@far.test", TEMP)
        entry_id = submit(self.qm, envelope())
        self.advance_to(4 * 3600 - 1)
        self.assertIn(entry_id, self.gw.spool.messages)
        attempts_before = len(self.gw.deliverer.calls_for(entry_id))
        self.advance_to(4 * 3600)
        self.assertNotIn(entry_id, self.gw.spool.messages)
        self.assertEqual(len(self.gw.deliverer.calls_for(entry_id)), attempts_before, "no attempt after expiry")
        failed = [(m, f) for _, m in reports(self.gw) for f in dsn_fields(m) if f["Action"] == "failed"]
        [(msg, fields)] = failed
        self.assertEqual(fields["Status"], "4.4.7")
        self.assertIn("expired", fields["Diagnostic-Code"])
        self.assertIn("Connection timed out", fields["Diagnostic-Code"])
        self.assertEqual(msg["To"].addresses[0].addr_spec, "alice@client.test")
        bounced = [(h, code) for h, i, _, code, _ in self.gw.recorder.seen if i == entry_id and h == "bounced"]
        self.assertEqual(len(bounced), 1)

    def test_delay_notice_sent_once(self):
        self.gw.deliverer.answer("bob@far.test", TEMP)
        entry_id = submit(self.qm, envelope())
        self.advance_to(3600 - 1)
        self.assertEqual(reports(self.gw), [])
        self.advance_to(3 * 3600)
        delayed = [(i, m) for i, m in reports(self.gw) if dsn_fields(m)[0]["Action"] == "delayed"]
        self.assertEqual(len(delayed), 1)
        msg = delayed[0][1]
        self.assertEqual(msg["Subject"], "Delayed Mail (still being retried)")
        self.assertEqual(dsn_fields(msg)[0]["Status"], "4.4.1")
        self.assertTrue(self.gw.spool.get(entry_id).delay_notified)
        # sent at the threshold itself (a wake-up of its own), and delivered at once
        self.assertEqual([t for t, i, _, _ in self.gw.deliverer.calls if i == delayed[0][0]], [START + 3600])

    def test_no_delay_notice_when_notify_excludes_it(self):
        self.gw.deliverer.answer("bob@far.test", TEMP)
        submit(self.qm, envelope(rcpt_params={"bob@far.test": {"NOTIFY": "FAILURE"}}))
        self.advance_to(2 * 3600)
        self.assertEqual(reports(self.gw), [])

    def test_notify_never_suppresses_failure_report(self):
        self.gw.deliverer.answer("bob@far.test", PERM)
        submit(self.qm, envelope(rcpt_params={"bob@far.test": {"NOTIFY": "NEVER"}}))
        self.clock.advance(0)
        self.assertEqual(reports(self.gw), [])

    def test_null_sender_failure_goes_to_postmaster(self):
        self.gw.deliverer.answer("bob@far.test", PERM)
        entry_id = submit(self.qm, envelope(sender=""))
        self.clock.advance(0)
        self.assertNotIn(entry_id, self.gw.spool.messages)
        [(dsn_id, msg)] = reports(self.gw)
        stored = self.gw.deliverer.entries[dsn_id]
        self.assertEqual((stored.sender, stored.recipients), ("", ["postmaster@gw.test"]))
        self.assertTrue(stored.extra["double_bounce"])
        self.assertEqual(msg["To"].addresses[0].addr_spec, "postmaster@gw.test")

    def test_bounce_of_a_bounce_goes_to_postmaster_and_its_failure_is_dropped(self):
        self.gw.deliverer.answer("bob@far.test", PERM)
        self.gw.deliverer.answer("alice@client.test", PERM)       # the DSN to the sender fails too
        self.gw.deliverer.answer("postmaster@gw.test", PERM)      # and so does the postmaster copy
        submit(self.qm, envelope())
        for _ in range(5):
            self.clock.advance(0)
        delivered_to = [rcpts for _, _, _, rcpts in self.gw.deliverer.calls]
        self.assertEqual(delivered_to, [["bob@far.test"], ["alice@client.test"], ["postmaster@gw.test"]])
        self.assertEqual(self.gw.spool.messages, {}, "nothing left, nothing looping")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_held_results_do_not_count_as_attempts(self):
        hold = (Reply(451, "4.4.5", "connector schedule closed"), START + 7200)
        self.gw.deliverer.answer("bob@far.test", hold, hold, OK)
        entry_id = submit(self.qm, envelope(rcpt_params={"bob@far.test": {"NOTIFY": "FAILURE"}}))
        self.clock.advance(0)
        stored = self.gw.spool.get(entry_id).rcpts[0]
        self.assertEqual((stored.attempts, stored.next_attempt, stored.held_reason),
                         (0, START + 7200, "connector schedule closed"))
        self.assertEqual([h for h, *_ in self.gw.recorder.seen], [], "a hold is not a deferral")
        self.advance_to(7199)
        self.assertEqual(len(self.gw.deliverer.calls), 1)
        self.advance_to(7200)        # held again: still no attempt counted
        self.assertEqual(self.gw.spool.get(entry_id).rcpts[0].attempts, 0)
        self.advance_to(7201)
        self.assertEqual(len(self.gw.deliverer.calls), 3)
        self.assertNotIn(entry_id, self.gw.spool.messages)

    def test_wake_runs_a_deferred_entry_now(self):
        self.gw.deliverer.answer("bob@far.test", TEMP, OK)
        self.gw.deliverer.answer("x@other.test", TEMP)
        entry_id = submit(self.qm, envelope())
        other = submit(self.qm, envelope(recipients=["x@other.test"]))
        self.clock.advance(0)
        self.clock.advance(10)
        n = self.qm.wake(lambda e: any(r.endswith("@far.test") for r in e.recipients))
        self.assertEqual(n, 1)
        self.assertEqual(len(self.gw.deliverer.calls), 2, "wake answers before delivering")
        self.clock.advance(0)
        self.assertEqual([t - START for t, _ in self.gw.deliverer.calls_for(entry_id)], [0, 10])
        self.assertEqual(len(self.gw.deliverer.calls_for(other)), 1)
        self.assertNotIn(entry_id, self.gw.spool.messages)

    def test_concurrency_cap_and_order(self):
        self.qm.max_active = 2
        self.gw.deliverer.pending = True
        ids = [submit(self.qm, envelope()) for _ in range(5)]
        self.clock.advance(0)
        self.assertEqual([c[1] for c in self.gw.deliverer.calls], ids[:2])
        self.gw.deliverer.release(0)
        self.clock.advance(0)           # two started in that turn: the next starts in the next one
        self.assertEqual([c[1] for c in self.gw.deliverer.calls], ids[:3])
        while self.gw.deliverer.waiting:
            self.gw.deliverer.release(0)
            self.clock.advance(0)
        self.assertEqual([c[1] for c in self.gw.deliverer.calls], ids)
        self.assertEqual(self.gw.spool.messages, {})

    def test_attempts_start_a_few_per_turn(self):
        """Ten messages ready at once: two attempts start, then the loop gets a turn (to write the
        250s waiting) before the next two, and so on until all ten run."""
        def one_turn():
            """The calls due now, not those they add (as a real reactor's turn: those run after
            its next poll); Clock.advance(0) would run them all at once."""
            due = [c for c in self.clock.calls if c.getTime() <= self.clock.seconds()]
            for call in due:
                self.clock.calls.remove(call)
                call.called = True
                call.func(*call.args, **call.kw)

        self.gw.deliverer.pending = True
        ids = [submit(self.qm, envelope()) for _ in range(10)]
        started = []
        while len(self.gw.deliverer.calls) < len(ids) and len(started) < 20:
            one_turn()
            started.append(len(self.gw.deliverer.calls))
        self.assertEqual(started[-5:], [2, 4, 6, 8, 10])
        self.assertEqual([c[1] for c in self.gw.deliverer.calls], ids)
        while self.gw.deliverer.waiting:
            self.gw.deliverer.release(0)
            self.clock.advance(0)
        self.assertEqual(self.gw.spool.messages, {})

    def test_never_the_same_entry_twice_at_once(self):
        self.gw.deliverer.pending = True
        self.gw.deliverer.answer("bob@far.test", TEMP, OK)
        entry_id = submit(self.qm, envelope())
        self.clock.advance(0)
        self.assertEqual(self.qm.wake(), 1)
        self.clock.advance(0)
        self.assertEqual(len(self.gw.deliverer.calls), 1, "still running: no second delivery")
        self.gw.deliverer.release()
        self.clock.advance(0)
        self.assertEqual(len(self.gw.deliverer.calls), 2, "the wake-up runs once the first is done")
        self.gw.deliverer.release()
        self.assertNotIn(entry_id, self.gw.spool.messages)

    def test_deliverer_error_is_a_temporary_failure(self):
        def broken(entry, data, rcpts):
            raise RuntimeError("boom")
        self.gw.deliverer.deliver = broken
        entry_id = submit(self.qm, envelope())
        self.clock.advance(0)
        stored = self.gw.spool.get(entry_id).rcpts[0]
        self.assertEqual((stored.status, stored.attempts), ("pending", 1))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_missing_result_is_a_temporary_failure(self):
        self.gw.deliverer.deliver = lambda entry, data, rcpts: defer.succeed([])
        entry_id = submit(self.qm, envelope())
        self.clock.advance(0)
        stored = self.gw.spool.get(entry_id).rcpts[0]
        self.assertEqual((stored.status, stored.attempts), ("pending", 1))

    def test_stop_waits_for_deliveries_in_flight(self):
        self.gw.deliverer.pending = True
        submit(self.qm, envelope())
        self.clock.advance(0)
        stopped = []
        self.qm.stop().addCallback(stopped.append)
        self.assertEqual(stopped, [])
        self.gw.deliverer.release()
        self.assertEqual(len(stopped), 1)
        self.assertFalse(self.gw.spool.opened)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_is_bounded(self):
        self.gw.deliverer.pending = True
        submit(self.qm, envelope())
        self.clock.advance(0)
        stopped = []
        self.qm.stop().addCallback(stopped.append)
        self.clock.advance(self.qm.stop_timeout)
        self.assertEqual(len(stopped), 1)

    def test_one_timer_for_the_whole_queue(self):
        """The scheduler keeps a single callLater however many entries wait."""
        self.gw.deliverer.answer("bob@far.test", TEMP)
        for _ in range(50):
            submit(self.qm, envelope())
        self.clock.advance(0)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(len(self.qm.entries()), 50)


class RestartTests(unittest.TestCase):
    """start() rebuilds the schedule from what a filesystem spool holds."""

    timeout = 20

    @defer.inlineCallbacks
    def test_start_rebuilds_schedule_from_disk(self):
        directory = tempfile.mkdtemp(prefix="smtpgw-queue-")
        self.addCleanup(shutil.rmtree, directory, True)
        writer = Spool(directory, reactor=reactor)
        writer.open()
        self.addCleanup(writer.close)

        def entry(i: str, **state) -> QueueEntry:
            return QueueEntry(id=i, sender="alice@client.test", rcpts=[RecipientState(f"{i}@far.test", **state)],
                              received_at=START - 100)

        due = entry("due0001")
        later = entry("later001", attempts=2, next_attempt=START + 500, last_error="451 4.4.1 timeout")
        finished = entry("done0001")
        for e in (due, later, finished):
            yield writer.put(e, [BODY + e.id.encode()])
        finished.rcpts[0].status = "delivered"
        yield writer.update(finished)

        gw = FakeGateway(spool=Spool(directory, reactor=reactor))
        qm = QueueManager(gw)
        loaded = yield qm.start()
        self.addCleanup(lambda: qm.stop())
        self.assertEqual(loaded, 2)
        self.assertEqual(sorted(e.id for e in qm.entries()), ["due0001", "later001"])

        called = gw.deliverer.called = defer.Deferred()
        gw.reactor.advance(0)
        self.assertEqual((yield called), "due0001")
        self.assertEqual(gw.deliverer.calls[0][2], BODY + b"due0001", "read back from disk")
        gw.reactor.advance(499)
        self.assertEqual(len(gw.deliverer.calls), 1)
        called = gw.deliverer.called = defer.Deferred()
        gw.reactor.advance(1)
        self.assertEqual((yield called), "later001")
        finished_file = os.path.join(directory, "queue", "done0001")
        for _ in range(250):            # start() removes it without waiting: await the unlink
            if not os.path.exists(finished_file):
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertFalse(os.path.exists(finished_file))


class SchedulerTests(unittest.TestCase):
    """The heap behind the queue: one timer, rescheduling either way, discards."""

    def setUp(self):
        from mta.queue.scheduler import Scheduler
        self.clock = task.Clock()
        self.fired: list[tuple[float, list[str]]] = []
        self.s = Scheduler(self.clock, lambda ids: self.fired.append((self.clock.seconds(), ids)))

    def test_reschedule_earlier_and_later(self):
        self.s.schedule("a", 100)
        self.s.schedule("b", 50)
        self.s.schedule("a", 10)       # earlier than planned
        self.s.schedule("b", 200)      # later than planned
        step_through(self.clock, 300)
        self.assertEqual(self.fired, [(10, ["a"]), (200, ["b"])])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_discard_and_same_time_batch(self):
        for name in ("x", "y", "z"):
            self.s.schedule(name, 5)
        self.s.discard("y")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        step_through(self.clock, 10)
        self.assertEqual(self.fired, [(5, ["x", "z"])])
        self.assertEqual(len(self.s), 0)

    def test_stale_entries_are_compacted(self):
        for i in range(5000):
            self.s.schedule("same", 1000 + i)
        self.assertLess(len(self.s._heap), 3000)
        step_through(self.clock, 10000)
        self.assertEqual(self.fired, [(5999, ["same"])])
