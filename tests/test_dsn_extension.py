"""The DSN extension (RFC 3461) on both sides of the gateway: the server's parameter syntax, the
parameters in the spool, the client passing them on to a next hop that offers DSN (and not to one that
does not), and the success reports we owe ("relayed", "delivered").

Addresses: this module's own 127.0.0.140-149 (gateway .140, peers .141-.145), port 25 / 2525.
"""
from __future__ import annotations

import email
import smtplib
from email.message import Message

import pytest
from twisted.internet import defer

from mta.dsn.params import (ENVID_TOO_LONG, ORCPT_TOO_LONG, OutboundDSN, RelayedResult, check_mail, check_rcpt,
                             parse_notify, xtext_decode, xtext_encode)
from mta.model.nexthop import Hop
from mta.model.queue_entry import QueueEntry, RecipientState
from mta.spool.store import Spool

from gwprocess import base_config, maildir_messages, wait_until
from clientcase import ClientCase
from peers import DEFAULT_EXTENSIONS
from server_fakes import Code, Dialog

GW_HOST, GW_PORT = "127.0.0.140", 2525
DSN_EXTENSIONS = DEFAULT_EXTENSIONS + ("DSN",)
MSG = b"From: a@x.test\r\nSubject: dsn\r\n\r\nbody\r\n"


def answer(dialog: Dialog, line: str) -> tuple[int, str]:
    """(code, enhanced status) of the one reply to ``line``."""
    [reply] = dialog.send(line.encode() + b"\r\n")
    return reply.code, reply.lines[-1].split(" ", 1)[0]


def in_transaction() -> Dialog:
    d = Dialog()
    assert d.codes(b"EHLO client.test\r\nMAIL FROM:<a@remote.test>\r\n") == [Code.OK, Code.OK]
    return d


# -- xtext and NOTIFY helpers ----------------------------------------------------------------------

def test_xtext_round_trip():
    assert xtext_decode("QQ+2B1+3D") == "QQ+1="
    assert xtext_decode("a+2bb") == "a+b"            # lower-case hex taken on input
    assert xtext_encode("QQ+1= x\u00e9") == "QQ+2B1+3D+20x+C3+A9"
    for bad in ("a+", "a+2", "a+ZZ", "a=b", "a b", "\u00e9"):
        with pytest.raises(ValueError):
            xtext_decode(bad)


def test_parse_notify():
    assert parse_notify("success,Delay") == {"SUCCESS", "DELAY"}
    assert parse_notify("NEVER") == {"NEVER"}
    for bad in ("", None, "NEVER,SUCCESS", "SUCCESS,SUCCESS", "SUCCESS,", "SOMETIMES"):
        assert parse_notify(bad) is None


# -- the server's wire syntax ----------------------------------------------------------------------

def test_ehlo_advertises_dsn():
    [reply] = Dialog().ehlo()
    assert "DSN" in reply.lines[1:]


