"""The ESMTP server (mta.smtp.server.session): fine-grained over an in-memory transport, then a few real sockets."""
from __future__ import annotations

import dataclasses
import smtplib
import socket
import ssl

import pytest
from hypothesis import given, settings, strategies as st
from twisted.internet import defer, reactor, threads
from twisted.trial import unittest as trial

from mta.config import TlsConfig
from mta.plugin.hookspecs import hookimpl
from mta.smtp.reply import Reply
from mta.smtp.server.session import MAX_PENDING_INPUT, SMTPServerFactory
from server_fakes import CLIENT_IP, HOSTNAME, Code, Dialog, FakeGateway, make_config

MESSAGE = b"From: a@remote.test\r\nSubject: test\r\n\r\nHello\r\n"


def status(answer) -> str:
    return answer.lines[-1].split(" ", 1)[0]


# -- greeting and EHLO ---------------------------------------------------------------------------

def test_banner_names_the_host_and_has_a_date():
    d = Dialog()
    [banner] = d.banner
    assert banner.code == Code.READY
    assert banner.text.startswith(f"{HOSTNAME} ESMTP smtpgw ready at ")
    assert banner.text.endswith("1970 00:00:00 +0000")


def test_banner_and_helo_reply_made_once_follow_the_clock_and_the_hostname():
    """The factory keeps the 220 for a second and HELO's 250 per hostname: later connections of
    the same second read the same text, the next second's show its date, a new hostname its name."""
    gateway = FakeGateway()
    factory = SMTPServerFactory(gateway, gateway.config.virtual_servers[0])
    first, second = Dialog(gateway, factory), Dialog(gateway, factory)
    assert first.banner[0].text == second.banner[0].text
    assert second.send(b"HELO client.example\r\n")[0].text == f"{HOSTNAME}"
    gateway.reactor.advance(1)
    later = Dialog(gateway, factory)
    assert later.banner[0].text.endswith("1970 00:00:01 +0000")
    gateway.config = dataclasses.replace(      # a reload's new configuration
        gateway.config, gateway=dataclasses.replace(gateway.config.gateway, hostname="renamed.example"))
    renamed = Dialog(gateway, factory)
    assert renamed.banner[0].text.startswith("renamed.example ESMTP smtpgw ready at ")
    assert renamed.send(b"HELO client.example\r\n")[0].text == "renamed.example"


def test_connect_hook_can_replace_banner_or_refuse():
    class Greeter:
        @hookimpl
        def smtpgw_connect(self, session):
            return Reply(220, "", "custom banner") if session.peer_host == CLIENT_IP else None

    gw = FakeGateway()
    gw.hooks.register(Greeter())
    d = Dialog(gw)
    assert d.banner[0].text == "custom banner" and not d.closed

    class Bouncer:
        @hookimpl
        def smtpgw_connect(self, session):
            return Reply(554, "5.7.1", "go away")

    gw = FakeGateway()
    gw.hooks.register(Bouncer())
    d = Dialog(gw)
    assert [a.code for a in d.banner] == [Code.TRANSACTION_FAILED]
    assert d.closed
    assert d.send(b"EHLO x\r\n") == []


def test_ehlo_advertises_extensions_without_enhanced_codes():
    [answer] = Dialog().ehlo()
    assert answer.code == Code.OK
    assert answer.lines[0] == f"{HOSTNAME} Hello client.test [{CLIENT_IP}]"
    assert answer.lines[1:] == ["PIPELINING", "SIZE 10485760", "8BITMIME", "ENHANCEDSTATUSCODES", "DSN",
                               "SMTPUTF8", "CHUNKING"]


def test_helo_and_missing_hostname():
    d = Dialog()
    assert d.send(b"HELO client.test\r\n")[0].text == HOSTNAME
    [answer] = d.send(b"EHLO\r\n")
    assert (answer.code, status(answer)) == (Code.ARGUMENT_ERROR, "5.5.4")


def test_helo_hook_refusal():
    class NoBadHelo:
        @hookimpl
        def smtpgw_helo(self, name):
            return Reply(550, "5.7.1", "bad HELO") if name == "bad" else None

    gw = FakeGateway()
    gw.hooks.register(NoBadHelo())
    d = Dialog(gw)
    assert d.codes(b"EHLO bad\r\nMAIL FROM:<a@remote.test>\r\nEHLO good\r\n") == [
        Code.MAILBOX_UNAVAILABLE, Code.BAD_SEQUENCE, Code.OK]


