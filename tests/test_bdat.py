"""CHUNKING / BDAT (RFC 3030) in the ESMTP server: real sockets to the real server, the exact-read
cases over an in-memory transport, and one message through the twistd gateway into a Maildir."""
from __future__ import annotations

import email
import shutil
import smtplib
import socket
import tempfile
from dataclasses import replace
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest as trial

from gwprocess import base_config, maildir_messages, wait_until
from mta.config import ProtocolLogConfig
from mta.plugin.hookspecs import hookimpl
from mta.smtp.lines import ChunkedMessage, Problem
from mta.smtp.reply import Reply
from mta.smtp.server.session import SMTPServerFactory
from server_fakes import Code, Dialog, FakeGateway, make_config

SERVER = "127.0.0.133"
SECOND_SERVER = "127.0.0.134"
E2E = "127.0.0.135"

ENVELOPE = b"EHLO client.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<u@example.test>\r\n"
MESSAGE = (b"From: a@remote.test\r\nSubject: chunks\r\n\r\n.leading dot\r\n\r\n.\r\n"
           b"BDAT 5 LAST\r\nbody \xc3\xa9 8-bit\r\n")


def bdat(payload: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(payload), b" LAST" if last else b"") + payload


def after_received(message: bytes) -> bytes:
    """The message as the client sent it: what follows our Received header (its id and date differ)."""
    assert message.startswith(b"Received: ")
    pos = message.index(b"\r\n") + 2
    while message.startswith(b"\t", pos):
        pos = message.index(b"\r\n", pos) + 2
    return message[pos:]


class Client:
    """A blocking SMTP client on a socket, for the thread side of a trial test: bytes out, replies in."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")
        self.banner = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        """``(code, last line's text)`` of one (possibly multi-line) reply."""
        lines = []
        while True:
            line = self.file.readline()
            assert line, "connection closed"
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), line[4:].rstrip(b"\r\n").decode()

    def replies(self, n: int) -> list[tuple[int, str]]:
        return [self.reply() for _ in range(n)]

    def codes(self, n: int) -> list[int]:
        return [code for code, _ in self.replies(n)]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def status(text: str) -> str:
    return text.split(" ", 1)[0]


