"""SMTPUTF8 (RFC 6531) on the way out: the client passes the parameter on to a hop that offers it,
sends an all-ASCII message without it to a hop that does not, and refuses (550 5.6.7, no MAIL at all)
to hand a message that needs it to such a hop; the queue then bounces it without trying another hop.

The test peer (tests/peers.py) takes any MAIL parameter and UTF-8 lines as they are, so it needs no
extension here: ``extensions=`` alone decides whether it offers SMTPUTF8.

Addresses: this module's own 127.0.0.180-189 (gateway .180, peers .181-.186), port 25 / 2525.
"""
from __future__ import annotations

import email
import email.policy
import smtplib

from twisted.internet import defer

from mta.smtp.client import smtputf8
from mta.model.nexthop import Hop, RecipientResult
from mta.model.queue_entry import QueueEntry, RecipientState
from mta.smtp.reply import Reply
from smtpgw_plugins.etrn_dequeue.atrn import HOP_PREFIX, RoutingPool

from gwprocess import base_config, maildir_messages, wait_until
from clientcase import ClientCase
from peers import DEFAULT_EXTENSIONS, SMTPPeer

GW_HOST, GW_PORT = "127.0.0.180", 2525
UTF8_EXTENSIONS = DEFAULT_EXTENSIONS + ("SMTPUTF8",)

UTF8_MSG = "From: José <josé@exámple.test>\r\nSubject: Grüße\r\n\r\nHallo, schöne Grüße\r\n".encode()
UTF8_HEADER_MSG = "From: a@x.test\r\nSubject: Grüße\r\n\r\nplain body\r\n".encode()
ASCII_HEAD_8BIT_BODY = "From: a@x.test\r\nSubject: hello\r\n\r\nschöne Grüße\r\n".encode()
ASCII_MSG = b"From: a@x.test\r\nSubject: hello\r\n\r\nbody\r\n"


def mail_lines(peer: SMTPPeer) -> list[bytes]:
    return [line for line in peer.transcript if line.upper().startswith(b"MAIL ")]


# -- the decision ----------------------------------------------------------------------------------

def entry(mail_params=None) -> QueueEntry:
    extra = {"mail_params": mail_params} if mail_params is not None else {}
    return QueueEntry(id="0001", sender="a@x.test", rcpts=[RecipientState("b@y.test")], received_at=0.0,
                      extra=extra)


def test_requested_reads_the_stored_parameters():
    assert smtputf8.requested(entry({"SMTPUTF8": None, "BODY": "8BITMIME"}))
    assert not smtputf8.requested(entry({"BODY": "8BITMIME"}))
    assert not smtputf8.requested(entry({}))
    assert not smtputf8.requested(entry())


def test_headers_are_ascii_stops_at_the_blank_line():
    assert smtputf8.headers_are_ascii([ASCII_HEAD_8BIT_BODY])
    assert not smtputf8.headers_are_ascii([UTF8_HEADER_MSG])
    assert smtputf8.headers_are_ascii(["\r\nno headers, ü in the body\r\n".encode()])
    assert smtputf8.headers_are_ascii([])
    # the blank line split across chunks at every place, and a chunk boundary in a UTF-8 header
    for cut in range(1, len(ASCII_HEAD_8BIT_BODY)):
        chunks = [ASCII_HEAD_8BIT_BODY[:cut], ASCII_HEAD_8BIT_BODY[cut:]]
        assert smtputf8.headers_are_ascii(chunks), cut
    for cut in range(1, len(UTF8_HEADER_MSG)):
        assert not smtputf8.headers_are_ascii([UTF8_HEADER_MSG[:cut], UTF8_HEADER_MSG[cut:]]), cut


def test_needs():
    assert smtputf8.needs("josé@x.test", ["b@y.test"], [ASCII_MSG], asked=True)
    assert smtputf8.needs("a@x.test", ["b@ÿ.test"], [ASCII_MSG], asked=False)    # e.g. a DSN to a UTF-8 sender
    assert smtputf8.needs("a@x.test", ["b@y.test"], [UTF8_HEADER_MSG], asked=True)
    assert not smtputf8.needs("a@x.test", ["b@y.test"], [UTF8_HEADER_MSG], asked=False)
    assert not smtputf8.needs("a@x.test", ["b@y.test"], [ASCII_HEAD_8BIT_BODY], asked=True)
    assert smtputf8.not_offered("[192.0.2.1]:25") == Reply(
        550, "5.6.7", "SMTPUTF8 is required, but was not offered by host [192.0.2.1]:25")


# -- the client against test peers ---------------------------------------------------------------