def test_simple_verbs():
    d = Dialog()
    answers = d.send(b"NOOP\r\nVRFY someone\r\nHELP\r\nRSET\r\nQUIT\r\n")
    assert [(a.code, status(a)) for a in answers] == [
        (Code.OK, "2.0.0"), (Code.CANNOT_VERIFY, "2.5.0"), (Code.HELP, "2.0.0"), (Code.OK, "2.0.0"),
        (Code.CLOSING, "2.0.0")]
    assert d.closed


# -- a whole transaction -------------------------------------------------------------------------

def test_full_transaction_queues_with_received_header():
    queued = []

    class Watcher:
        @hookimpl
        def smtpgw_queued(self, envelope):
            queued.append(envelope)

    gw = FakeGateway()
    gw.hooks.register(Watcher())
    d = Dialog(gw)
    d.start_transaction()
    [answer] = d.send(MESSAGE + b".\r\n")
    assert (answer.code, status(answer)) == (Code.OK, "2.0.0")
    [sub] = d.submitted
    assert answer.text.endswith(f"queued as Q{sub.envelope.id}")
    assert sub.envelope.sender == "sender@remote.test"
    assert sub.envelope.recipients == ["user@example.test"]
    assert sub.envelope.size == len(sub.message)
    assert queued == [sub.envelope]
    header, rest = sub.message.split(b"\r\nFrom: ", 1)
    assert header.startswith(b"Received: from client.test ([192.0.2.7])\r\n\tby mx.example.test")
    assert b" with ESMTP id " + sub.envelope.id.encode() in header
    assert b"\r\n\tfor <user@example.test>;" in header
    assert b"From: " + rest == MESSAGE


def test_received_has_no_for_clause_with_two_recipients_and_says_smtp_after_helo():
    d = Dialog()
    assert d.codes(b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n"
                   b"DATA\r\n") == [Code.OK] * 4 + [Code.START_INPUT]
    assert d.codes(MESSAGE + b".\r\n") == [Code.OK]
    message = d.submitted[0].message
    assert b" with SMTP id " in message and b"for <" not in message
    assert d.submitted[0].envelope.sender == ""


def test_empty_message_is_accepted():
    d = Dialog()
    d.start_transaction()
    assert d.codes(b".\r\n") == [Code.OK]
    assert d.submitted[0].message.startswith(b"Received: ")


def test_two_messages_in_one_session_get_separate_envelopes():
    d = Dialog()
    d.start_transaction()
    d.send(MESSAGE + b".\r\nMAIL FROM:<b@remote.test>\r\nRCPT TO:<c@example.test>\r\nDATA\r\n")
    d.send(b"second\r\n.\r\n")
    first, second = d.submitted
    assert first.envelope.id != second.envelope.id
    assert second.envelope.recipients == ["c@example.test"]
    assert second.message.endswith(b"+0000\r\nsecond\r\n")


def test_dot_unstuffing():
    d = Dialog()
    d.start_transaction()
    d.send(b"..\r\n..leading\r\nmid.dle\r\n...\r\n.")
    d.send(b"x\r\n.\r\n")
    body = d.submitted[0].message.split(b"+0000\r\n", 1)[1]
    assert body == b".\r\n.leading\r\nmid.dle\r\n..\r\nx\r\n"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=60), max_size=30))
def test_any_split_of_the_input_gives_the_same_message(cuts):
    body = b"Subject: s\r\n\r\n" + b"".join(b".line %d\r\n%s\r\n" % (i, b"x" * i) for i in range(20))
    commands = b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n"
    d = Dialog()
    replies = []
    for wire in (commands, body + b".\r\nNOOP\r\n"):     # the content only after the 354
        pos = 0
        for n in cuts + [len(wire)]:
            replies += d.send(wire[pos:pos + n])
            pos += n
    assert [a.code for a in replies] == [Code.OK, Code.OK, Code.OK, Code.START_INPUT, Code.OK, Code.OK]
    expected = body.replace(b"\r\n.", b"\r\n")
    assert d.submitted[0].message.endswith(b"+0000\r\n" + expected)


