"""The queue manager when an attempt goes wrong in a way no reply describes: an exception anywhere in
the attempt, or a message the spool cannot give back. Neither may make the queue spin.

Time is a ``task.Clock``; the exception is provoked through a delivery agent that answers nonsense
(a failure the running gateway cannot be made to produce on purpose). The missing-file case against
the real daemon is in test_corrupt_queue.py.
"""
from __future__ import annotations

from twisted.internet import defer
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from mta.queue.manager import QueueManager
from test_queue import PERM, START, TEMP, FakeGateway, dsn_fields, envelope, reports, step_through, submit


class Faults(unittest.TestCase):
    def setUp(self):
        self.gw = FakeGateway()
        self.clock = self.gw.reactor
        self.qm = QueueManager(self.gw)
        self.qm.start()
        self.logged: list[dict] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def lines(self, text: str) -> list[dict]:
        return [e for e in self.logged if text in (e.get("log_format") or "")]

    def test_an_exception_in_an_attempt_waits_the_first_retry_interval(self):
        deliver = self.gw.deliverer.deliver
        self.gw.deliverer.deliver = lambda *a: (deliver(*a), defer.succeed(7))[1]   # not a list of results
        entry_id = submit(self.qm, envelope())
        step_through(self.clock, START + 59)
        self.assertEqual([t - START for t, _ in self.gw.deliverer.calls_for(entry_id)], [0],
                         "no retry before the first interval")
        step_through(self.clock, START + 60)
        self.assertEqual(len(self.gw.deliverer.calls_for(entry_id)), 2)
        step_through(self.clock, START + 600)
        attempts = len(self.gw.deliverer.calls_for(entry_id))
        self.assertEqual(attempts, 11)                          # at 0, 60, ..., 600: the first interval
        failed = self.lines("attempt failed")
        self.assertEqual(len(failed), attempts, "logged once per attempt")
        self.assertEqual({e["id"] for e in failed}, {entry_id})
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), attempts)
        self.assertIn(entry_id, {e.id for e in self.qm.entries()})

    def test_a_good_attempt_after_a_fault_keeps_the_usual_schedule(self):
        deliver = self.gw.deliverer.deliver
        broken = [True]
        self.gw.deliverer.deliver = lambda *a: (deliver(*a), defer.succeed(7) if broken.pop() else None)[1] \
            if broken else deliver(*a)
        self.gw.deliverer.answer("bob@far.test", TEMP)
        entry_id = submit(self.qm, envelope())
        step_through(self.clock, START + 60)         # the fault, then a normal deferral at +60
        step_through(self.clock, START + 119)
        self.assertEqual([t - START for t, _ in self.gw.deliverer.calls_for(entry_id)], [0, 60])
        step_through(self.clock, START + 120)        # deferred once: the first interval again
        self.assertEqual([t - START for t, _ in self.gw.deliverer.calls_for(entry_id)], [0, 60, 120])
        self.flushLoggedErrors(TypeError)

    def _lose_message(self, env) -> str:
        for rcpt in env.recipients:
            self.gw.deliverer.answer(rcpt, TEMP)
        entry_id = submit(self.qm, env)
        self.clock.advance(0)                        # first attempt (from memory): deferred
        del self.gw.spool.messages[entry_id]         # the file goes
        step_through(self.clock, START + 60)
        return entry_id

    def test_a_lost_message_goes_to_corrupt_and_sender_and_postmaster_are_told(self):
        entry_id = self._lose_message(envelope(recipients=["bob@far.test", "carol@far.test"]))
        self.assertEqual(self.qm.entries(), [])
        self.assertIn(entry_id, self.gw.spool.corrupt)
        self.assertEqual(self.gw.spool.get_corrupt(entry_id).extra["corrupt"], "message file missing")
        [moved] = self.lines("recipient(s) not delivered")
        self.assertEqual((moved["id"], moved["reason"]), (entry_id, "message file missing"))
        sent = {self.gw.deliverer.entries[i].recipients[0]: (self.gw.deliverer.entries[i], m)
                for i, m in reports(self.gw)}
        self.assertEqual(sorted(sent), ["alice@client.test", "postmaster@gw.test"])
        for to, (stored, msg) in sent.items():
            self.assertEqual([f["Status"] for f in dsn_fields(msg)], ["5.3.0", "5.3.0"])
            self.assertEqual(stored.extra.get("double_bounce", False), to == "postmaster@gw.test")
        step_through(self.clock, START + 3600)
        self.assertEqual(len(self.lines("recipient(s) not delivered")), 1, "logged once")
        self.assertEqual(len(self.gw.deliverer.calls_for(entry_id)), 1)

    def test_a_lost_bounce_is_reported_to_the_postmaster_once(self):
        self._lose_message(envelope(sender=""))
        [(dsn_id, msg)] = reports(self.gw)
        self.assertEqual(self.gw.deliverer.entries[dsn_id].recipients, ["postmaster@gw.test"])

    def test_notify_never_is_honoured_for_the_sender_not_the_postmaster(self):
        self._lose_message(envelope(rcpt_params={"bob@far.test": {"NOTIFY": "NEVER"}}))
        [(dsn_id, msg)] = reports(self.gw)
        self.assertEqual(self.gw.deliverer.entries[dsn_id].recipients, ["postmaster@gw.test"])

    def test_delete_with_a_report_when_the_message_is_gone(self):
        self.gw.deliverer.answer("bob@far.test", PERM)
        entry_id = submit(self.qm, envelope())
        del self.gw.spool.messages[entry_id]
        self.qm._first_data.clear()
        dsn_id = self.successResultOf(defer.Deferred.fromCoroutine(self.qm.delete(entry_id, notify_sender=True)))
        self.assertIsNotNone(dsn_id)