class ClientTests(ClientCase):
    def setUp(self):
        super().setUp()
        self.client = self.pool(connect_timeout=5, command_timeout=10, starttls=False)

    @defer.inlineCallbacks
    def test_utf8_message_to_a_hop_offering_smtputf8(self):
        peer = self.peer("127.0.0.181", UTF8_EXTENSIONS)
        results = yield self.client.send(Hop("127.0.0.181"), "josé@exámple.test", ["zoë@remote.test"], UTF8_MSG,
                                       smtputf8=True)
        self.assertEqual([r.outcome for r in results], ["delivered"])
        self.assertEqual(mail_lines(peer), [
            f"MAIL FROM:<josé@exámple.test> SIZE={len(UTF8_MSG)} BODY=8BITMIME SMTPUTF8".encode()])
        self.assertIn("RCPT TO:<zoë@remote.test>".encode(), peer.transcript)
        self.assertEqual(peer.messages[0].data, UTF8_MSG)

    @defer.inlineCallbacks
    def test_utf8_message_to_a_hop_without_smtputf8_is_not_sent(self):
        peer = self.peer("127.0.0.182", DEFAULT_EXTENSIONS)
        hop = Hop("127.0.0.182")
        results = yield self.client.send(hop, "josé@exámple.test", ["zoë@remote.test", "bob@remote.test"],
                                       UTF8_MSG, smtputf8=True)
        expected = Reply(550, "5.6.7", f"SMTPUTF8 is required, but was not offered by host {hop}")
        self.assertEqual([(r.outcome, r.reply) for r in results], [("failed", expected)] * 2)
        self.assertEqual(mail_lines(peer), [])
        self.assertTrue(any(line.startswith(b"EHLO") for line in peer.transcript))
        # nothing was started, so the connection carries the next message as it is (no RSET)
        results = yield self.client.send(hop, "a@x.test", ["bob@remote.test"], ASCII_MSG)
        self.assertEqual([r.outcome for r in results], ["delivered"])
        self.assertEqual(peer.connections, 1)
        self.assertNotIn(b"RSET", peer.transcript)

    @defer.inlineCallbacks
    def test_utf8_header_alone_needs_smtputf8(self):
        peer = self.peer("127.0.0.183", DEFAULT_EXTENSIONS)
        results = yield self.client.send(Hop("127.0.0.183"), "a@x.test", ["b@remote.test"], UTF8_HEADER_MSG,
                                       smtputf8=True)
        self.assertEqual([(r.reply.code, r.reply.status) for r in results], [(550, "5.6.7")])
        self.assertEqual(mail_lines(peer), [])

    @defer.inlineCallbacks
    def test_ascii_message_received_with_smtputf8_goes_without_it(self):
        """Postfix's rule: asked for SMTPUTF8, but envelope and headers are ASCII -- the next hop need
        not know; the 8-bit body is 8BITMIME's business."""
        peer = self.peer("127.0.0.184", DEFAULT_EXTENSIONS)
        results = yield self.client.send(Hop("127.0.0.184"), "a@x.test", ["b@remote.test"], ASCII_HEAD_8BIT_BODY,
                                       smtputf8=True)
        self.assertEqual([r.outcome for r in results], ["delivered"])
        self.assertEqual(mail_lines(peer), [f"MAIL FROM:<a@x.test> SIZE={len(ASCII_HEAD_8BIT_BODY)} "
                                            f"BODY=8BITMIME".encode()])
        self.assertEqual(peer.messages[0].data, ASCII_HEAD_8BIT_BODY)

    @defer.inlineCallbacks
    def test_the_request_is_passed_on_to_a_hop_that_offers_it(self):
        """As Postfix does: a hop that offers SMTPUTF8 gets it whenever the sender asked, all-ASCII or
        not; mail that did not ask goes as before."""
        peer = self.peer("127.0.0.185", UTF8_EXTENSIONS)
        yield self.client.send(Hop("127.0.0.185"), "a@x.test", ["b@remote.test"], ASCII_MSG, smtputf8=True)
        yield self.client.send(Hop("127.0.0.185"), "a@x.test", ["b@remote.test"], ASCII_MSG)
        size = len(ASCII_MSG)
        self.assertEqual(mail_lines(peer), [f"MAIL FROM:<a@x.test> SIZE={size} SMTPUTF8".encode(),
                                            f"MAIL FROM:<a@x.test> SIZE={size}".encode()])
        self.assertEqual(len(peer.messages), 2)

    @defer.inlineCallbacks
    def test_non_ascii_envelope_without_the_request(self):
        """A locally made message (a DSN to a UTF-8 sender) carries no parameters: its envelope alone
        decides, so a UTF-8 address never goes out without SMTPUTF8."""
        offering = self.peer("127.0.0.185", UTF8_EXTENSIONS)
        results = yield self.client.send(Hop("127.0.0.185"), "", ["josé@remote.test"], ASCII_MSG)
        self.assertEqual([r.outcome for r in results], ["delivered"])
        self.assertEqual(mail_lines(offering), [f"MAIL FROM:<> SIZE={len(ASCII_MSG)} SMTPUTF8".encode()])
        plain = self.peer("127.0.0.186", DEFAULT_EXTENSIONS)
        results = yield self.client.send(Hop("127.0.0.186"), "", ["josé@remote.test"], ASCII_MSG)
        self.assertEqual([(r.reply.code, r.reply.status) for r in results], [(550, "5.6.7")])
        self.assertEqual(mail_lines(plain), [])

    @defer.inlineCallbacks
    def test_helo_only_hop_offers_nothing(self):
        peer = self.peer("127.0.0.186", UTF8_EXTENSIONS)
        peer.set_reply("ehlo", "502 5.5.2 EHLO not implemented")
        results = yield self.client.send(Hop("127.0.0.186"), "josé@exámple.test", ["b@remote.test"], UTF8_MSG,
                                       smtputf8=True)
        self.assertEqual([(r.reply.code, r.reply.status) for r in results], [(550, "5.6.7")])
        self.assertTrue(any(line.startswith(b"HELO") for line in peer.transcript))
        self.assertEqual(mail_lines(peer), [])


