"""The gateway's mail log as an administrator reads it: ``twistd smtpgw`` with its default diagnostic
levels, real SMTP peers as the next hop, and the Postfix-style lines in twistd.log after a delivery, a
deferral, a bounce, a local delivery and refusals (the core's and a local hook's), in text and in JSON
(``plugins.diag_logging.format: json``)."""
from __future__ import annotations

import json
import re
import smtplib

import pytest

from gwprocess import base_config, wait_until

GW_HOST, GW_PORT = "127.0.0.120", 2525
SMART_HOST = "127.0.0.121"
RELAYING, STRANGER = "127.0.0.122", "127.0.0.123"

LOCAL_POLICY = '''
from mta.plugin.hookspecs import hookimpl
from mta.smtp.reply import Reply

@hookimpl
def smtpgw_mail_from(session, sender, params):
    if sender.endswith("@spammer.example"):
        return Reply(550, "5.7.1", "Sender refused by local policy")
'''

DELAYS = r"delay=(?P<delay>[0-9.]+), delays=(?P<a>[0-9.]+)/(?P<b>[0-9.]+)/(?P<c>[0-9.]+)/(?P<d>[0-9.]+)"


def mail_lines(gw) -> list[str]:
    """The mail log's lines in twistd.log, without twistd's time and system prefix."""
    return [line.split("] ", 1)[1] for line in gw.log().splitlines() if "[smtpgw.mail#info] " in line]


def config(tmp_path, fmt: str | None = None) -> dict:
    cfg = base_config(tmp_path, listen=f"{GW_HOST}:{GW_PORT}")
    cfg["virtual_servers"][0]["relay"] = {"allow": [f"{RELAYING}/32"], "allow_authenticated": False}
    cfg["connectors"][0]["smart_hosts"] = [f"[{SMART_HOST}]"]
    policy = tmp_path / "local_policy.py"
    policy.write_text(LOCAL_POLICY)
    cfg["plugins"] = {"enabled": ["relay_acl", "smart_host", "diag_logging"], "local": [str(policy)]}
    if fmt:
        cfg["plugins"]["diag_logging"] = {"format": fmt}
    return cfg


def send(sender: str, recipients: list[str], source: str = RELAYING) -> str:
    """Relay one message; the queue id from the 250."""
    with smtplib.SMTP(GW_HOST, GW_PORT, timeout=10, source_address=(source, 0)) as s:
        s.ehlo("client.test")
        assert s.mail(sender)[0] == 250
        for r in recipients:
            assert s.rcpt(r)[0] == 250
        code, text = s.data(b"Subject: log\r\n\r\nlog test\r\n")
        assert code == 250
    return text.decode().rsplit(" ", 1)[1]


@pytest.fixture
def site(gateway, peers, tmp_path):
    def start(fmt: str | None = None):
        peer = peers(SMART_HOST)
        peer.set_reply("rcpt", lambda rcpt: {"later@remote.test": "451 4.2.0 try again later",
                                             "nobody@remote.test": "550 5.1.1 no such user"}.get(rcpt))
        return gateway(config(tmp_path, fmt)), peer
    return start


def test_delivery_deferral_bounce_and_local_lines_in_text(site):
    gw, peer = site()
    sent = send("alice@example.test", ["bob@remote.test"])
    local = send("alice@example.test", ["carol@example.test"])
    deferred = send("alice@example.test", ["later@remote.test"])
    bounced = send("alice@example.test", ["nobody@remote.test"])

    def line(queue_id: str, status: str) -> str | None:
        return next((x for x in mail_lines(gw) if x.startswith(f"{queue_id}: ") and f"status={status} " in x), None)

    assert wait_until(lambda: all((line(sent, "sent"), line(local, "sent"), line(deferred, "deferred"),
                                   line(bounced, "bounced"))))
    relay = f"{SMART_HOST}[{SMART_HOST}]:25"
    m = re.fullmatch(rf"{sent}: to=<bob@remote\.test>, relay={re.escape(relay)}, tls=none, {DELAYS}, dsn=2\.0\.0, "
                     r"status=sent \(250 .*\)", line(sent, "sent"))
    assert m, line(sent, "sent")
    parts = [float(m[k]) for k in "abcd"]
    assert float(m["delay"]) == pytest.approx(sum(parts), abs=0.05)     # Postfix rounding, two digits
    assert re.fullmatch(rf"{local}: to=<carol@example\.test>, relay=local, {DELAYS}, dsn=2\.0\.0, "
                        r"status=sent \(250 2\.0\.0 delivered to maildir\)", line(local, "sent"))
    assert re.fullmatch(rf"{deferred}: to=<later@remote\.test>, relay={re.escape(relay)}, tls=none, {DELAYS}, "
                        r"dsn=4\.2\.0, status=deferred \(451 4\.2\.0 try again later\)", line(deferred, "deferred"))
    assert re.fullmatch(rf"{bounced}: to=<nobody@remote\.test>, relay={re.escape(relay)}, tls=none, {DELAYS}, "
                        r"dsn=5\.1\.1, status=bounced \(550 5\.1\.1 no such user\)", line(bounced, "bounced"))
    lines = mail_lines(gw)
    assert f"{sent}: from=<alice@example.test>, size={size_of(lines, sent)}, nrcpt=1 (queue active)" in lines
    assert wait_until(lambda: f"{sent}: removed" in mail_lines(gw))
    assert any(re.fullmatch(rf"{bounced}: sender non-delivery notification: \w+", x) for x in mail_lines(gw))
    log = gw.log()
    # one line per outcome at the default levels: no diag copy, no "failing over" with nowhere to go
    assert "message deferred" not in log and "message delivered" not in log and "failing over" not in log
    assert "attempts=0" not in log
    first_attempt = [x for x in mail_lines(gw) if x.startswith(f"{deferred}: to=")]
    assert len(first_attempt) >= 1 and all("status=deferred" in x for x in first_attempt)


