"""The site side's extra moments and means of asking the ISP: the link coming back (a delivery through
the connector succeeds after connection failures) and a trigger program instead of an SMTP command
(``etrn.run``, for ISPs that dequeue on a FINGER request or the like). Against Postfix end to end:
tests/test_etrn_postfix.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

from gwprocess import base_config
from mta.config import ConfigError, parse_config
from mta.smtp.client.etrn import DequeueError, DequeueRequest, run_trigger, trigger_argv
from mta.model.queue_entry import QueueEntry, RecipientState
from mta.smtp.reply import Reply
from smtpgw_plugins.etrn_dequeue import EtrnDequeue
from smtpgw_plugins.etrn_dequeue import requester as requester_module

PY = Path(sys.executable).name


def site_config(**etrn) -> dict:
    cfg = base_config(Path("/nonexistent"), listen="127.0.0.126:2525")
    cfg["gateway"]["local_domains"] = {"site.test": {"maildir": "/nonexistent/mail"}}
    cfg["connectors"][0]["smart_hosts"] = ["[127.0.0.127]"]
    cfg["connectors"][0]["etrn"] = {"server": "[127.0.0.125]", "domains": ["site.test"], **etrn}
    cfg["plugins"]["enabled"] = ["etrn_dequeue"]
    return cfg


def test_run_key_and_its_errors():
    etrn = parse_config(site_config(run=["finger", "{domain}@{server}"])).connectors[0].etrn
    assert etrn.run == ("finger", "{domain}@{server}")
    with pytest.raises(ConfigError, match=r"connectors\[0\].etrn.run: expected at least 1 entry"):
        parse_config(site_config(run=[]))
    with pytest.raises(ConfigError, match=r"connectors\[0\].etrn.run: a trigger program cannot receive mail"):
        parse_config(site_config(run=["x"], command="ATRN", auth={"username": "u", "password": "p"}))


def test_trigger_argv_and_label():
    req = DequeueRequest(host="isp.example", port=25, domains=("a.test",),
                         run=("/usr/bin/finger", "{domain}@{server}", "{other}"))
    assert trigger_argv(req, "a.test") == ["/usr/bin/finger", "a.test@isp.example", "{other}"]
    assert req.label == "finger"
    assert DequeueRequest(host="h", port=25, domains=(), command="DEQUEUE {domain}").label == "DEQUEUE"


# -- the link coming back ----------------------------------------------------------------------------

@pytest.fixture
def site(monkeypatch):
    """The plugin on a Clock, with request_dequeue replaced by a recorder that answers ``answers``."""
    from mta.app.gateway import Gateway

    calls: list[DequeueRequest] = []
    answers: list = []

    async def fake(clock, req, receiver=None):
        calls.append(req)
        answer = answers.pop(0) if answers else [("site.test", Reply(250, "", "Queuing started"))]
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(requester_module, "request_dequeue", fake)
    config = parse_config(site_config())
    clock = Clock()
    plugin = EtrnDequeue()
    plugin.smtpgw_configure(config, Gateway(config, clock, load_plugins=False))
    clock.advance(0)                                    # the request at start-up
    return plugin, calls, answers


def outcome(plugin: EtrnDequeue, rcpt: str, reply: Reply) -> None:
    entry = QueueEntry(id="e1", sender="a@site.test", rcpts=[RecipientState(rcpt)], received_at=0)
    if reply.is_positive:
        entry.rcpts[0].status = "delivered"
        plugin.smtpgw_delivered(entry, rcpt, reply)
    else:
        plugin.smtpgw_deferred(entry, rcpt, reply)


def test_a_delivery_after_connection_failures_asks_again(site):
    plugin, calls, _ = site
    assert len(calls) == 1
    ok = Reply(250, "2.0.0", "OK")
    outcome(plugin, "x@elsewhere.test", ok)                    # the link was never down: no request
    outcome(plugin, "x@elsewhere.test", Reply(451, "4.4.5", "held: outside the connector's schedule"))
    outcome(plugin, "x@elsewhere.test", Reply(450, "4.2.1", "mailbox busy"))
    outcome(plugin, "x@elsewhere.test", ok)
    assert len(calls) == 1

    outcome(plugin, "x@elsewhere.test", Reply(451, "4.4.1", "connection to [127.0.0.127]:25 failed"))
    outcome(plugin, "y@elsewhere.test", Reply(451, "4.4.2", "connection lost"))
    outcome(plugin, "bob@site.test", ok)                       # local delivery says nothing of the link
    assert len(calls) == 1 and plugin.requesters[0].link_down
    outcome(plugin, "x@elsewhere.test", ok)                    # the link is back
    assert len(calls) == 2 and not plugin.requesters[0].link_down
    outcome(plugin, "y@elsewhere.test", ok)
    assert len(calls) == 2


def test_a_request_that_cannot_connect_marks_the_link_down(site):
    plugin, calls, answers = site
    answers.append(DequeueError(Reply(451, "4.4.1", "connection to 127.0.0.125:25 failed")))
    plugin.requesters[0].run_now()
    assert len(calls) == 2 and plugin.requesters[0].link_down
    outcome(plugin, "x@elsewhere.test", Reply(250, "2.0.0", "OK"))
    assert len(calls) == 3 and not plugin.requesters[0].link_down
    answers.append(DequeueError(Reply(554, "5.7.1", "Access denied")))     # refused, not unreachable
    plugin.requesters[0].run_now()
    assert not plugin.requesters[0].link_down


# -- a trigger program ---------------------------------------------------------------------------------

class RunTrigger(unittest.TestCase):
    """Real processes on the real reactor."""

    def request(self, *code: str, timeout: float = 30.0, domains=("a.test", "b.test")) -> DequeueRequest:
        run = (sys.executable, "-c", *code) if code else ("/nonexistent/trigger",)
        return DequeueRequest(host="isp.example", port=25, domains=tuple(domains), run=run, timeout=timeout)

    @defer.inlineCallbacks
    def test_exit_zero_per_domain(self):
        code = "import sys; print('noise'); print('asked', sys.argv[1], 'at', sys.argv[2])"
        results = yield defer.Deferred.fromCoroutine(
            run_trigger(reactor, self.request(code, "{domain}", "{server}")))
        assert results == [
            ("a.test", Reply(250, "2.0.0", f"{PY} exited 0: asked a.test at isp.example")),
            ("b.test", Reply(250, "2.0.0", f"{PY} exited 0: asked b.test at isp.example"))]

    @defer.inlineCallbacks
    def test_failure_status_and_message(self):
        code = "import sys; sys.stderr.write('no such customer\\n'); sys.exit(3)"
        req = self.request(code, domains=["a.test"])
        results = yield defer.Deferred.fromCoroutine(run_trigger(reactor, req))
        assert results == [("a.test", Reply(451, "4.3.0", f"{PY} exited 3: no such customer"))]

    @defer.inlineCallbacks
    def test_killed_after_the_timeout(self):
        code = "import time; print('waiting', flush=True); time.sleep(60)"
        req = self.request(code, timeout=0.5, domains=["a.test"])
        results = yield defer.Deferred.fromCoroutine(run_trigger(reactor, req))
        assert results == [("a.test", Reply(451, "4.4.2", f"{PY} killed after 0.5s: waiting"))]

    @defer.inlineCallbacks
    def test_a_missing_program_is_a_failure(self):
        results = yield defer.Deferred.fromCoroutine(run_trigger(reactor, self.request(domains=["a.test"])))
        (domain, reply), = results
        assert domain == "a.test" and reply.code == 451
        assert reply.text.startswith("trigger: cannot run /nonexistent/trigger")