# -- the ATRN send path ----------------------------------------------------------------------------

class _Session:
    def __init__(self):
        self.calls = []

    async def send(self, sender, recipients, chunks, dsn=None, smtputf8=False):
        self.calls.append((sender, recipients, chunks, dsn, smtputf8))
        return [RecipientResult(r, Reply(250, "2.0.0", "ok")) for r in recipients]


class _Plugin:
    def __init__(self, session):
        self.atrn_sessions = {"s1": session}


def test_atrn_routing_pool_passes_the_request_on():
    session = _Session()
    pool = RoutingPool(object(), _Plugin(session))
    hop = Hop(HOP_PREFIX + "s1", 0)
    done = []
    pool.send(hop, "josé@x.test", ["b@y.test"], UTF8_MSG, smtputf8=True).addCallback(done.append)
    pool.send(hop, "a@x.test", ["b@y.test"], ASCII_MSG).addCallback(done.append)
    assert len(done) == 2
    assert [call[4] for call in session.calls] == [True, False]


# -- end to end: the real gateway ------------------------------------------------------------------

def test_gateway_bounces_utf8_mail_a_smart_host_cannot_take(gateway, peers, tmp_path):
    """SMTPUTF8 mail to a smart host without SMTPUTF8 comes back to the sender at once with 5.6.7,
    and the second smart host is not tried (the 5xx settles the recipient, as in Postfix)."""
    plain = peers("127.0.0.181")                                   # the default extensions: no SMTPUTF8
    second = peers("127.0.0.182", extensions=UTF8_EXTENSIONS)
    cfg = base_config(tmp_path, listen=f"{GW_HOST}:{GW_PORT}")
    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    cfg["connectors"][0]["smart_hosts"] = ["[127.0.0.181]", "[127.0.0.182]"]
    gateway(cfg)
    with smtplib.SMTP(GW_HOST, GW_PORT, timeout=30) as s:
        s.ehlo("client.test")
        assert s.has_extn("smtputf8")
        refused = s.sendmail("alice@example.test", ["zoë@remote.test"], UTF8_MSG,
                             mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        assert refused == {}
    assert wait_until(lambda: maildir_messages(tmp_path / "mail", "alice"), 30)
    [raw] = maildir_messages(tmp_path / "mail", "alice")
    report = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert report["Subject"] == "Undelivered Mail Returned to Sender"
    # RFC 6533: the report on UTF-8 mail is a global one, and the message comes back as it was
    assert [p.get_content_type() for p in report.get_payload()] == [
        "text/plain", "message/global-delivery-status", "message/global"]
    text = raw.decode("utf-8")                              # the Maildir file has LF line ends
    assert "Content-Type: message/global-delivery-status\nContent-Transfer-Encoding: 8bit\n" in text
    assert "Final-Recipient: utf-8; zoë@remote.test\nAction: failed\nStatus: 5.6.7\n" in text
    assert "SMTPUTF8 is required, but was not offered by host [127.0.0.181]:25" in text
    assert "Content-Type: message/global\nContent-Transfer-Encoding: 8bit\n\n".encode() in raw
    assert UTF8_MSG.replace(b"\r\n", b"\n") in raw
    assert any(line.startswith(b"EHLO") for line in plain.transcript)
    assert mail_lines(plain) == []
    assert mail_lines(second) == [] and second.connections == 0