def test_refusals_by_the_core_and_a_local_hook_and_the_client_line(site):
    gw, peer = site()
    with smtplib.SMTP(GW_HOST, GW_PORT, timeout=10, source_address=(STRANGER, 0)) as s:
        s.ehlo("client.test")
        assert s.mail("bulk@spammer.example")[0] == 550                       # the local hook
        assert s.mail("alice@example.test")[0] == 250
        assert s.rcpt("bob@remote.test")[0] == 550                            # relay_acl / the core
        assert s.rcpt("postmaster")[0] == 250
        code, text = s.data(b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1100)
        assert code == 552
        assert s.mail("alice@example.test")[0] == 250 and s.rcpt("postmaster")[0] == 250
        code, text = s.data(b"Subject: pm\r\n\r\nto the postmaster\r\n")
        assert code == 250
    queue_id = text.decode().rsplit(" ", 1)[1]
    client = f"unknown[{STRANGER}]"
    assert wait_until(lambda: any(x.startswith(f"{queue_id}: to=") for x in mail_lines(gw)))
    lines = mail_lines(gw)
    assert (f"NOQUEUE: reject: MAIL from {client}: 550 5.7.1 Sender refused by local policy; "
            "from=<bulk@spammer.example> proto=ESMTP helo=<client.test>") in lines
    assert (f"NOQUEUE: reject: RCPT from {client}: 550 5.7.1 Relaying denied; "
            "from=<alice@example.test> to=<bob@remote.test> proto=ESMTP helo=<client.test>") in lines
    too_big = [x for x in lines if " reject: END-OF-MESSAGE " in x]
    assert len(too_big) == 1 and re.fullmatch(
        rf"\w+: reject: END-OF-MESSAGE from {re.escape(client)}: 552 5\.3\.4 .*; from=<alice@example\.test> "
        r"to=<postmaster@example\.test> proto=ESMTP helo=<client\.test>", too_big[0]), too_big
    assert f"{queue_id}: client={client}" in lines
    delivered = next(x for x in lines if x.startswith(f"{queue_id}: to="))
    assert delivered.startswith(f"{queue_id}: to=<postmaster@example.test>, orig_to=<postmaster>, relay=local, ")
    assert sum(" reject: " in x for x in lines) == 3


def size_of(lines: list[str], queue_id: str) -> int:
    m = next(re.match(rf"{queue_id}: from=<[^>]*>, size=(\d+)", x) for x in lines if x.startswith(f"{queue_id}: from="))
    return int(m[1])


def test_the_same_lines_as_json(site):
    gw, peer = site("json")
    sent = send("alice@example.test", ["bob@remote.test"])
    bounced = send("alice@example.test", ["nobody@remote.test"])
    deferred = send("alice@example.test", ["later@remote.test"])

    def records() -> list[dict]:
        return [json.loads(x) for x in mail_lines(gw)]

    def find(queue_id: str, event: str, **want) -> dict | None:
        return next((r for r in records() if r["id"] == queue_id and r["event"] == event
                     and all(r.get(k) == v for k, v in want.items())), None)

    assert wait_until(lambda: find(sent, "delivery", status="sent") and find(bounced, "delivery", status="bounced")
                      and find(deferred, "delivery", status="deferred"))
    assert find(deferred, "delivery")["reply"] == "451 4.2.0 try again later"
    assert find(deferred, "delivery")["dsn"] == "4.2.0"
    assert find(bounced, "notification", action="failed")
    record = find(sent, "delivery")
    assert record["to"] == "bob@remote.test" and record["relay"] == f"{SMART_HOST}[{SMART_HOST}]:25"
    assert record["dsn"] == "2.0.0" and record["reply"].startswith("250 ")
    assert len(record["delays"]) == 4 and record["delay"] >= 0
    assert find(bounced, "delivery")["reply"] == "550 5.1.1 no such user"
    queued = find(sent, "queued")
    assert queued["from"] == "alice@example.test" and queued["nrcpt"] == 1 and queued["size"] > 0
    with smtplib.SMTP(GW_HOST, GW_PORT, timeout=10, source_address=(STRANGER, 0)) as s:
        s.ehlo("client.test")
        assert s.mail("bulk@spammer.example")[0] == 550
    assert wait_until(lambda: any(r["event"] == "reject" for r in records()))
    [refused] = [r for r in records() if r["event"] == "reject"]
    assert refused == {"time": refused["time"], "event": "reject", "id": None, "stage": "MAIL",
                       "client": f"unknown[{STRANGER}]", "reply": "550 5.7.1 Sender refused by local policy",
                       "dsn": "5.7.1", "from": "bulk@spammer.example", "proto": "ESMTP", "helo": "client.test"}


