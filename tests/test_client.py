"""The outbound SMTP client: wire encoding in isolation, then whole deliveries to real test peers.

Peers listen on 127.0.0.31-39 (this module's own addresses), port 25.
"""
from __future__ import annotations

import ssl
import time

from hypothesis import given, settings, strategies as st
from twisted.internet import defer, threads

from mta.smtp.client.wire import DotStuffer, ProtocolError, ReplyParser, encode_all
from mta.model.nexthop import Hop
from mta.smtp.reply import Reply

from clientcase import HELO, ClientCase, wait_in_thread  # tests/ is on sys.path (conftest.py)
from peers import SMTPPeer, free_port

MSG = b"From: a@x.test\r\nSubject: hi\r\n\r\nbody\r\n"
NO_PIPELINING = ("SIZE 10485760", "8BITMIME", "ENHANCEDSTATUSCODES")


# -- wire level ------------------------------------------------------------------------------------

def parse(*lines: bytes) -> list[Reply]:
    p = ReplyParser()
    return [r for r in (p.feed(line) for line in lines) if r is not None]


def test_reply_multiline_and_enhanced_status():
    assert parse(b"250-2.1.0 first", b"250 2.1.0 second") == [Reply(250, "2.1.0", "first\nsecond")]
    assert parse(b"550 5.1.1 <x@y>: unknown") == [Reply(550, "5.1.1", "<x@y>: unknown")]
    assert parse(b"250 4.1.1 class mismatch") == [Reply(250, "", "4.1.1 class mismatch")]
    assert parse(b"354") == [Reply(354, "", "")]


def test_reply_parser_rejects_garbage():
    for bad in ([b"25O ok"], [b"250ok"], [b"250-a", b"251 b"], [b"x" * 5000], [b"250 a\rb"], [b"199 x"]):
        p = ReplyParser()
        try:
            for line in bad:
                p.feed(line)
        except ProtocolError:
            continue
        raise AssertionError(f"accepted {bad!r}")


def test_reply_parser_caps_lines():
    p = ReplyParser()
    try:
        for _ in range(200):
            p.feed(b"250-more")
    except ProtocolError:
        return
    raise AssertionError("unbounded multi-line reply accepted")