def test_rset_clears_the_transaction():
    d = Dialog()
    answers = d.send(b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<u@example.test>\r\nRSET\r\nDATA\r\n")
    answers += d.send(b"RCPT TO:<u@example.test>\r\nMAIL FROM:<b@remote.test>\r\n")
    assert [(a.code, status(a)) for a in answers[1:]] == [
        (Code.OK, "2.1.0"), (Code.OK, "2.1.5"), (Code.OK, "2.0.0"),
        (Code.BAD_SEQUENCE, "5.5.1"), (Code.BAD_SEQUENCE, "5.5.1"), (Code.OK, "2.1.0")]
    assert d.submitted == []


def test_bad_sequences():
    d = Dialog()
    assert d.codes(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n") == [
        Code.BAD_SEQUENCE] * 3
    assert d.codes(b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\nMAIL FROM:<a@remote.test>\r\n") == [
        Code.OK, Code.OK, Code.BAD_SEQUENCE]
    [answer] = d.send(b"DATA\r\n")       # no valid recipient yet
    assert (answer.code, status(answer)) == (Code.TRANSACTION_FAILED, "5.5.1")


def test_mail_and_rcpt_syntax():
    d = Dialog()
    d.ehlo()
    assert d.codes(b"MAIL FROM:a@remote.test\r\nMAIL TO:<a@remote.test>\r\n"
                   b"MAIL FROM:<a@remote.test> FOO=BAR\r\nMAIL FROM:<a@remote.test> BODY=BINARYMIME\r\n"
                   b"MAIL FROM: <a@remote.test> BODY=8BITMIME\r\nRCPT TO:<>\r\nRCPT TO:<u@example.test> XNOTIFY=NEVER\r\n"
                   b"RCPT TO: <@relay.test:u@example.test>\r\nRCPT TO:<Postmaster>\r\n") == [
        Code.ARGUMENT_ERROR, Code.ARGUMENT_ERROR, Code.PARAMS_NOT_RECOGNIZED, Code.ARGUMENT_ERROR,
        Code.OK, Code.ARGUMENT_ERROR, Code.PARAMS_NOT_RECOGNIZED, Code.OK, Code.OK]
    d.send(b"DATA\r\n")
    d.send(b".\r\n")
    assert d.submitted[0].envelope.recipients == ["u@example.test", "postmaster@example.test"]


def test_esmtp_parameters_need_ehlo():
    d = Dialog()
    assert d.codes(b"HELO c\r\nMAIL FROM:<a@remote.test> SIZE=10\r\n") == [Code.OK, Code.PARAMS_NOT_RECOGNIZED]


def test_smtputf8_addresses():
    d = Dialog()
    d.ehlo()
    assert d.codes("MAIL FROM:<jösé@remote.test>\r\n".encode()) == [Code.NAME_NOT_ALLOWED]
    assert d.codes("MAIL FROM:<jösé@remote.test> SMTPUTF8\r\nRCPT TO:<ü@example.test>\r\n".encode()) == [
        Code.OK, Code.OK]
    d.send(b"DATA\r\n")
    d.send(MESSAGE + b".\r\n")
    assert b" with UTF8SMTP id " in d.submitted[0].message


# -- policy answers ------------------------------------------------------------------------------

def test_relay_denied_for_other_domains():
    d = Dialog()
    [answer] = d.send(b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<x@elsewhere.test>\r\n")[2:]
    assert (answer.code, status(answer), answer.lines[0].split(" ", 1)[1]) == (
        Code.MAILBOX_UNAVAILABLE, "5.7.1", "Relaying denied")


def test_nobody_answering_rcpt_means_relay_denied():
    d = Dialog(FakeGateway(core=False))
    [answer] = d.send(b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<x@example.test>\r\n")[2:]
    assert (answer.code, status(answer)) == (Code.MAILBOX_UNAVAILABLE, "5.7.1")


def test_max_recipients():
    d = Dialog(FakeGateway(make_config(max_recipients=2)))
    answers = d.send(b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\n" + b"RCPT TO:<u@example.test>\r\n"
                     + b"RCPT TO:<v@example.test>\r\nRCPT TO:<w@example.test>\r\n")
    assert [(a.code, status(a)) for a in answers[2:]] == [
        (Code.OK, "2.1.5"), (Code.OK, "2.1.5"), (Code.INSUFFICIENT_STORAGE, "4.5.3")]


def test_size_parameter_over_the_limit():
    d = Dialog(FakeGateway(make_config(max_message_size=1000)))
    answers = d.send(b"EHLO c\r\nMAIL FROM:<a@remote.test> SIZE=1001\r\nMAIL FROM:<a@remote.test> SIZE=1000\r\n"
                     b"RSET\r\nMAIL FROM:<a@remote.test> SIZE=lots\r\n")
    assert [(a.code, status(a)) for a in answers[1:]] == [
        (Code.EXCEEDED_STORAGE, "5.3.4"), (Code.OK, "2.1.0"), (Code.OK, "2.0.0"), (Code.ARGUMENT_ERROR, "5.5.4")]


def test_size_limit_while_streaming_reads_to_the_end_and_queues_nothing():
    d = Dialog(FakeGateway(make_config(max_message_size=1000)))
    d.start_transaction()
    assert d.send(b"line of text\r\n" * 100) == []
    assert d.protocol._reader.chunks == []          # stopped storing
    [answer] = d.send(b"MAIL FROM:<evil@remote.test>\r\n.\r\n")
    assert (answer.code, status(answer)) == (Code.EXCEEDED_STORAGE, "5.3.4")
    assert d.submitted == []
    assert d.codes(b"NOOP\r\n") == [Code.OK]


def test_too_many_hops():
    d = Dialog(FakeGateway(make_config(max_hops=3)))
    d.start_transaction()
    [answer] = d.send(b"Received: from a\r\nReceived: from b\r\nreceived: from c\r\n\r\nloop\r\n.\r\n")
    assert (answer.code, status(answer)) == (Code.TRANSACTION_FAILED, "5.4.6")
    assert d.submitted == []
    d.start_transaction()
    assert d.codes(b"Received: from a\r\nReceived: from b\r\n\r\nok\r\n.\r\n") == [Code.OK]


def test_data_hook_can_refuse():
    class NoSpam:
        @hookimpl
        def smtpgw_data(self, message):
            return Reply(554, "5.7.1", "spam") if message.headers["Subject"] == "spam" else None

    gw = FakeGateway()
    gw.hooks.register(NoSpam())
    d = Dialog(gw)
    d.start_transaction()
    assert d.codes(b"Subject: spam\r\n\r\nbuy\r\n.\r\n") == [Code.TRANSACTION_FAILED]
    assert d.submitted == []


def test_plugin_raising_gives_451_and_the_session_goes_on():
    class Broken:
        @hookimpl
        def smtpgw_mail_from(self, sender):
            if sender == "boom@remote.test":
                raise RuntimeError("plugin bug")

    gw = FakeGateway()
    gw.hooks.register(Broken())
    d = Dialog(gw)
    answers = d.send(b"EHLO c\r\nMAIL FROM:<boom@remote.test>\r\nMAIL FROM:<fine@remote.test>\r\n")
    assert [(a.code, status(a)) for a in answers[1:]] == [(Code.LOCAL_ERROR, "4.3.0"), (Code.OK, "2.1.0")]
    assert not d.closed
    gw.config = None        # now RCPT TO:<Postmaster> breaks inside the server itself
    assert d.codes(b"RCPT TO:<Postmaster>\r\nNOOP\r\n") == [Code.LOCAL_ERROR, Code.OK]


def test_unknown_verbs_go_to_the_command_hook():
    class Etrn:
        @hookimpl
        def smtpgw_command(self, verb, argument):
            if verb == "ETRN":
                return Reply(250, "2.0.0", f"Queuing for node {argument} started")

    gw = FakeGateway()
    gw.hooks.register(Etrn())
    d = Dialog(gw)
    answers = d.send(b"etrn example.test\r\nXYZZY\r\n")
    assert [(a.code, status(a)) for a in answers] == [(Code.OK, "2.0.0"), (Code.SYNTAX_ERROR, "5.5.1")]
    assert answers[0].text.endswith("node example.test started")


# -- ordering with hooks that answer later -------------------------------------------------------

def test_pipelined_replies_wait_for_a_pending_hook():
    pending: list[defer.Deferred] = []

    class Slow:
        @hookimpl
        def smtpgw_mail_from(self, sender):
            d = defer.Deferred()
            pending.append(d)
            return d

    gw = FakeGateway()
    gw.hooks.register(Slow())
    d = Dialog(gw)
    d.ehlo()
    assert d.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<u@example.test>\r\nNOOP\r\n") == []
    assert d.paused and len(pending) == 1
    assert d.send(b"RSET\r\n") == []                 # still held back while paused
    pending[0].callback(None)
    answers = d.read()
    assert [(a.code, status(a)) for a in answers] == [
        (Code.OK, "2.1.0"), (Code.OK, "2.1.5"), (Code.OK, "2.0.0"), (Code.OK, "2.0.0")]
    assert not d.paused


def test_250_waits_for_the_queue():
    d = Dialog()
    d.gateway.queue.hold = True
    d.start_transaction()
    assert d.send(MESSAGE + b".\r\nQUIT\r\n") == []
    assert d.paused and len(d.submitted) == 1
    d.submitted[0].answer.callback("QID1")
    answers = d.read()
    assert [(a.code, a.text) for a in answers] == [(Code.OK, "2.0.0 Ok: queued as QID1"),
                                                  (Code.CLOSING, "2.0.0 Bye")]


def test_queue_failure_gives_451():
    d = Dialog()
    d.gateway.queue.hold = True
    d.start_transaction()
    d.send(MESSAGE + b".\r\n")
    d.submitted[0].answer.errback(OSError("disk full"))
    [answer] = d.read()
    assert (answer.code, status(answer)) == (Code.LOCAL_ERROR, "4.3.0")
    assert d.codes(b"NOOP\r\n") == [Code.OK]


def test_client_gone_while_a_hook_is_pending_gets_no_writes():
    d = Dialog()
    d.gateway.queue.hold = True
    d.start_transaction()
    d.send(MESSAGE + b".\r\n")
    d.protocol.connectionLost(None)
    d.submitted[0].answer.callback("QID")
    assert d.read() == []
    assert d.factory.active == 0


def test_input_flood_while_paused_drops_the_connection():
    d = Dialog()
    d.gateway.queue.hold = True
    d.start_transaction()
    d.send(MESSAGE + b".\r\n")
    d.send(b"NOOP\r\n" * (MAX_PENDING_INPUT // 6 + 1))
    assert d.transport.disconnecting


# -- hostile input -------------------------------------------------------------------------------

SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n"]
SECOND = b"MAIL FROM:<evil@remote.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nsmuggled\r\n"


@pytest.mark.parametrize("sequence", SMUGGLING, ids=repr)
@pytest.mark.parametrize("bytewise", [False, True], ids=["one write", "byte by byte"])
def test_smuggling_sequences_never_end_the_message(sequence, bytewise):
    d = Dialog()
    d.start_transaction()
    wire = MESSAGE + sequence + SECOND + b".\r\n"
    if bytewise:
        answers = []
        for i in range(len(wire)):
            answers += d.send(wire[i:i + 1])
    else:
        answers = d.send(wire)
    assert [(a.code, status(a)) for a in answers] == [(Code.MAILBOX_UNAVAILABLE, "5.5.2")]
    assert "bare CR or LF" in answers[0].text
    assert d.submitted == []
    assert d.codes(b"NOOP\r\n") == [Code.OK]


def test_nul_in_data_is_refused():
    d = Dialog()
    d.start_transaction()
    [answer] = d.send(b"Subject: x\r\n\r\nnul\x00here\r\n.\r\n")
    assert (answer.code, status(answer)) == (Code.MAILBOX_UNAVAILABLE, "5.6.0")
    assert d.submitted == []


def test_bare_newlines_in_commands_are_refused_but_do_not_merge_commands():
    d = Dialog()
    answers = d.send(b"NOOP\nNOOP\rNOOP\r\nNOOP\r\n")
    assert [(a.code, status(a)) for a in answers] == [
        (Code.SYNTAX_ERROR, "5.5.2"), (Code.SYNTAX_ERROR, "5.5.2"), (Code.OK, "2.0.0")]


def test_nul_and_bad_utf8_in_commands():
    d = Dialog()
    assert d.codes(b"NO\x00OP\r\nNOOP \xff\r\n") == [Code.SYNTAX_ERROR, Code.SYNTAX_ERROR]


def test_overlong_command_line_is_refused_and_discarded():
    d = Dialog()
    answers = d.send(b"NOOP " + b"x" * 2100 + b"\r\nNOOP\r\n")
    assert [(a.code, status(a)) for a in answers] == [(Code.SYNTAX_ERROR, "5.5.2"), (Code.OK, "2.0.0")]
    assert answers[0].text.endswith("Line too long")
    assert d.codes(b"NOOP " + b"x" * 2041 + b"\r\n") == [Code.OK]       # 2048 with CRLF: allowed


def test_overlong_command_line_is_never_buffered():
    d = Dialog()
    for _ in range(64):
        assert d.send(b"A" * 65536) == []
        assert len(d.protocol._buf) <= 65536
    assert d.codes(b"tail\r\nNOOP\r\n") == [Code.SYNTAX_ERROR, Code.OK]


def test_overlong_data_line_reads_to_the_end_without_running_the_body():
    d = Dialog()
    d.start_transaction()
    answers = d.send(b"Subject: x\r\n\r\n" + b"a" * 2000 + b"\r\nRSET\r\nQUIT\r\n")
    assert answers == [] and not d.closed
    for _ in range(10):                                  # more over-long input, in pieces
        assert d.send(b"b" * 50000) == []
        assert len(d.protocol._buf) <= 1000
    [answer] = d.send(b"\r\nMAIL FROM:<x@remote.test>\r\n.\r\n")
    assert (answer.code, status(answer)) == (Code.SYNTAX_ERROR, "5.5.2")
    assert not d.closed and d.submitted == []
    assert d.codes(b"NOOP\r\n") == [Code.OK]


def test_data_line_of_exactly_1000_octets_is_fine():
    d = Dialog()
    d.start_transaction()
    assert d.codes(b"a" * 998 + b"\r\n.\r\n") == [Code.OK]


# -- time and connections ------------------------------------------------------------------------

def test_idle_timeout():
    d = Dialog(FakeGateway(make_config(timeout=300)))
    clock = d.gateway.reactor
    clock.advance(299)
    assert d.codes(b"NOOP\r\n") == [Code.OK]            # activity restarts the clock
    clock.advance(299)
    assert d.read() == [] and not d.closed
    clock.advance(1)
    [answer] = d.read()
    assert (answer.code, answer.text) == (Code.UNAVAILABLE, f"4.4.2 {HOSTNAME} Error: timeout exceeded")
    assert d.closed


def test_no_timeout_while_we_are_the_slow_side():
    d = Dialog(FakeGateway(make_config(timeout=300)))
    d.gateway.queue.hold = True
    d.start_transaction()
    d.send(MESSAGE + b".\r\n")
    d.gateway.reactor.advance(1000)
    assert d.read() == []
    d.submitted[0].answer.callback("Q")
    assert [a.code for a in d.read()] == [Code.OK]


def test_max_connections():
    gw = FakeGateway(make_config(max_connections=1))
    first = Dialog(gw)
    second = Dialog(gw, factory=first.factory)
    assert [(a.code, a.text) for a in second.banner] == [(Code.UNAVAILABLE, "4.7.0 Too many connections")]
    assert second.closed
    first.protocol.connectionLost(None)
    third = Dialog(gw, factory=first.factory)
    assert [a.code for a in third.banner] == [Code.READY]


def test_starttls_not_offered_without_a_certificate():
    d = Dialog()
    assert "STARTTLS" not in d.ehlo()[0].lines
    assert d.codes(b"STARTTLS\r\n") == [Code.NOT_IMPLEMENTED]


def test_events_are_emitted_for_commands_and_replies():
    seen = []

    class Diag:
        @hookimpl
        def smtpgw_event(self, category, level, message, fields):
            seen.append((category, message, fields.get("line"), getattr(fields.get("reply"), "code", None)))

    gw = FakeGateway()
    gw.hooks.register(Diag())
    d = Dialog(gw)
    d.send(b"NOOP\r\n")
    assert ("smtp_protocol", "command", "NOOP", None) in seen
    assert ("smtp_protocol", "reply", None, Code.OK) in seen


# -- real sockets --------------------------------------------------------------------------------

LISTEN = "127.0.0.21"


class RealSocketTests(trial.TestCase):
    """The conversation as a real client sees it, on loopback."""

    def listen(self, tls: TlsConfig | None = None) -> int:
        self.gateway = FakeGateway(make_config(tls=tls), reactor=reactor)
        self.factory = SMTPServerFactory(self.gateway, self.gateway.config.virtual_servers[0])
        port = reactor.listenTCP(0, self.factory, interface=LISTEN)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def test_smtplib_sends_two_messages(self):
        port = self.listen()

        def client():
            with smtplib.SMTP(LISTEN, port, timeout=10) as s:
                s.ehlo("client.test")
                assert s.has_extn("pipelining") and s.has_extn("size")
                s.sendmail("a@remote.test", ["u@example.test"], MESSAGE)
                s.sendmail("b@remote.test", ["v@example.test", "w@example.test"], b"Subject: 2\r\n\r\n.dot\r\n")
                try:
                    s.sendmail("c@remote.test", ["x@elsewhere.test"], MESSAGE)
                except smtplib.SMTPRecipientsRefused as e:
                    return e.recipients
        refused = yield threads.deferToThread(client)
        self.assertEqual(refused, {"x@elsewhere.test": (550, b"5.7.1 Relaying denied")})
        first, second = self.gateway.queue.submitted
        self.assertEqual(second.envelope.recipients, ["v@example.test", "w@example.test"])
        self.assertTrue(second.message.endswith(b"\r\n\r\n.dot\r\n"))

    @defer.inlineCallbacks
    def test_starttls_discards_pipelined_plaintext(self):
        trustme = pytest.importorskip("trustme")
        ca = trustme.CA()
        cert = ca.issue_cert(HOSTNAME, LISTEN)
        tmp = self.mktemp()
        import os
        os.makedirs(tmp)
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        cert.cert_chain_pems[0].write_to_path(cert_path)
        for extra in cert.cert_chain_pems[1:]:
            extra.write_to_path(cert_path, append=True)
        cert.private_key_pem.write_to_path(key_path)
        port = self.listen(TlsConfig(certificate=cert_path, key=key_path))
        context = ssl.create_default_context()
        ca.configure_trust(context)

        def client():
            raw = socket.create_connection((LISTEN, port), timeout=10)
            f = raw.makefile("rb")
            replies = [f.readline()]
            raw.sendall(b"EHLO client.test\r\n")
            ehlo = []
            while True:
                line = f.readline()
                ehlo.append(line)
                if line[3:4] == b" ":
                    break
            raw.sendall(b"STARTTLS\r\nRSET\r\nMAIL FROM:<injected@remote.test>\r\n")
            replies.append(f.readline())
            tls = context.wrap_socket(raw, server_hostname=HOSTNAME)
            tf = tls.makefile("rb")
            tls.sendall(b"MAIL FROM:<a@remote.test>\r\nEHLO client.test\r\n")
            replies.append(tf.readline())
            after = []
            while True:
                line = tf.readline()
                after.append(line)
                if line[3:4] == b" ":
                    break
            tls.sendall(b"QUIT\r\n")
            replies.append(tf.readline())
            tls.close()
            return replies, ehlo, after, tls.version()

        replies, ehlo, after, version = yield threads.deferToThread(client)
        self.assertEqual(ehlo[-1], b"250 STARTTLS\r\n")
        self.assertEqual(replies[1], b"220 2.0.0 Ready to start TLS\r\n")
        self.assertEqual(replies[2], b"503 5.5.1 Error: send HELO/EHLO first\r\n")   # state was reset
        self.assertFalse([line for line in after if b"STARTTLS" in line])
        self.assertEqual(replies[3], b"221 2.0.0 Bye\r\n")
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))

    @defer.inlineCallbacks
    def test_smtplib_over_starttls_gets_esmtps(self):
        trustme = pytest.importorskip("trustme")
        import os
        ca = trustme.CA()
        cert = ca.issue_cert(HOSTNAME)
        tmp = self.mktemp()
        os.makedirs(tmp)
        both = os.path.join(tmp, "both.pem")
        cert.private_key_and_cert_chain_pem.write_to_path(both)
        port = self.listen(TlsConfig(certificate=both, key=both))
        context = ssl.create_default_context()
        ca.configure_trust(context)

        def client():
            with smtplib.SMTP(LISTEN, port, timeout=10) as s:
                s._host = HOSTNAME      # the name to check the certificate against
                s.starttls(context=context)
                s.sendmail("a@remote.test", ["u@example.test"], MESSAGE)
        yield threads.deferToThread(client)
        [sub] = self.gateway.queue.submitted
        self.assertIn(b" with ESMTPS id ", sub.message)
        self.assertTrue(sub.session.tls)