class RealSocketTests(trial.TestCase):
    """The conversation as a pipelining CHUNKING client sees it, on loopback."""

    timeout = 60

    def listen(self, host: str = SERVER, **limits) -> int:
        self.gateway = FakeGateway(make_config(**limits), reactor=reactor)
        self.factory = SMTPServerFactory(self.gateway, self.gateway.config.virtual_servers[0])
        self.protocols = []
        build = self.factory.buildProtocol

        def remember(addr):
            protocol = build(addr)
            self.protocols.append(protocol)
            return protocol

        self.factory.buildProtocol = remember
        port = reactor.listenTCP(0, self.factory, interface=host)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def client(self, port: int, host: str = SERVER) -> Client:
        c = Client(host, port)
        self.addCleanup(c.close)
        return c

    def in_thread(self, f, *args):
        return threads.deferToThread(f, *args)

    @property
    def submitted(self):
        return self.gateway.queue.submitted

    # -- EHLO -------------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_every_virtual_server_lists_chunking_and_not_binarymime(self):
        config = make_config()
        second = replace(config.virtual_servers[0], name="Second Virtual Server")
        config = replace(config, virtual_servers=(config.virtual_servers[0], second))
        gateway = FakeGateway(config, reactor=reactor)
        ports = []
        for vs, host in zip(config.virtual_servers, (SERVER, SECOND_SERVER)):
            port = reactor.listenTCP(0, SMTPServerFactory(gateway, vs), interface=host)
            self.addCleanup(port.stopListening)
            ports.append((host, port.getHost().port))

        def ehlo(host, port):
            with smtplib.SMTP(host, port, timeout=10) as s:
                s.ehlo("client.test")
                code, text = s.mail("a@remote.test", ["BODY=BINARYMIME"])
                return s.has_extn("chunking"), s.has_extn("binarymime"), code, text
        for host, port in ports:
            chunking, binarymime, code, text = yield self.in_thread(ehlo, host, port)
            self.assertEqual((chunking, binarymime), (True, False))
            self.assertEqual((code, text[:5]), (Code.ARGUMENT_ERROR, b"5.5.4"))

    # -- pipelining -------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_chunks_and_the_next_commands_in_one_write(self):
        port = self.listen()

        def talk():
            c = self.client(port)
            c.send(ENVELOPE + bdat(MESSAGE[:40]) + bdat(MESSAGE[40:], last=True) + b"NOOP\r\nQUIT\r\n")
            return c.replies(7)
        replies = yield self.in_thread(talk)
        self.assertEqual([code for code, _ in replies], [250] * 6 + [Code.CLOSING])
        self.assertEqual(replies[3][1], "2.0.0 40 octets received")
        [sub] = self.submitted
        self.assertEqual(replies[4][1], f"2.0.0 Ok: queued as Q{sub.envelope.id}")
        self.assertEqual(after_received(sub.message), MESSAGE)
        self.assertEqual(sub.envelope.size, len(sub.message))

    @defer.inlineCallbacks
    def test_any_split_of_the_stream_over_tcp_gives_the_same_message(self):
        port = self.listen()
        payload = MESSAGE.replace(b"\r\n", b"\n")      # bare LFs too, so CR/LF pairs get cut
        wire = (ENVELOPE + bdat(payload[:7]) + bdat(payload[7:50]) + bdat(b"") + bdat(payload[50:], last=True)
                + b"NOOP\r\n")
        seen = []

        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(st.lists(st.integers(min_value=1, max_value=40), max_size=20))
        def example(cuts):
            c = Client(SERVER, port)
            try:
                pos = 0
                for n in cuts + [len(wire)]:
                    if pos < len(wire):
                        c.send(wire[pos:pos + n])
                    pos += n
                codes = c.codes(8)
            finally:
                c.close()
            assert codes == [250] * 8, codes
            seen.append(self.submitted[-1].message)
        yield self.in_thread(example)
        self.assertTrue(seen)
        for message in seen:
            self.assertEqual(after_received(message), MESSAGE)

    # -- sizes ------------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_bdat_0_last_ends_the_message(self):
        port = self.listen()

        def talk():
            c = self.client(port)
            c.send(ENVELOPE + bdat(MESSAGE) + b"BDAT 0 LAST\r\n")
            first = c.codes(5)
            c.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<u@example.test>\r\nBDAT 0 LAST\r\n")
            return first + c.codes(3)
        codes = yield self.in_thread(talk)
        self.assertEqual(codes, [250] * 8)
        whole, empty = self.submitted
        self.assertEqual(after_received(whole.message), MESSAGE)
        self.assertEqual(after_received(empty.message), b"")          # only our Received header

    @defer.inlineCallbacks
    def test_oversize_chunk_is_read_off_answered_552_and_the_transaction_reset(self):
        port = self.listen(max_message_size=1000)
        commands = b"NOOP\r\n" * 100            # 600 octets that would each get a 250 if taken for commands

        def talk():
            c = self.client(port)
            c.send(ENVELOPE + bdat(commands) + bdat(commands) + bdat(commands[:60], last=True)
                   + b"RSET\r\n")
            return c.replies(7)
        replies = yield self.in_thread(talk)
        self.assertEqual([(code, status(text)) for code, text in replies[3:]], [
            (250, "2.0.0"), (Code.EXCEEDED_STORAGE, "5.3.4"), (Code.BAD_SEQUENCE, "5.5.1"), (250, "2.0.0")])
        self.assertEqual(self.submitted, [])

    @defer.inlineCallbacks
    def test_bare_lfs_growing_past_the_limit_give_552(self):
        port = self.listen(max_message_size=1000)

        def talk():
            c = self.client(port)
            c.send(ENVELOPE + bdat(b"a\n" * 500, last=True) + b"NOOP\r\n")
            return c.replies(5)
        replies = yield self.in_thread(talk)
        self.assertEqual([(code, status(text)) for code, text in replies[3:]], [
            (Code.EXCEEDED_STORAGE, "5.3.4"), (250, "2.0.0")])
        self.assertEqual(self.submitted, [])

    @defer.inlineCallbacks
    def test_a_huge_announced_chunk_is_streamed_never_allocated(self):
        port = self.listen()            # 10 MB limit
        sent = 3 * 1024 * 1024

        def start():
            c = self.client(port)
            c.send(ENVELOPE + b"BDAT 2000000000 LAST\r\n")
            assert c.codes(3) == [250, 250, 250]
            block = b"x" * 65536
            for _ in range(sent // len(block)):
                c.send(block)
            return c
        c = yield self.in_thread(start)
        [protocol] = self.protocols

        def all_read():
            return protocol._chunk is not None and protocol._chunk.remaining == 2000000000 - sent
        while not all_read():       # awaiting the server's side, not sleeping
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertIsNone(protocol._chunk.message)      # refused up front: nothing is stored
        self.assertIsNone(protocol._chunked)
        self.assertLessEqual(len(protocol._buf), 1 << 20)
        c.close()

    @defer.inlineCallbacks
    def test_a_large_chunk_within_the_limit_is_kept_whole(self):
        port = self.listen()
        body = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 3000

        def talk():
            c = self.client(port)
            c.send(ENVELOPE + bdat(body, last=True))
            return c.codes(4)
        codes = yield self.in_thread(talk)
        self.assertEqual(codes, [250] * 4)
        self.assertEqual(after_received(self.submitted[0].message), body)

    # -- sequence ---------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_sequence_errors_and_bad_arguments(self):
        port = self.listen()
        noop = b"NOOP\r\n"

        def talk():
            c = self.client(port)
            c.send(b"EHLO client.test\r\n" + bdat(noop) + b"MAIL FROM:<a@remote.test>\r\n" + bdat(noop, last=True)
                   + b"RCPT TO:<u@example.test>\r\n" + b"BDAT\r\nBDAT x\r\nBDAT -1\r\nBDAT 6 LATER\r\n" + noop
                   + bdat(b"abc") + b"DATA\r\n")       # DATA ends a pipelined group (RFC 2920 3.1)
            first = c.replies(11)
            c.send(b"MAIL FROM:<b@remote.test>\r\nRCPT TO:<v@example.test>\r\nSTARTTLS\r\n" + bdat(b"def", last=True))
            return first + c.replies(4)
        replies = yield self.in_thread(talk)
        self.assertEqual([(code, status(text)) for code, text in replies], [
            (250, replies[0][1]),
            (Code.BAD_SEQUENCE, "5.5.1"),       # BDAT before MAIL: its octets skipped, not run
            (250, "2.1.0"),
            (Code.BAD_SEQUENCE, "5.5.1"),       # BDAT before RCPT
            (250, "2.1.5"),
            (Code.ARGUMENT_ERROR, "5.5.4"), (Code.ARGUMENT_ERROR, "5.5.4"), (Code.ARGUMENT_ERROR, "5.5.4"),
            (Code.ARGUMENT_ERROR, "5.5.4"),     # BDAT 6 LATER: a size, so its 6 octets are skipped
            (250, "2.0.0"),                     # BDAT 3
            (Code.BAD_SEQUENCE, "5.5.1"),       # DATA after BDAT
            (Code.BAD_SEQUENCE, "5.5.1"),       # MAIL inside the transaction
            (Code.BAD_SEQUENCE, "5.5.1"),       # RCPT after BDAT
            (Code.BAD_SEQUENCE, "5.5.1"),       # STARTTLS inside the transaction
            (250, "2.0.0"),                     # the transaction survived and ends
        ])
        self.assertIn("DATA", replies[10][1])
        [sub] = self.submitted
        self.assertEqual(after_received(sub.message), b"abcdef\r\n")
        self.assertEqual(sub.envelope.recipients, ["u@example.test"])

    @defer.inlineCallbacks
    def test_rset_between_chunks_discards_them(self):
        port = self.listen()

        def talk():
            c = self.client(port)
            c.send(ENVELOPE + bdat(b"Subject: old\r\n") + b"RSET\r\n" + bdat(b"lost", last=True)
                   + b"MAIL FROM:<b@remote.test>\r\nRCPT TO:<v@example.test>\r\n" + bdat(b"Subject: new\r\n", last=True))
            return c.codes(9)
        codes = yield self.in_thread(talk)
        self.assertEqual(codes, [250] * 5 + [Code.BAD_SEQUENCE] + [250] * 3)
        [sub] = self.submitted
        self.assertEqual(after_received(sub.message), b"Subject: new\r\n")
        self.assertEqual(sub.envelope.sender, "b@remote.test")

    @defer.inlineCallbacks
    def test_a_bdat_after_a_failed_chunk_gets_503_and_its_octets_are_skipped(self):
        port = self.listen()

        def talk():
            c = self.client(port)
            c.send(ENVELOPE + bdat(b"bare\rCR\r\n") + bdat(b"NOOP\r\n", last=True) + b"NOOP\r\n")
            return c.replies(6)
        replies = yield self.in_thread(talk)
        self.assertEqual([(code, status(text)) for code, text in replies[3:]], [
            (Code.MAILBOX_UNAVAILABLE, "5.5.2"), (Code.BAD_SEQUENCE, "5.5.1"), (250, "2.0.0")])
        self.assertEqual(self.submitted, [])

    # -- what is stored ---------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_the_stored_message_is_the_one_data_stores(self):
        port = self.listen()
        text = b"From: a@remote.test\r\nSubject: same\r\n\r\n..two dots\r\n.\r\nlast line no CRLF"

        def talk():
            with smtplib.SMTP(SERVER, port, timeout=10) as s:
                s.sendmail("a@remote.test", ["u@example.test"], text)    # smtplib dot-stuffs and ends it
            c = self.client(port)
            unix = text.replace(b"\r\n", b"\n")
            c.send(ENVELOPE + bdat(unix[:20]) + bdat(unix[20:], last=True))
            c.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<u@example.test>\r\n" + bdat(text + b"\r\n", last=True))
            return c.codes(8)
        codes = yield self.in_thread(talk)
        self.assertEqual(codes, [250] * 8)
        by_data, bare_lf, crlf = (after_received(s.message) for s in self.submitted)
        self.assertEqual(by_data, text + b"\r\n")
        self.assertEqual(bare_lf, by_data)
        self.assertEqual(crlf, by_data)

    @defer.inlineCallbacks
    def test_protocol_log_records_bdat(self):
        tmp = tempfile.mkdtemp(prefix="smtpgw-bdat-")
        self.addCleanup(shutil.rmtree, tmp, True)
        config = make_config()
        vs = replace(config.virtual_servers[0],
                     protocol_log=ProtocolLogConfig(enabled=True, directory=tmp, period="daily"))
        self.gateway = FakeGateway(replace(config, virtual_servers=(vs,)), reactor=reactor)
        factory = SMTPServerFactory(self.gateway, vs)
        port = reactor.listenTCP(0, factory, interface=SERVER)
        self.addCleanup(port.stopListening)

        def talk():
            c = self.client(port.getHost().port)
            c.send(ENVELOPE + bdat(b"Subject: x\r\n") + bdat(b"\r\nbody\r\n", last=True) + b"QUIT\r\n")
            return c.codes(6)
        yield self.in_thread(talk)
        yield factory.protocol_log.flush()
        [path] = list((Path(tmp) / "SMTPSVC1").iterdir())
        rows = [line.split(" ") for line in path.read_text().splitlines() if not line.startswith("#")]
        fields = [line for line in path.read_text().splitlines() if line.startswith("#Fields: ")][0].split(" ")[1:]
        rows = [dict(zip(fields, row)) for row in rows]
        self.assertEqual([r["cs-method"] for r in rows], ["EHLO", "MAIL", "RCPT", "BDAT", "BDAT", "QUIT"])
        first, last = rows[3], rows[4]
        self.assertEqual(first["cs-uri-query"], "+12")
        self.assertEqual(int(first["cs-bytes"]), len(b"BDAT 12\r\nSubject: x\r\n"))
        self.assertEqual(last["cs-uri-query"], f"+<Q{self.submitted[0].envelope.id}>")
        self.assertEqual(int(last["cs-bytes"]), len(bdat(b"\r\nbody\r\n", last=True)))


# -- exact reads, over an in-memory transport ---------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=30), max_size=40))
def test_any_split_into_reads_gives_the_same_message_and_replies(cuts):
    payload = MESSAGE.replace(b"\r\n", b"\n")
    wire = (ENVELOPE + bdat(payload[:11]) + bdat(payload[11:12]) + bdat(payload[12:], last=True)
            + b"NOOP\r\n")
    d = Dialog()
    pos, replies = 0, []
    for n in cuts + [len(wire)]:
        replies += d.send(wire[pos:pos + n])
        pos += n
    assert [a.code for a in replies] == [250] * 7
    assert after_received(d.submitted[0].message) == MESSAGE


def test_250_only_after_the_spool_put_fired():
    d = Dialog()
    d.gateway.queue.hold = True
    d.send(ENVELOPE)
    assert d.send(bdat(MESSAGE, last=True) + b"NOOP\r\n") == []
    assert d.paused
    d.submitted[0].answer.callback("Q1")
    assert [(a.code, a.text) for a in d.read()] == [(250, "2.0.0 Ok: queued as Q1"), (250, "2.0.0 Ok")]


def test_data_hook_sees_the_chunked_message_and_can_refuse():
    seen = []

    class Filter:
        @hookimpl
        def smtpgw_data(self, envelope, message):
            seen.append(message.headers["Subject"])
            return Reply(550, "5.7.1", "no thanks")

    gw = FakeGateway()
    gw.hooks.register(Filter())
    d = Dialog(gw)
    d.send(ENVELOPE)
    assert [(a.code, a.text) for a in d.send(bdat(MESSAGE, last=True))] == [(550, "5.7.1 no thanks")]
    assert seen == ["chunks"] and d.submitted == []


def test_diag_events_record_bdat():
    events = []

    class Diag:
        @hookimpl
        def smtpgw_event(self, category, level, message, fields):
            events.append((message, fields.get("line")))

    gw = FakeGateway()
    gw.hooks.register(Diag())
    d = Dialog(gw)
    d.send(ENVELOPE + bdat(b"x\r\n", last=True))
    assert ("command", "BDAT 3 LAST") in events


def test_too_many_hops_counts_received_headers_in_chunks():
    d = Dialog(FakeGateway(make_config(max_hops=2)))
    d.send(ENVELOPE)
    [answer] = d.send(bdat(b"Received: a\r\nReceived: b\r\n\r\nx\r\n", last=True))
    assert answer.code == Code.TRANSACTION_FAILED


# -- the line rules, piece by piece -------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300).map(lambda b: b.replace(b"\0", b"")), st.lists(st.integers(1, 50), max_size=15))
def test_chunked_message_is_split_independent(data, cuts):
    whole = ChunkedMessage(10_000)
    whole.take(data)
    whole.finish()
    pieces = ChunkedMessage(10_000)
    pos = 0
    for n in cuts + [len(data)]:
        pieces.take(data[pos:pos + n])
        pos += n
    pieces.finish()
    assert (pieces.problem, b"".join(pieces.chunks)) == (whole.problem, b"".join(whole.chunks))
    if whole.problem is None:
        stored = b"".join(whole.chunks)
        assert stored.count(b"\n") == stored.count(b"\r\n") == stored.count(b"\r")
        assert stored == b"" or stored.endswith(b"\r\n")
        assert whole.size == len(stored)


def test_chunked_message_line_rules():
    def stored(*pieces):
        m = ChunkedMessage(10_000)
        for p in pieces:
            m.take(p)
        m.finish()
        return m.problem or b"".join(m.chunks)
    assert stored(b"a\nb\n") == b"a\r\nb\r\n"
    assert stored(b"a\r", b"\nb") == b"a\r\nb\r\n"
    assert stored(b"a\r", b"b") is Problem.BARE_NEWLINE
    assert stored(b"a\r") is Problem.BARE_NEWLINE
    assert stored(b"a\0b\r\n") is Problem.NUL
    assert stored(b"x" * 998 + b"\r\n") == b"x" * 998 + b"\r\n"
    assert stored(b"x" * 500, b"x" * 498, b"\r", b"\n") == b"x" * 998 + b"\r\n"
    assert stored(b"x" * 500, b"x" * 499) is Problem.TOO_LONG
    assert stored(b"ok\r\n" + b"x" * 999 + b"\r\nok\r\n") is Problem.TOO_LONG
    assert stored(b"") == b""


# -- end to end: twistd, the real spool, a Maildir ----------------------------------------------------

def test_gateway_stores_bdat_and_data_messages_alike(gateway, tmp_path):
    gateway(base_config(tmp_path, listen=f"{E2E}:2525"))
    text = b"From: a@remote.test\r\nSubject: same\r\n\r\n.dot\r\nend\r\n"
    with smtplib.SMTP(E2E, 2525, timeout=30) as s:
        s.sendmail("a@remote.test", ["bob@example.test"], text)
    c = Client(E2E, 2525)
    try:
        unix = text.replace(b"\r\n", b"\n")
        c.send(b"EHLO client.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\n"
               + bdat(unix[:9]) + bdat(unix[9:], last=True) + b"QUIT\r\n")
        replies = c.replies(6)
    finally:
        c.close()
    assert [code for code, _ in replies] == [250] * 5 + [Code.CLOSING]
    assert replies[4][1].startswith("2.0.0 Ok: queued as ")
    assert wait_until(lambda: len(maildir_messages(tmp_path / "mail", "bob")) == 2, 30)
    first, second = maildir_messages(tmp_path / "mail", "bob")
    assert first[first.index(b"From: a@"):] == second[second.index(b"From: a@"):]
    assert email.message_from_bytes(second)["Subject"] == "same"