def unstuff(wire: bytes) -> bytes:
    """What a strict server makes of our DATA bytes: content up to the first lone '.' line."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    out = []
    lines = wire.split(b"\r\n")
    for i, line in enumerate(lines):
        if line == b".":
            assert lines[i + 1:] == [b""], "a lone dot before the end: the next hop sees two messages"
            break
        out.append(line[1:] if line.startswith(b".") else line)
    return b"".join(line + b"\r\n" for line in out)


def test_dot_at_chunk_boundary_is_stuffed():
    wire = b"".join(encode_all([b"a\r\n", b".\r\nb\r\n", b"..c"]))
    assert wire == b"a\r\n..\r\nb\r\n...c\r\n.\r\n"


def test_cr_and_lf_split_across_chunks():
    wire = b"".join(encode_all([b"a\r", b"\n.b\r", b"", b"\n", b".\r"]))
    assert wire == b"a\r\n..b\r\n..\r\n.\r\n"


def test_bare_newlines_never_leave():
    wire = b"".join(encode_all([b"a\n.\nb\rc"]))
    assert b"\n" not in wire.replace(b"\r\n", b"") and b"\r" not in wire.replace(b"\r\n", b"")
    assert unstuff(wire) == b"a\r\n.\r\nb\r\nc\r\n"


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from([b"\r\n", b".", b"x", b"..", b"\r\n.", b".\r\n"]), max_size=40),
       st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_stuffing_round_trips_at_any_split(tokens, cuts):
    data = b"".join(tokens)
    chunks, last = [], 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        chunks.append(data[last:cut])
        last = cut
    chunks.append(data[last:])
    expected = data if data.endswith(b"\r\n") or not data else data + b"\r\n"
    stuffer = DotStuffer()
    wire = b"".join(stuffer.encode(c) for c in chunks) + stuffer.finish()
    assert unstuff(wire) == expected


# -- deliveries over real sockets ------------------------------------------------------------------



class DeliveryTests(ClientCase):
    @defer.inlineCallbacks
    def test_pipelined_delivery(self):
        peer = self.peer("127.0.0.31")
        results = yield self.pool().send(Hop("127.0.0.31"), "a@x.test", ["b@y.test", "c@y.test"], MSG)
        self.assertEqual([(r.recipient, r.reply.code, r.outcome) for r in results],
                         [("b@y.test", 250, "delivered"), ("c@y.test", 250, "delivered")])
        self.assertEqual(results[0].hop, "[127.0.0.31]:25")
        m = peer.messages[0]
        self.assertEqual((m.sender, m.recipients, m.data, m.helo), ("a@x.test", ["b@y.test", "c@y.test"], MSG, HELO))
        self.assertEqual(m.mail_params, f"SIZE={len(MSG)}")
        group = [chunk for _, chunk in peer.reads if b"MAIL FROM" in chunk][0]
        self.assertIn(b"RCPT TO:<c@y.test>\r\nDATA\r\n", group)   # one write: MAIL, RCPTs, DATA

    @defer.inlineCallbacks
    def test_delivery_without_pipelining(self):
        peer = self.peer("127.0.0.31", extensions=NO_PIPELINING)
        results = yield self.pool().send(Hop("127.0.0.31"), "", ["b@y.test"], [MSG[:10], MSG[10:]])
        self.assertEqual([r.reply.code for r in results], [250])
        self.assertEqual(peer.messages[0].data, MSG)
        self.assertEqual(peer.messages[0].sender, "")
        self.assertFalse(any(b"MAIL" in c and b"RCPT" in c for _, c in peer.reads))

    @defer.inlineCallbacks
    def test_rcpt_partially_refused(self):
        for host, ext in (("127.0.0.32", NO_PIPELINING), ("127.0.0.33", SMTPPeer("x").extensions)):
            peer = self.peer(host, extensions=ext)
            peer.set_reply("rcpt", lambda r: "550 5.1.1 no such user" if r.startswith("bad") else None)
            peer.set_reply("dot", "250 2.0.0 queued as X1")
            results = yield self.pool().send(Hop(host), "a@x.test", ["bad1@y", "ok@y", "bad2@y"], MSG)
            self.assertEqual([(r.reply.code, r.reply.status, r.reply.text) for r in results],
                             [(550, "5.1.1", "no such user"), (250, "2.0.0", "queued as X1"),
                              (550, "5.1.1", "no such user")])
            self.assertEqual(peer.messages[0].recipients, ["ok@y"])

    @defer.inlineCallbacks
    def test_all_rcpts_refused_sends_no_message(self):
        for host, ext in (("127.0.0.32", NO_PIPELINING), ("127.0.0.33", SMTPPeer("x").extensions)):
            peer = self.peer(host, extensions=ext)
            peer.set_reply("rcpt", "450 4.2.1 mailbox busy")
            pool = self.pool()
            results = yield pool.send(Hop(host), "a@x.test", ["b@y"], MSG)
            self.assertEqual([r.outcome for r in results], ["deferred"])
            self.assertEqual(results[0].reply, Reply(450, "4.2.1", "mailbox busy"))
            self.assertEqual(peer.messages, [])
            if ext == NO_PIPELINING:
                self.assertEqual(self.commands(peer, b"DATA"), [])
            # the connection is still good for the next message (after an RSET)
            peer.set_reply("rcpt", None)
            results = yield pool.send(Hop(host), "a@x.test", ["b@y"], MSG)
            self.assertEqual(results[0].reply.code, 250)
            self.assertEqual(peer.connections, 1)
            self.assertEqual(len(self.commands(peer, b"RSET")), 1)

    @defer.inlineCallbacks
    def test_data_refused_applies_to_accepted_recipients(self):
        peer = self.peer("127.0.0.32")
        peer.set_reply("rcpt", lambda r: "550 5.1.1 unknown" if r == "bad@y" else None)
        peer.set_reply("data", "451 4.3.0 try later")
        results = yield self.pool().send(Hop("127.0.0.32"), "a@x", ["bad@y", "ok@y"], MSG)
        self.assertEqual([r.reply.code for r in results], [550, 451])
        self.assertEqual(peer.messages, [])

    @defer.inlineCallbacks
    def test_421_to_rcpt_defers_everyone_and_drops_the_connection(self):
        peer = self.peer("127.0.0.32", extensions=NO_PIPELINING)
        peer.set_reply("rcpt", lambda r: "421 4.3.2 shutting down" if r == "two@y" else None)
        pool = self.pool()
        results = yield pool.send(Hop("127.0.0.32"), "a@x", ["one@y", "two@y", "three@y"], MSG)
        self.assertEqual([(r.reply.code, r.outcome) for r in results], [(421, "deferred")] * 3)
        self.assertEqual(self.commands(peer, b"DATA"), [])
        self.assertEqual(self.commands(peer, b"RCPT TO:<three"), [])
        self.assertEqual(pool.idle_count("127.0.0.32"), 0)

    @defer.inlineCallbacks
    def test_dot_reply_rejection(self):
        peer = self.peer("127.0.0.32")
        peer.set_reply("dot", "554 5.7.1 spam")
        results = yield self.pool().send(Hop("127.0.0.32"), "a@x", ["b@y", "c@y"], MSG)
        self.assertEqual([r.outcome for r in results], ["failed", "failed"])
        self.assertEqual(results[0].reply.status, "5.7.1")

    @defer.inlineCallbacks
    def test_8bit_message_declares_body(self):
        peer = self.peer("127.0.0.32")
        body = b"Subject: caf\xc3\xa9\r\n\r\nna\xefve\r\n"
        yield self.pool().send(Hop("127.0.0.32"), "a@x", ["b@y"], body)
        self.assertEqual(peer.messages[0].mail_params, f"SIZE={len(body)} BODY=8BITMIME")
        self.assertEqual(peer.messages[0].data, body)


class DotStuffingOnTheWire(ClientCase):
    @defer.inlineCallbacks
    def test_dot_line_at_chunk_boundary_arrives_intact(self):
        peer = self.peer("127.0.0.34")
        chunks = [b"Subject: x\r\n\r\nfirst\r\n", b".\r\nMAIL FROM:<evil@x>\r\n", b".\r\n", b"tail\r\n"]
        results = yield self.pool().send(Hop("127.0.0.34"), "a@x", ["b@y"], chunks)
        self.assertEqual(results[0].reply.code, 250)
        self.assertEqual(len(peer.messages), 1)
        self.assertEqual(peer.messages[0].data, b"".join(chunks))
        self.assertEqual(peer.transcript.count(b".."), 2)     # both lone dots went out stuffed

    @defer.inlineCallbacks
    def test_lines_of_dots_arrive_exactly(self):
        peer = self.peer("127.0.0.34")
        body = b"Subject: dots\r\n\r\n.\r\n..x\r\n...\r\n.leading\r\nend"
        yield self.pool().send(Hop("127.0.0.34"), "a@x", ["b@y"], body)
        self.assertEqual(peer.messages[0].data, body + b"\r\n")
        self.assertEqual(peer.transcript[-6:], [b"..", b"...x", b"....", b"..leading", b"end", b"."])

    @defer.inlineCallbacks
    def test_large_message_streams_with_dots_at_piece_edges(self):
        peer = self.peer("127.0.0.34")
        line = b"x" * 65534 + b"\r\n"                # each piece of 64 KiB ends exactly on CRLF
        chunks = [line + b"." + b"y" * 100 + b"\r\n" for _ in range(3)] + [(line + b".\r\n") * 8]
        results = yield self.pool().send(Hop("127.0.0.34"), "a@x", ["b@y"], chunks)
        self.assertEqual(results[0].reply.code, 250)
        self.assertEqual(len(peer.messages), 1)
        self.assertEqual(peer.messages[0].data, b"".join(chunks))


class HostFailures(ClientCase):
    async def _mail_4xx(self):
        peer = self.peer("127.0.0.35")
        peer.set_reply("mail", "451 4.3.0 try later")
        e = await self.refused(self.pool().send(Hop("127.0.0.35"), "a@x", ["b@y"], MSG))
        self.assertEqual(e.reply, Reply(451, "4.3.0", "try later"))
        self.assertEqual(peer.messages, [])

    def test_mail_refused_is_host_unusable(self):
        return defer.Deferred.fromCoroutine(self._mail_4xx())

    async def _refused(self):
        port = free_port("127.0.0.35")
        started = time.monotonic()
        e = await self.refused(self.pool().send(Hop("127.0.0.35", port), "a@x", ["b@y"], MSG))
        self.assertLess(time.monotonic() - started, 2)
        self.assertEqual((e.reply.code, e.reply.status), (451, "4.4.1"))
        self.assertIn("connection", e.reply.text)

    def test_connection_refused(self):
        return defer.Deferred.fromCoroutine(self._refused())

    async def _greeting(self):
        peer = self.peer("127.0.0.35")
        peer.set_reply("connect", "554 5.7.1 go away")
        e = await self.refused(self.pool().send(Hop("127.0.0.35"), "a@x", ["b@y"], MSG))
        self.assertEqual((e.reply.code, e.reply.status), (554, "5.7.1"))
        self.assertEqual(self.commands(peer, b"MAIL"), [])

    def test_greeting_refused(self):
        return defer.Deferred.fromCoroutine(self._greeting())

    async def _ehlo_helo_refused(self):
        peer = self.peer("127.0.0.35")
        peer.set_reply("ehlo", "500 5.5.1 what")
        peer.set_reply("helo", "550 5.7.1 not you")
        e = await self.refused(self.pool().send(Hop("127.0.0.35"), "a@x", ["b@y"], MSG))
        self.assertEqual(e.reply.code, 550)

    def test_ehlo_and_helo_refused(self):
        return defer.Deferred.fromCoroutine(self._ehlo_helo_refused())

    @defer.inlineCallbacks
    def test_helo_fallback(self):
        peer = self.peer("127.0.0.35")
        peer.set_reply("ehlo", "502 5.5.2 EHLO not implemented")
        results = yield self.pool().send(Hop("127.0.0.35"), "a@x", ["b@y"], b"x\xff\r\n")
        self.assertEqual(results[0].reply.code, 250)
        self.assertEqual(self.commands(peer, b"HELO"), [b"HELO " + HELO.encode()])
        self.assertEqual(peer.messages[0].helo, HELO)
        self.assertEqual(peer.messages[0].mail_params, "")   # no ESMTP parameters after HELO

    async def _size(self):
        peer = self.peer("127.0.0.35", extensions=("PIPELINING", "SIZE 100"))
        results = await self.pool().send(Hop("127.0.0.35"), "a@x", ["b@y", "c@y"], b"x" * 98 + b"\r\n\r\n")
        self.assertEqual([(r.reply.code, r.reply.status) for r in results], [(552, "5.3.4")] * 2)
        self.assertEqual(self.commands(peer, b"MAIL"), [])

    def test_size_limit_smaller_than_message(self):
        return defer.Deferred.fromCoroutine(self._size())

    async def _reply_timeout(self):
        peer = self.peer("127.0.0.35")
        peer.set_reply("mail", lambda a: time.sleep(1.5))
        e = await self.refused(self.pool(command_timeout=0.3).send(Hop("127.0.0.35"), "a@x", ["b@y"], MSG))
        self.assertEqual((e.reply.code, e.reply.status), (451, "4.4.2"))

    def test_reply_timeout(self):
        return defer.Deferred.fromCoroutine(self._reply_timeout())

    @defer.inlineCallbacks
    def test_timeout_after_final_dot_is_never_delivered(self):
        peer = self.peer("127.0.0.35")
        peer.set_reply("dot", lambda d: time.sleep(1.5))
        results = yield self.pool(command_timeout=0.3).send(Hop("127.0.0.35"), "a@x", ["b@y"], MSG)
        self.assertEqual([(r.outcome, r.reply.status) for r in results], [("deferred", "4.4.2")])


class Injection(ClientCase):
    """Replies nobody asked for are never acted on (the Exim CVE-2021-38371 class)."""

    async def _check(self, host: str, stage: str, reply: str, **peer_kwargs):
        peer = self.peer(host, **peer_kwargs)
        peer.set_reply(stage, reply)
        e = await self.refused(self.pool().send(Hop(host), "a@x", ["b@y"], MSG))
        self.assertEqual((e.reply.code, e.reply.status), (451, "4.5.0"))
        self.assertEqual(self.commands(peer, b"MAIL"), [])
        self.assertEqual(peer.messages, [])

    def test_extra_line_after_greeting(self):
        return defer.Deferred.fromCoroutine(self._check("127.0.0.36", "connect", "220 hi\n250 2.0.0 injected"))

    def test_extra_reply_after_ehlo(self):
        return defer.Deferred.fromCoroutine(self._check("127.0.0.36", "ehlo", "250 peer.test\n250 injected"))

    def test_partial_line_after_reply(self):
        return defer.Deferred.fromCoroutine(self._check("127.0.0.36", "ehlo", "250 peer.test\n250-inj"))

    def test_extra_lines_after_starttls_220(self):
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        return defer.Deferred.fromCoroutine(self._check(
            "127.0.0.36", "starttls", "220 2.0.0 go ahead\n250-peer.test\n250 PIPELINING",
            extensions=("STARTTLS", "PIPELINING"), tls_context=ctx))

    async def _raw_server(self):
        """A server that pipelines its EHLO answer with the greeting, before we said anything."""
        import socket
        import threading
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.36", 0))
        srv.listen(1)
        received = bytearray()

        def serve():
            c, _ = srv.accept()
            c.sendall(b"220 raw.test ESMTP\r\n250-raw.test\r\n250 PIPELINING\r\n")
            c.settimeout(5)
            try:
                while chunk := c.recv(4096):
                    received.extend(chunk)
            except OSError:
                pass
            c.close()
            srv.close()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        e = await self.refused(self.pool().send(Hop("127.0.0.36", srv.getsockname()[1]), "a@x", ["b@y"], MSG))
        await threads.deferToThread(t.join, 5)
        self.assertEqual(e.reply.status, "4.5.0")
        self.assertNotIn(b"MAIL", bytes(received))

    def test_raw_server_pipelines_after_greeting(self):
        return defer.Deferred.fromCoroutine(self._raw_server())


class ConnectionReuse(ClientCase):
    @defer.inlineCallbacks
    def test_two_sends_share_one_connection(self):
        peer = self.peer("127.0.0.37")
        pool = self.pool()
        for i in range(2):
            results = yield pool.send(Hop("127.0.0.37"), "a@x", [f"b{i}@y"], MSG)
            self.assertEqual(results[0].reply.code, 250)
        self.assertEqual(peer.connections, 1)
        self.assertEqual([m.recipients for m in peer.messages], [["b0@y"], ["b1@y"]])
        self.assertEqual(self.commands(peer, b"RSET"), [])
        self.assertEqual(len(self.commands(peer, b"EHLO")), 1)

    @defer.inlineCallbacks
    def test_concurrent_sends_queue_for_max_per_host(self):
        peer = self.peer("127.0.0.37")
        pool = self.pool(max_per_host=2)
        sends = [pool.send(Hop("127.0.0.37"), "a@x", [f"r{i}@y"], MSG) for i in range(6)]
        results = yield defer.gatherResults(sends)
        self.assertEqual([r[0].reply.code for r in results], [250] * 6)
        self.assertEqual(peer.connections, 2)
        self.assertEqual(sorted(m.recipients[0] for m in peer.messages), [f"r{i}@y" for i in range(6)])

    @defer.inlineCallbacks
    def test_idle_connection_quits(self):
        peer = self.peer("127.0.0.37")
        pool = self.pool(idle_timeout=0.1)
        yield pool.send(Hop("127.0.0.37"), "a@x", ["b@y"], MSG)
        self.assertEqual(pool.idle_count("127.0.0.37"), 1)
        quit_seen = yield wait_in_thread(lambda: b"QUIT" in peer.transcript and peer.open_connections() == 0)
        self.assertTrue(quit_seen)
        self.assertEqual(pool.idle_count("127.0.0.37"), 0)

    @defer.inlineCallbacks
    def test_dead_reused_connection_is_retried_on_a_fresh_one(self):
        peer = self.peer("127.0.0.37")
        pool = self.pool()
        yield pool.send(Hop("127.0.0.37"), "a@x", ["b@y"], MSG)
        peer.drop_connections()         # the client has not noticed yet: same reactor turn
        results = yield pool.send(Hop("127.0.0.37"), "a@x", ["c@y"], MSG)
        self.assertEqual(results[0].reply.code, 250)
        self.assertEqual(peer.connections, 2)
        self.assertEqual([m.recipients for m in peer.messages], [["b@y"], ["c@y"]])

    @defer.inlineCallbacks
    def test_server_closing_idle_connection_is_noticed(self):
        peer = self.peer("127.0.0.37")
        pool = self.pool()
        yield pool.send(Hop("127.0.0.37"), "a@x", ["b@y"], MSG)
        peer.drop_connections()
        yield wait_in_thread(lambda: peer.open_connections() == 0)
        yield wait_in_thread(lambda: pool.idle_count("127.0.0.37") == 0)   # read from a thread: fine for an int
        self.assertEqual(pool.idle_count("127.0.0.37"), 0)


class SourceAddressAndTLS(ClientCase):
    @defer.inlineCallbacks
    def test_bind_address(self):
        peer = self.peer("127.0.0.38")
        pool = self.pool()
        yield pool.send(Hop("127.0.0.38"), "a@x", ["b@y"], MSG, source_address="127.0.0.39")
        yield pool.send(Hop("127.0.0.38"), "a@x", ["b@y"], MSG, source_address="127.0.0.38")
        self.assertEqual([m.peer_ip for m in peer.messages], ["127.0.0.39", "127.0.0.38"])
        self.assertEqual(peer.connections, 2)        # the source address is part of the pool key

    def tls_context(self):
        import trustme
        ca = trustme.CA()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("peer.test").configure_cert(ctx)
        return ctx

    @defer.inlineCallbacks
    def test_opportunistic_starttls(self):
        peer = self.peer("127.0.0.38", extensions=("STARTTLS", "PIPELINING", "SIZE 1000"),
                         tls_context=self.tls_context())
        results = yield self.pool().send(Hop("127.0.0.38"), "a@x", ["b@y"], MSG)
        self.assertEqual(results[0].reply.code, 250)
        self.assertTrue(peer.messages[0].tls)
        self.assertEqual(len(self.commands(peer, b"EHLO")), 2)
        self.assertEqual(peer.messages[0].data, MSG)

    @defer.inlineCallbacks
    def test_failed_handshake_falls_back_to_plaintext(self):
        ctx = self.tls_context()
        ctx.verify_mode = ssl.CERT_REQUIRED      # we present no client certificate: handshake fails
        peer = self.peer("127.0.0.38", extensions=("STARTTLS", "PIPELINING"), tls_context=ctx)
        results = yield self.pool().send(Hop("127.0.0.38"), "a@x", ["b@y"], MSG)
        self.assertEqual(results[0].reply.code, 250)
        self.assertFalse(peer.messages[0].tls)
        self.assertEqual(peer.connections, 2)

    @defer.inlineCallbacks
    def test_starttls_disabled(self):
        peer = self.peer("127.0.0.38", extensions=("STARTTLS",), tls_context=self.tls_context())
        yield self.pool(starttls=False).send(Hop("127.0.0.38"), "a@x", ["b@y"], MSG)
        self.assertFalse(peer.messages[0].tls)
        self.assertEqual(self.commands(peer, b"STARTTLS"), [])