def test_parameters_are_kept_with_the_envelope():
    d = Dialog()
    d.ehlo()
    assert answer(d, "MAIL FROM:<a@remote.test> RET=hdrs ENVID=QQ+2B1") == (Code.OK, "2.1.0")
    assert answer(d, "RCPT TO:<u@example.test> NOTIFY=success,Failure ORCPT=rfc822;U+40example.test") == (
        Code.OK, "2.1.5")
    assert answer(d, "RCPT TO:<v@example.test> NOTIFY=NEVER") == (Code.OK, "2.1.5")
    assert answer(d, "RCPT TO:<w@example.test>") == (Code.OK, "2.1.5")
    d.send(b"DATA\r\n")
    d.send(MSG + b".\r\n")
    envelope = d.submitted[0].envelope
    assert envelope.mail_params == {"RET": "HDRS", "ENVID": "QQ+2B1"}
    assert envelope.rcpt_params == {
        "u@example.test": {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;U+40example.test"},
        "v@example.test": {"NOTIFY": "NEVER"},
        "w@example.test": {}}


@pytest.mark.parametrize("params,expected", [
    ("RET=FULL", (Code.OK, "2.1.0")),
    ("RET=HDRS ENVID=" + "x" * 100, (Code.OK, "2.1.0")),
    ("ENVID=a+20b", (Code.OK, "2.1.0")),                           # a space, encoded, is printable
    ("RET=ALL", (Code.ARGUMENT_ERROR, "5.5.4")),
    ("RET", (Code.ARGUMENT_ERROR, "5.5.4")),
    ("ENVID", (Code.ARGUMENT_ERROR, "5.5.4")),
    ("ENVID=" + "x" * 101, (Code.ARGUMENT_ERROR, "5.5.4")),
    ("ENVID=a+2", (Code.ARGUMENT_ERROR, "5.5.4")),                 # a broken +XX escape
    ("ENVID=a+0D+0A", (Code.ARGUMENT_ERROR, "5.5.4")),             # decodes to CR LF
    ("RET=FULL RET=HDRS", (Code.ARGUMENT_ERROR, "5.5.4")),         # duplicates of DSN keywords: 501
    ("ENVID=a envid=b", (Code.ARGUMENT_ERROR, "5.5.4")),
    ("SIZE=1 SIZE=2", (Code.PARAMS_NOT_RECOGNIZED, "5.5.4")),      # other duplicates keep their 555
    ("FOO=BAR", (Code.PARAMS_NOT_RECOGNIZED, "5.5.4")),            # unknown: still 555
    ("NOTIFY=NEVER", (Code.PARAMS_NOT_RECOGNIZED, "5.5.4")),       # an RCPT parameter on MAIL
    ("SMTPUTF8 ENVID=\u00e9", (Code.ARGUMENT_ERROR, "5.5.4")),     # xtext is ASCII, even with SMTPUTF8
])
def test_mail_parameters(params, expected):
    d = Dialog()
    d.ehlo()
    assert answer(d, f"MAIL FROM:<a@remote.test> {params}") == expected


@pytest.mark.parametrize("params,expected", [
    ("NOTIFY=NEVER", (Code.OK, "2.1.5")),
    ("NOTIFY=delay,SUCCESS,failure", (Code.OK, "2.1.5")),
    ("ORCPT=rfc822;u+40example.test", (Code.OK, "2.1.5")),
    ("ORCPT=utf-8;u\\x{E9}+40example.test", (Code.OK, "2.1.5")),   # RFC 6533 addr-type
    ("ORCPT=rfc822;" + "x" * 493, (Code.OK, "2.1.5")),            # 500 octets: RFC 3461's limit
    ("ORCPT=rfc822;" + "x" * 494, (Code.ARGUMENT_ERROR, "5.5.4")),
    ("NOTIFY=NEVER,SUCCESS", (Code.ARGUMENT_ERROR, "5.5.4")),
    ("NOTIFY=SUCCESS,SUCCESS", (Code.ARGUMENT_ERROR, "5.5.4")),
    ("NOTIFY=SOMETIMES", (Code.ARGUMENT_ERROR, "5.5.4")),
    ("NOTIFY", (Code.ARGUMENT_ERROR, "5.5.4")),
    ("NOTIFY=SUCCESS NOTIFY=FAILURE", (Code.ARGUMENT_ERROR, "5.5.4")),
    ("ORCPT=rfc822;a@b.test ORCPT=rfc822;c@d.test", (Code.ARGUMENT_ERROR, "5.5.4")),
    ("ORCPT=rfc822", (Code.ARGUMENT_ERROR, "5.5.4")),               # no ";"
    ("ORCPT=;u@example.test", (Code.ARGUMENT_ERROR, "5.5.4")),      # no addr-type
    ("ORCPT=rfc822;", (Code.ARGUMENT_ERROR, "5.5.4")),              # no address
    ("ORCPT=rfc822;u+4", (Code.ARGUMENT_ERROR, "5.5.4")),
    ("ORCPT=rfc822;u+00", (Code.ARGUMENT_ERROR, "5.5.4")),          # decodes to NUL
    ("RET=FULL", (Code.PARAMS_NOT_RECOGNIZED, "5.5.4")),            # a MAIL parameter on RCPT
    ("XFOO=1", (Code.PARAMS_NOT_RECOGNIZED, "5.5.4")),
])
def test_rcpt_parameters(params, expected):
    d = in_transaction()
    assert answer(d, f"RCPT TO:<u@example.test> {params}") == expected


def test_length_limits():
    """ENVID at most 100 characters, ORCPT 500 (RFC 3461 4.4, 4.2), counted as sent (xtext)."""
    assert check_mail({"ENVID": "x" * 100}) is None
    assert check_mail({"ENVID": "x" * 101}) == ENVID_TOO_LONG
    assert check_rcpt({"ORCPT": "rfc822;" + "x" * 493}) is None
    assert check_rcpt({"ORCPT": "rfc822;" + "x" * 494}) == ORCPT_TOO_LONG
    assert ENVID_TOO_LONG.code == ORCPT_TOO_LONG.code == 501


def test_dsn_parameters_need_ehlo():
    d = Dialog()
    assert d.codes(b"HELO c\r\nMAIL FROM:<a@remote.test> RET=FULL\r\nMAIL FROM:<a@remote.test>\r\n"
                   b"RCPT TO:<u@example.test> NOTIFY=NEVER\r\n") == [
        Code.OK, Code.PARAMS_NOT_RECOGNIZED, Code.OK, Code.PARAMS_NOT_RECOGNIZED]


def test_refused_recipient_leaves_the_transaction_usable():
    d = in_transaction()
    assert d.codes(b"RCPT TO:<u@example.test> NOTIFY=NEVER,DELAY\r\n"
                   b"RCPT TO:<u@example.test> NOTIFY=DELAY\r\nDATA\r\n") == [
        Code.ARGUMENT_ERROR, Code.OK, Code.START_INPUT]
    assert d.codes(MSG + b".\r\n") == [Code.OK]
    assert d.submitted[0].envelope.rcpt_params == {"u@example.test": {"NOTIFY": "DELAY"}}


# -- the outbound client -------------------------------------------------------------------------

def entry(mail_params=None, rcpt_params=None) -> QueueEntry:
    extra = {}
    if mail_params:
        extra["mail_params"] = mail_params
    if rcpt_params:
        extra["rcpt_params"] = rcpt_params
    return QueueEntry(id="0001", sender="a@x.test", rcpts=[RecipientState("b@y.test"), RecipientState("c@y.test")],
                      received_at=0.0, extra=extra)


def test_outbound_parameters_are_re_encoded_and_garbage_dropped():
    dsn = OutboundDSN.from_entry(entry({"RET": "hdrs", "ENVID": "a+2bb", "SIZE": "10"},
                                       {"B@y.test": {"NOTIFY": "delay,success", "ORCPT": "rfc822;b+40y.test"},
                                        "c@y.test": {"NOTIFY": "SOMETIMES", "ORCPT": "rfc822;c d"}}))
    assert dsn.mail == " RET=HDRS ENVID=a+2Bb"
    assert dsn.rcpt("b@y.test") == " NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b@y.test"
    assert dsn.rcpt("c@y.test") == ""               # nothing that could break our command line
    assert dsn.wants_success("b@Y.test") and not dsn.wants_success("c@y.test")
    assert OutboundDSN.from_entry(entry({"SIZE": "10"}, {})) is None


class ClientTests(ClientCase):
    def setUp(self):
        super().setUp()
        self.client = self.pool(connect_timeout=5, command_timeout=5)

    DSN = OutboundDSN.from_entry(entry({"RET": "HDRS", "ENVID": "QQ+2B1"},
                                       {"b@y.test": {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;B+40y.test"},
                                        "c@y.test": {"NOTIFY": "NEVER"}}))

    @defer.inlineCallbacks
    def test_dsn_hop_gets_the_parameters(self):
        peer = self.peer("127.0.0.144", DSN_EXTENSIONS)
        results = yield self.client.send(Hop("127.0.0.144"), "a@x.test", ["b@y.test", "c@y.test"], MSG, dsn=self.DSN)
        self.assertEqual([r.outcome for r in results], ["delivered", "delivered"])
        self.assertFalse(any(isinstance(r, RelayedResult) for r in results))     # the hop reports itself
        self.assertEqual(peer.messages[0].mail_params, f"SIZE={len(MSG)} RET=HDRS ENVID=QQ+2B1")
        rcpts = [line for line in peer.transcript if line.startswith(b"RCPT")]
        self.assertEqual(rcpts, [b"RCPT TO:<b@y.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;B@y.test",
                                 b"RCPT TO:<c@y.test> NOTIFY=NEVER"])

    @defer.inlineCallbacks
    def test_hop_without_dsn_gets_none_and_success_becomes_relayed(self):
        peer = self.peer("127.0.0.145", DEFAULT_EXTENSIONS)
        results = yield self.client.send(Hop("127.0.0.145"), "a@x.test", ["b@y.test", "c@y.test"], MSG, dsn=self.DSN)
        self.assertEqual([r.outcome for r in results], ["delivered", "delivered"])
        self.assertEqual([isinstance(r, RelayedResult) for r in results], [True, False])
        self.assertEqual(peer.messages[0].mail_params, f"SIZE={len(MSG)}")
        rcpts = [line for line in peer.transcript if line.startswith(b"RCPT")]
        self.assertEqual(rcpts, [b"RCPT TO:<b@y.test>", b"RCPT TO:<c@y.test>"])

    @defer.inlineCallbacks
    def test_refused_message_is_not_relayed(self):
        peer = self.peer("127.0.0.145", DEFAULT_EXTENSIONS)
        peer.set_reply("dot", "554 5.7.1 no thanks")
        results = yield self.client.send(Hop("127.0.0.145"), "a@x.test", ["b@y.test"], MSG, dsn=self.DSN)
        self.assertEqual([(r.outcome, isinstance(r, RelayedResult)) for r in results], [("failed", False)])


# -- end to end: the real gateway -------------------------------------------------------------------

def relay_config(tmp_path, smart_host: str) -> dict:
    cfg = base_config(tmp_path, listen=f"{GW_HOST}:{GW_PORT}")
    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    cfg["connectors"][0]["smart_hosts"] = [f"[{smart_host}]"]
    return cfg


def send(sender: str, rcpts: dict[str, list[str]], mail_options: list[str]) -> None:
    """One transaction; ``rcpts`` maps each recipient to its RCPT parameters."""
    with smtplib.SMTP(GW_HOST, GW_PORT, timeout=30) as s:
        s.ehlo("client.test")
        assert "dsn" in s.esmtp_features
        assert s.mail(sender, mail_options)[0] == 250
        for rcpt, options in rcpts.items():
            assert s.rcpt(rcpt, options)[0] == 250
        assert s.data(MSG)[0] == 250


def spool_empty(tmp_path) -> bool:
    return not Spool(str(tmp_path / "spool")).scan_sync()


def reports(tmp_path, mailbox: str) -> list[Message]:
    return [email.message_from_bytes(m) for m in maildir_messages(tmp_path / "mail", mailbox)]


def status_blocks(report: Message) -> list[Message]:
    """The message/delivery-status blocks: per-message first, then one per recipient."""
    [part] = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"]
    return part.get_payload()


def test_parameters_survive_into_the_spool(gateway, peers, tmp_path):
    peer = peers("127.0.0.143")
    peer.set_reply("rcpt", "451 4.3.0 not now")            # the message stays queued
    gateway(relay_config(tmp_path, "127.0.0.143"))
    send("alice@example.test", {"bob@remote.test": ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;bob+40remote.test"],
                                "carol@remote.test": []}, ["RET=HDRS", "ENVID=QQ+2B1"])
    assert wait_until(lambda: Spool(str(tmp_path / "spool")).scan_sync(), 15)
    [queued] = Spool(str(tmp_path / "spool")).scan_sync()
    assert queued.extra["mail_params"] == {"RET": "HDRS", "ENVID": "QQ+2B1"}
    assert queued.extra["rcpt_params"] == {"bob@remote.test": {"NOTIFY": "SUCCESS,DELAY",
                                                               "ORCPT": "rfc822;bob+40remote.test"}}


def test_dsn_hop_takes_over_and_we_send_no_report(gateway, peers, tmp_path):
    peer = peers("127.0.0.141", extensions=DSN_EXTENSIONS)
    gateway(relay_config(tmp_path, "127.0.0.141"))
    send("alice@example.test", {"bob@remote.test": ["NOTIFY=SUCCESS", "ORCPT=rfc822;bob+40remote.test"]},
         ["RET=HDRS", "ENVID=QQ+2B1"])
    assert peer.wait_for(1, 30)
    assert peer.messages[0].mail_params.endswith(" RET=HDRS ENVID=QQ+2B1")
    assert b"RCPT TO:<bob@remote.test> NOTIFY=SUCCESS ORCPT=rfc822;bob@remote.test" in peer.transcript
    assert wait_until(lambda: spool_empty(tmp_path), 15)     # a report would be queued before this
    assert reports(tmp_path, "alice") == []


def test_hop_without_dsn_means_a_relayed_report(gateway, peers, tmp_path):
    peer = peers("127.0.0.142")                             # the default extensions: no DSN
    gateway(relay_config(tmp_path, "127.0.0.142"))
    send("alice@example.test", {"bob@remote.test": ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Bob+40remote.test"],
                                "carol@remote.test": ["NOTIFY=FAILURE"]}, ["ENVID=QQ+2B1"])
    assert peer.wait_for(1, 30)
    assert [line for line in peer.transcript if line.startswith(b"RCPT")] == [
        b"RCPT TO:<bob@remote.test>", b"RCPT TO:<carol@remote.test>"]
    assert " ENVID" not in peer.messages[0].mail_params
    assert wait_until(lambda: reports(tmp_path, "alice"), 30)
    [report] = reports(tmp_path, "alice")
    assert report["Subject"] == "Successful Mail Delivery Report"
    per_message, *per_rcpt = status_blocks(report)
    assert per_message["Original-Envelope-Id"] == "QQ+1"
    assert [(r["Final-Recipient"], r["Original-Recipient"], r["Action"], r["Status"]) for r in per_rcpt] == [
        ("rfc822; bob@remote.test", "rfc822; Bob@remote.test", "relayed", "2.0.0")]
    assert per_rcpt[0]["Remote-MTA"] == "dns; [127.0.0.142]"


def test_local_delivery_means_a_delivered_report(gateway, tmp_path):
    gateway(base_config(tmp_path, listen=f"{GW_HOST}:{GW_PORT}"))
    send("alice@example.test", {"carol@example.test": ["NOTIFY=SUCCESS"], "dave@example.test": []}, [])
    assert wait_until(lambda: reports(tmp_path, "alice"), 30)
    assert len(maildir_messages(tmp_path / "mail", "carol")) == 1
    assert len(maildir_messages(tmp_path / "mail", "dave")) == 1
    [report] = reports(tmp_path, "alice")
    _, *per_rcpt = status_blocks(report)
    assert [(r["Final-Recipient"], r["Action"], r["Status"], r["Remote-MTA"]) for r in per_rcpt] == [
        ("rfc822; carol@example.test", "delivered", "2.0.0", None)]
    returned = [p.get_content_type() for p in report.walk()]
    assert "text/rfc822-headers" in returned and "message/rfc822" not in returned    # headers only, no RET