# -- the line formats, unit by unit ------------------------------------------------------------------

def test_delay_figures_follow_postfix():
    from mta.maillog.lines import delay_text
    assert [delay_text(x) for x in (0.004, 0.012, 0.099, 0.28, 1.23, 12.4, 323.2)] == \
        ["0", "0.01", "0.1", "0.28", "1.2", "12", "323"]


def test_relay_names_the_address_twice_without_a_host_name():
    from mta.maillog.lines import relay_name
    assert relay_name("[192.0.2.1]:25") == "192.0.2.1[192.0.2.1]:25"
    assert relay_name("mx.b.test[192.0.2.1]:25") == "mx.b.test[192.0.2.1]:25"
    assert relay_name("") == "none"


def test_orig_to_only_when_rewritten_and_the_null_sender_in_brackets():
    from mta.maillog import lines
    from mta.smtp.reply import Reply
    ok = Reply(250, "", "Ok")
    line = lines.delivery("Q1", "pm@example.test", "local", 1.0, (0, 0, 0, 1.0), ok, "sent", orig_to="postmaster")
    assert line.text() == ("Q1: to=<pm@example.test>, orig_to=<postmaster>, relay=local, delay=1, "
                           "delays=0/0/0/1, dsn=2.0.0, status=sent (250 Ok)")
    forwarded = lines.delivery("Q3", "x@remote.test", "local", 0, (0, 0, 0, 0), ok, "sent", orig_to="sales@example.test")
    assert "to=<x@remote.test>, orig_to=<sales@example.test>, " in forwarded.text()
    same = lines.delivery("Q1", "a@b.test", "local", 0, (0, 0, 0, 0), ok, "sent", orig_to="a@b.test")
    assert "orig_to" not in same.text()
    assert lines.queued("Q2", "", 10, 1).text() == "Q2: from=<>, size=10, nrcpt=1 (queue active)"


def test_an_alias_copy_names_the_alias_as_orig_to_and_delays_add_up():
    from mta.model.nexthop import Outcome, RecipientResult
    from mta.model.queue_entry import QueueEntry, RecipientState
    from mta.queue import mail_lines
    from mta.smtp.reply import Reply
    entry = QueueEntry("Q4", "a@example.test", [RecipientState("x@remote.test")], received_at=100.5,
                       arrived_at=100.0, extra={mail_lines.FORWARDED_FOR: "sales@example.test"})
    result = RecipientResult("x@remote.test", Reply(250, "2.0.0", "Ok"), "mx.remote.test[192.0.2.9]:25",
                             started=103.0, finished=104.5)
    line = mail_lines.outcome(entry, Outcome.DELIVERED, "x@remote.test", result.reply, result, 101.5, 105.0)
    assert line.text() == ("Q4: to=<x@remote.test>, orig_to=<sales@example.test>, relay=mx.remote.test[192.0.2.9]:25, "
                           "delay=4.5, delays=0.5/1/1.5/1.5, dsn=2.0.0, status=sent (250 2.0.0 Ok)")
    expired = mail_lines.outcome(entry, Outcome.FAILED, "x@remote.test", Reply(451, "4.4.7", "expired"), None,
                                 200.0, 200.0)
    assert "relay=none, delay=100, delays=0.5/100/0/0, dsn=4.4.7, status=expired (451 4.4.7 expired)" in expired.text()


def test_a_reply_with_braces_is_written_as_sent():
    """The line is the event's format (no field lookup): braces from a next hop's reply are kept."""
    from twisted.logger import formatEvent, globalLogPublisher
    from mta.maillog import MailLog, lines
    from mta.smtp.reply import Reply
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        MailLog().write(lines.delivery("Q5", "a@b.test", "none", 0, (0, 0, 0, 0),
                                       Reply(451, "4.3.0", "queue {full} }{"), "deferred"))
    finally:
        globalLogPublisher.removeObserver(seen.append)
    [event] = [e for e in seen if e.get("mail_event") == "delivery"]
    assert formatEvent(event).endswith("status=deferred (451 4.3.0 queue {full} }{)")
    assert event["mail_line"].record(0)["reply"] == "451 4.3.0 queue {full} }{"
