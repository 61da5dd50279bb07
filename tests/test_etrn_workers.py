"""Remote-triggered delivery on a gateway of two workers (``gateway.workers: 2``): mail held by both
processes, one ETRN (answered by whichever worker the kernel gives the connection) releases all of
it, and one ATRN connection carries all of it, each message exactly once. Real twistd processes on
loopback; the ISP and site set-up of tests/test_etrn_e2e.py."""
from __future__ import annotations

import email
import json
import smtplib
import uuid

import pytest

from gwprocess import maildir_messages, wait_until
from test_etrn_e2e import (HELD, ISP, PEER, PORT, SITE, command, gateways, isp_config, site_config,  # noqa: F401
                           with_odmr)
from mta.cluster.triggers import MARKERS
from mta.workers.identity import owner_of


def two_workers(tmp, **kw) -> dict:
    cfg = isp_config(tmp, **kw)
    cfg["gateway"]["workers"] = 2
    cfg["plugins"]["etrn_dequeue"]["rate_limit"] = {"requests": 10, "per": "1m"}
    return cfg


def hold_in_both(isp, rcpt: str = "bob@site.test", least: int = 4) -> dict[str, str]:
    """Send one message per connection until both workers queued some; ``{queue id: Message-ID}``."""
    assert wait_until(lambda: "control.sock.1" in isp.log(), 30)
    sent: dict[str, str] = {}
    for i in range(200):
        mid = f"<{uuid.uuid4().hex}@isp.test>"
        with smtplib.SMTP(ISP, PORT, timeout=30) as s:
            s.ehlo("client.test")
            s.mail("alice@isp.test")
            s.rcpt(rcpt)
            code, text = s.data(f"From: alice@isp.test\r\nTo: {rcpt}\r\nSubject: held {i}\r\n"
                                f"Message-ID: {mid}\r\n\r\nHello.\r\n")
        assert code == 250
        sent[text.decode().rsplit(" ", 1)[-1]] = mid
        if len(sent) >= least and {owner_of(q, 2) for q in sent} == {0, 1}:
            break
    assert {owner_of(q, 2) for q in sent} == {0, 1}, sent
    assert wait_until(lambda: isp.log().count(HELD) >= len(sent), 20)
    return sent


def message_ids(blobs) -> list[str]:
    return sorted(email.message_from_bytes(b)["Message-ID"] for b in blobs)


def test_one_etrn_releases_what_both_workers_hold(gateways, peers):
    peer = peers(PEER)
    isp = gateways("isp", two_workers)
    sent = hold_in_both(isp)
    code, text = command("ETRN", SITE, "site.test")
    assert (code, text) == (250, "2.0.0 Queuing for node site.test started")
    assert peer.wait_for(len(sent), 20)
    assert message_ids(m.data for m in peer.messages) == sorted(sent.values())
    assert wait_until(lambda: not any(p.is_file() for p in (isp.tmp / "spool" / "queue").iterdir()), 20)
    # nothing held by either worker now: the whole gateway says so
    assert command("ETRN", SITE, "site.test") == (251, "2.0.0 OK, no messages waiting for node site.test")
    markers = [p for p in (isp.tmp / "spool" / MARKERS).iterdir() if p.suffix == ".json"]
    assert [json.loads(p.read_text())["node"] for p in markers] == ["site.test"]    # the durable marker


def test_a_worker_that_was_restarting_catches_up_from_the_marker(gateways, peers):
    """Worker 1 is killed (the supervisor restarts it); an ETRN answered meanwhile by worker 0 is
    applied by the new worker 1 from ``<spool>/triggers`` once its queue is loaded."""
    import os
    import signal

    peer = peers(PEER)
    isp = gateways("isp", two_workers)
    sent = hold_in_both(isp, least=2)
    pid = int(isp.log().split("worker 1 started (pid ")[1].split(")")[0])
    os.kill(pid, signal.SIGSTOP)                 # worker 1 cannot answer (nor accept)...
    try:
        assert command("ETRN", SITE, "site.test")[0] == 250     # ... so worker 0 answers
        mine = [q for q in sent if owner_of(q, 2) == 0]
        assert peer.wait_for(len(mine), 20)
    finally:
        os.kill(pid, signal.SIGKILL)              # and it dies without having heard of it
    assert wait_until(lambda: isp.log().count("worker 1 started") == 2, 30)
    assert peer.wait_for(len(sent), 30)
    assert message_ids(m.data for m in peer.messages) == sorted(sent.values())


def test_atrn_over_one_connection_carries_what_both_workers_hold(gateways):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()

    def isp(tmp):
        return with_odmr(two_workers(tmp), tmp, ca)

    isp_gw = gateways("isp", isp)
    sent = hold_in_both(isp_gw, least=6)
    site = gateways("site", site_config, {
        "server": f"[{ISP}]:3366", "domains": ["site.test"], "command": "ATRN",
        "auth": {"username": "site", "password": "s3cret"}, "tls": "required"})
    mail = site.tmp / "mail"
    assert wait_until(lambda: len(maildir_messages(mail, "bob")) >= len(sent), 30)
    assert wait_until(lambda: "ATRN site.test at 127.0.0.120:3366: 250" in site.log())
    assert message_ids(maildir_messages(mail, "bob")) == sorted(sent.values())     # each exactly once
    log = isp_gw.log()
    assert log.count("handed over to worker") >= 1
    assert wait_until(lambda: not any(p.is_file() for p in (isp_gw.tmp / "spool" / "queue").iterdir()), 20)
    # one connection: the site's log shows a single ATRN exchange
    assert site.log().count("ATRN site.test at 127.0.0.120:3366: 250") == 1
