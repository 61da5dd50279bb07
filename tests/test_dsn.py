"""RFC 3464 delivery status notifications, checked by parsing them back with the email package."""
from __future__ import annotations

import email
import email.policy

import pytest

from mta.config import Config, GatewayConfig, QueueConfig
from mta.dsn.reports import build_dsn, remote_mta, reply_from_text, status_of, unitext_address
from mta.model.queue_entry import QueueEntry, RecipientState
from mta.smtp.reply import Reply

ORIGINAL = (b"Received: from client.test by gw.test; Sat, 1 Nov 2025 10:00:00 +0000\r\n"
            b"From: Alice <alice@client.test>\r\n"
            b"To: bob@far.test\r\n"
            b"Subject: quarterly numbers\r\n"
            b"Message-ID: <m1@client.test>\r\n"
            b"\r\n"
            b"Body that must not be returned.\r\n")


def config() -> Config:
    return Config(gateway=GatewayConfig(hostname="gw.test", spool="unused", postmaster="postmaster@gw.test",
                                        queue=QueueConfig(retry=(60, 60, 60, 300), delay_notification=3600,
                                                          expire=86400)),
                  virtual_servers=(), connectors=())


def entry(sender: str = "alice@client.test", **extra) -> QueueEntry:
    return QueueEntry(id="0001abcdef", sender=sender,
                      rcpts=[RecipientState("bob@far.test", status="failed", last_hop="mx.far.test[127.0.0.9]:25"),
                             RecipientState("carol@far.test", status="pending", attempts=3)],
                      received_at=1_700_000_000.0, size=len(ORIGINAL), extra=dict(extra))


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def report_blocks(msg):
    """(per-message fields, [per-recipient fields]) of the message/delivery-status part."""
    part = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"][0]
    blocks = part.get_payload()
    return blocks[0], blocks[1:]


def assert_wire_safe(data: bytes) -> None:
    assert all(b < 128 for b in data), "a DSN must be 7-bit"
    assert b"\n" not in data.replace(b"\r\n", b""), "bare LF"
    assert b"\r" not in data.replace(b"\r\n", b""), "bare CR"
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def test_failure_report_structure():
    e = entry(mail_params={"RET": "HDRS"})
    results = [(e.rcpts[0], Reply(550, "5.1.1", "User unknown"))]
    data = build_dsn(config(), e, results, "failed", ORIGINAL, now=1_700_000_600.0)
    assert_wire_safe(data)
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@gw.test>"
    assert msg["To"].addresses[0].addr_spec == "alice@client.test"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    types = [p.get_content_type() for p in msg.iter_parts()]
    assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    human = list(msg.iter_parts())[0].get_content()
    assert "bob@far.test" in human and "User unknown" in human

    per_message, per_rcpt = report_blocks(msg)
    assert per_message["Reporting-MTA"] == "dns; gw.test"
    assert per_message["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert len(per_rcpt) == 1
    r = per_rcpt[0]
    assert r["Final-Recipient"] == "rfc822; bob@far.test"
    assert r["Action"] == "failed"
    assert r["Status"] == "5.1.1"
    assert r["Remote-MTA"] == "dns; mx.far.test"
    assert r["Diagnostic-Code"] == "smtp; 550 5.1.1 User unknown"
    assert r["Last-Attempt-Date"] == "Tue, 14 Nov 2023 22:23:20 +0000"
    assert r["Will-Retry-Until"] is None

    headers = list(msg.iter_parts())[2]
    raw = headers.get_payload(decode=True)
    assert b"Subject: quarterly numbers" in raw
    assert b"Body that must not be returned" not in data


def test_delay_report_has_retry_until_and_transient_status():
    e = entry()
    results = [(e.rcpts[1], Reply(451, "", "Greylisted"))]
    msg = parse(build_dsn(config(), e, results, "delayed", ORIGINAL, now=1_700_003_600.0))
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    _, per_rcpt = report_blocks(msg)
    r = per_rcpt[0]
    assert r["Action"] == "delayed"
    assert r["Status"] == "4.0.0"
    assert r["Will-Retry-Until"] == "Wed, 15 Nov 2023 22:13:20 +0000"   # received + expire (1 day)
    assert r["Remote-MTA"] is None


def test_null_sender_report_goes_to_postmaster():
    e = entry(sender="")
    msg = parse(build_dsn(config(), e, [(e.rcpts[0], Reply(550, "5.7.1", "No"))], "failed", ORIGINAL))
    assert msg["To"].addresses[0].addr_spec == "postmaster@gw.test"
    assert msg["Subject"].startswith("Postmaster Copy")


def test_expired_recipient_keeps_4_4_7_with_failed_action():
    e = entry()
    msg = parse(build_dsn(config(), e, [(e.rcpts[1], Reply(451, "4.4.7", "delivery time expired"))],
                          "failed", ORIGINAL))
    _, per_rcpt = report_blocks(msg)
    assert (per_rcpt[0]["Action"], per_rcpt[0]["Status"]) == ("failed", "4.4.7")


def test_envid_and_orcpt_are_echoed():
    e = entry(mail_params={"ENVID": "QQ+2B1"}, rcpt_params={"bob@far.test": {"ORCPT": "rfc822;Bob+40far.test"}})
    msg = parse(build_dsn(config(), e, [(e.rcpts[0], Reply(550, "5.1.1", "x"))], "failed", ORIGINAL))
    per_message, per_rcpt = report_blocks(msg)
    assert per_message["Original-Envelope-Id"] == "QQ+1"
    assert per_rcpt[0]["Original-Recipient"] == "rfc822; Bob@far.test"


def test_eight_bit_headers_with_an_ascii_envelope_stay_seven_bit():
    original = "Subject: Grüße\r\nFrom: jörg@client.test\r\n\r\nbody\r\n".encode()
    e = QueueEntry(id="0002", sender="joerg@client.test", rcpts=[RecipientState("moller@far.test")],
                   received_at=0.0, extra={"mail_params": {"RET": "HDRS"}})
    data = build_dsn(config(), e, [(e.rcpts[0], Reply(550, "5.1.1", "ukendt modtager æ"))], "failed", original)
    assert_wire_safe(data)
    msg = parse(data)
    headers = list(msg.iter_parts())[2]
    assert headers.get_content_type() == "text/rfc822-headers"
    assert headers["Content-Transfer-Encoding"] == "quoted-printable"
    assert headers.get_payload(decode=True) == "Subject: Grüße\r\nFrom: jörg@client.test\r\n".encode()


UTF8_ORIGINAL = "Subject: Grüße\r\nFrom: jörg@client.test\r\n\r\nschöne Grüße\r\n".encode()


def utf8_entry(**mail_params) -> QueueEntry:
    return QueueEntry(id="0002", sender="jörg@client.test",
                      rcpts=[RecipientState("møller@far.test", last_hop="mx.far.test[127.0.0.9]:25")],
                      received_at=0.0, extra={"mail_params": {"SMTPUTF8": None, **mail_params},
                                              "rcpt_params": {"møller@far.test": {"ORCPT": "utf-8;m\\x{F8}ller@far.test"}}})


def assert_eight_bit_clean(data: bytes) -> None:
    data.decode("utf-8")
    assert b"\n" not in data.replace(b"\r\n", b"") and b"\r" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def test_utf8_mail_gets_an_rfc_6533_report():
    e = utf8_entry()
    data = build_dsn(config(), e, [(e.rcpts[0], Reply(550, "5.1.1", "ukendt modtager"))], "failed", UTF8_ORIGINAL)
    assert_eight_bit_clean(data)
    msg = email.message_from_bytes(data, policy=email.policy.SMTPUTF8)
    assert "\r\nTo: <jörg@client.test>\r\n".encode() in data
    note, status, returned = msg.iter_parts()
    assert note.get_content_charset() == "utf-8" and "<møller@far.test>: 550 5.1.1" in note.get_content()
    assert status.get_content_type() == "message/global-delivery-status"
    assert status["Content-Transfer-Encoding"] == "8bit"
    text = data.decode("utf-8")         # the email package reads message/* parts as messages
    assert "X-Original-Sender: utf-8; jörg@client.test\r\n" in text
    assert "Final-Recipient: utf-8; møller@far.test\r\n" in text
    assert "Original-Recipient: utf-8; møller@far.test\r\n" in text
    assert "Action: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; mx.far.test\r\n" in text
    assert returned.get_content_type() == "message/global"
    assert b"Content-Type: message/global\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + UTF8_ORIGINAL in data


def test_utf8_mail_returns_its_headers_as_message_global_headers():
    e = utf8_entry(RET="HDRS")
    data = build_dsn(config(), e, [(e.rcpts[0], Reply(550, "5.1.1", "x"))], "failed", UTF8_ORIGINAL)
    assert_eight_bit_clean(data)
    returned = list(email.message_from_bytes(data, policy=email.policy.SMTPUTF8).iter_parts())[2]
    assert returned.get_content_type() == "message/global-headers"
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert ("Content-Transfer-Encoding: 8bit\r\n\r\nSubject: Grüße\r\nFrom: jörg@client.test\r\n\r\n--"
            .encode()) in data


def test_unitext_escapes_only_what_it_must():
    assert unitext_address("jörg+x=y@ex\\ample.test") == "jörg\\x{2B}x\\x{3D}y@ex\\x{5C}ample.test"


def test_no_original_means_no_headers_part():
    e = entry()
    msg = parse(build_dsn(config(), e, [(e.rcpts[0], Reply(550, "5.1.1", "x"))], "failed", None))
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "message/delivery-status"]


def test_several_recipients_in_one_report():
    e = entry()
    results = [(e.rcpts[0], Reply(550, "5.1.1", "unknown")), (e.rcpts[1], Reply(554, "5.7.1", "refused"))]
    _, per_rcpt = report_blocks(parse(build_dsn(config(), e, results, "failed", ORIGINAL)))
    assert [r["Final-Recipient"] for r in per_rcpt] == ["rfc822; bob@far.test", "rfc822; carol@far.test"]
    assert [r["Status"] for r in per_rcpt] == ["5.1.1", "5.7.1"]


@pytest.mark.parametrize("reply,action,status", [
    (Reply(550, "", "x"), "failed", "5.0.0"),
    (Reply(550, "5.2.2", "x"), "failed", "5.2.2"),
    (Reply(451, "4.2.0", "x"), "delayed", "4.2.0"),
    (Reply(550, "5.2.2", "x"), "delayed", "4.0.0"),
])
def test_status_of(reply, action, status):
    assert status_of(reply, action) == status


def test_helpers():
    assert remote_mta("[192.0.2.1]:25") == "[192.0.2.1]"
    assert remote_mta("mx.a.test[192.0.2.1]:2525") == "mx.a.test"
    assert remote_mta("") is None
    assert reply_from_text("451 4.3.0 try later", Reply(0)) == Reply(451, "4.3.0", "try later")
    assert reply_from_text("550 no status", Reply(0)) == Reply(550, "", "no status")
    assert reply_from_text(None, Reply(1)) == Reply(1)


def test_unknown_action_rejected():
    with pytest.raises(ValueError):
        build_dsn(config(), entry(), [], "relayed", None)
