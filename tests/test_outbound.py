"""Per-connector outbound settings in the client pool (mta.smtp.client.policy.OutboundPolicy): TLS modes with
certificates made in the test, AUTH PLAIN/LOGIN, HELO, connection limits.

Peers listen on 127.0.0.91-98 (this issue's own addresses), port 25.
"""
from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

import trustme
from twisted.internet import defer

from mta.config import OutboundAuth
from mta.model.nexthop import Hop
from mta.smtp.client.policy import OutboundPolicy

from clientcase import HELO, ClientCase, wait_in_thread
from peers import SMTPPeer
from tlsfixture import ca_file, server_context

MSG = b"From: a@x.test\r\nSubject: hi\r\n\r\nbody\r\n"
TLS_EXT = ("STARTTLS", "PIPELINING", "SIZE 10485760", "8BITMIME")
CREDS = OutboundAuth("relay-user", "s3cret pass", "PLAIN")




class OutboundCase(ClientCase):
    def setUp(self):
        super().setUp()
        self.tmp = Path(tempfile.mkdtemp(prefix="smtpgw-outbound-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.ca = trustme.CA()

    def tls_peer(self, host: str, *names: str, **kwargs) -> SMTPPeer:
        kwargs.setdefault("extensions", TLS_EXT)
        return self.peer(host, tls_context=server_context(self.ca, *(names or ("smart.isp.test",))), **kwargs)


class TLSModes(OutboundCase):
    async def test_required_without_starttls_defers_with_a_clear_reason(self):
        peer = self.peer("127.0.0.91", extensions=("PIPELINING",))
        policy = OutboundPolicy("ISP", tls="required")
        e = await self.refused(self.pool().send(Hop("127.0.0.91"), "a@x", ["b@y"], MSG, policy=policy))
        self.assertEqual((e.reply.code, e.reply.status), (451, "4.7.10"))
        self.assertIn("TLS is required by connector 'ISP'", e.reply.text)
        self.assertIn("does not offer STARTTLS", e.reply.text)
        self.assertEqual(self.commands(peer, b"MAIL"), [])

    async def test_required_encrypts_without_checking_the_certificate(self):
        peer = self.tls_peer("127.0.0.91", "someone-else.test")
        results = await self.pool().send(Hop("127.0.0.91"), "a@x", ["b@y"], MSG,
                                         policy=OutboundPolicy("ISP", tls="required"))
        self.assertEqual(results[0].reply.code, 250)
        self.assertTrue(peer.messages[0].tls)

    async def test_required_when_starttls_is_refused(self):
        peer = self.tls_peer("127.0.0.91")
        peer.set_reply("starttls", "454 4.7.0 TLS not available now")
        e = await self.refused(self.pool().send(Hop("127.0.0.91"), "a@x", ["b@y"], MSG,
                                                policy=OutboundPolicy("ISP", tls="required")))
        self.assertEqual(e.reply.status, "4.7.10")
        self.assertIn("refused STARTTLS", e.reply.text)
        self.assertEqual(peer.messages, [])

    async def test_verify_checks_chain_and_name(self):
        peer = self.tls_peer("127.0.0.92", "smart.isp.test")
        policy = OutboundPolicy("ISP", tls="verify", ca_file=ca_file(self.ca, self.tmp))
        hop = Hop("127.0.0.92", 25, "smart.isp.test")
        results = await self.pool().send(hop, "a@x", ["b@y"], MSG, policy=policy)
        self.assertEqual(results[0].reply.code, 250)
        self.assertTrue(peer.messages[0].tls)

    async def test_verify_accepts_an_ip_address_in_the_certificate(self):
        peer = self.tls_peer("127.0.0.92", "127.0.0.92")
        policy = OutboundPolicy("ISP", tls="verify", ca_file=ca_file(self.ca, self.tmp))
        results = await self.pool().send(Hop("127.0.0.92", 25, "127.0.0.92"), "a@x", ["b@y"], MSG, policy=policy)
        self.assertEqual(results[0].reply.code, 250)
        self.assertTrue(peer.messages[0].tls)

    async def test_verify_refuses_a_certificate_for_another_name(self):
        peer = self.tls_peer("127.0.0.92", "other.isp.test")
        policy = OutboundPolicy("ISP", tls="verify", ca_file=ca_file(self.ca, self.tmp))
        e = await self.refused(self.pool().send(Hop("127.0.0.92", 25, "smart.isp.test"), "a@x", ["b@y"], MSG,
                                                policy=policy))
        self.assertEqual((e.reply.code, e.reply.status), (451, "4.7.5"))
        self.assertIn("certificate verification with smart.isp.test[127.0.0.92]:25 failed", e.reply.text)
        self.assertEqual(peer.messages, [])
        self.assertEqual(peer.connections, 1)          # no plaintext retry

    async def test_verify_refuses_a_certificate_from_an_unknown_ca(self):
        peer = self.tls_peer("127.0.0.92", "smart.isp.test")
        other_ca = ca_file(trustme.CA(), self.tmp, "other-ca.pem")
        e = await self.refused(self.pool().send(Hop("127.0.0.92", 25, "smart.isp.test"), "a@x", ["b@y"], MSG,
                                                policy=OutboundPolicy("ISP", tls="verify", ca_file=other_ca)))
        self.assertEqual(e.reply.status, "4.7.5")
        self.assertEqual(peer.messages, [])

    async def test_none_never_starts_tls(self):
        peer = self.tls_peer("127.0.0.93")
        await self.pool().send(Hop("127.0.0.93"), "a@x", ["b@y"], MSG, policy=OutboundPolicy("ISP", tls="none"))
        self.assertFalse(peer.messages[0].tls)
        self.assertEqual(self.commands(peer, b"STARTTLS"), [])

    async def test_policies_do_not_share_connections(self):
        peer = self.tls_peer("127.0.0.93")
        pool = self.pool()
        await pool.send(Hop("127.0.0.93"), "a@x", ["b@y"], MSG, policy=OutboundPolicy("A", tls="none"))
        await pool.send(Hop("127.0.0.93"), "a@x", ["b@y"], MSG, policy=OutboundPolicy("B", tls="required"))
        self.assertEqual([m.tls for m in peer.messages], [False, True])
        self.assertEqual(peer.connections, 2)


class OutboundAuthentication(OutboundCase):
    async def test_auth_plain_after_starttls(self):
        peer = self.tls_peer("127.0.0.94", auth={"relay-user": "s3cret pass"})
        results = await self.pool().send(Hop("127.0.0.94"), "a@x", ["b@y"], MSG,
                                         policy=OutboundPolicy("ISP", tls="required", auth=CREDS))
        self.assertEqual(results[0].reply.code, 250)
        self.assertEqual((peer.messages[0].tls, peer.messages[0].auth_user), (True, "relay-user"))

    async def test_auth_login(self):
        peer = self.tls_peer("127.0.0.94", auth={"relay-user": "s3cret pass"})
        policy = OutboundPolicy("ISP", auth=OutboundAuth("relay-user", "s3cret pass", "LOGIN"))
        await self.pool().send(Hop("127.0.0.94"), "a@x", ["b@y"], MSG, policy=policy)
        self.assertEqual(peer.messages[0].auth_user, "relay-user")
        self.assertEqual(self.commands(peer, b"AUTH"), [b"AUTH LOGIN"])

    async def test_wrong_password_defers_never_bounces(self):
        peer = self.tls_peer("127.0.0.94", auth={"relay-user": "other"})
        e = await self.refused(self.pool().send(Hop("127.0.0.94"), "a@x", ["b@y"], MSG,
                                                policy=OutboundPolicy("ISP", auth=CREDS)))
        self.assertEqual((e.reply.code, e.reply.status), (451, "4.7.8"))
        self.assertIn("535 5.7.8", e.reply.text)
        self.assertEqual(self.commands(peer, b"MAIL"), [])

    async def test_credentials_never_go_in_plaintext_by_default(self):
        peer = self.peer("127.0.0.94", auth={"relay-user": "s3cret pass"}, auth_requires_tls=False)
        e = await self.refused(self.pool().send(Hop("127.0.0.94"), "a@x", ["b@y"], MSG,
                                                policy=OutboundPolicy("ISP", auth=CREDS)))
        self.assertEqual(e.reply.status, "4.7.11")
        self.assertEqual(self.commands(peer, b"AUTH"), [])

    async def test_plaintext_auth_when_explicitly_allowed(self):
        peer = self.peer("127.0.0.94", auth={"relay-user": "s3cret pass"}, auth_requires_tls=False)
        policy = OutboundPolicy("ISP", tls="none", auth=CREDS, allow_plaintext_auth=True)
        await self.pool().send(Hop("127.0.0.94"), "a@x", ["b@y"], MSG, policy=policy)
        self.assertEqual((peer.messages[0].tls, peer.messages[0].auth_user), (False, "relay-user"))

    async def test_mechanism_not_offered(self):
        peer = self.tls_peer("127.0.0.94", auth={"relay-user": "s3cret pass"}, auth_mechanisms=("CRAM-MD5",))
        e = await self.refused(self.pool().send(Hop("127.0.0.94"), "a@x", ["b@y"], MSG,
                                                policy=OutboundPolicy("ISP", auth=CREDS)))
        self.assertIn("offers only AUTH CRAM-MD5", e.reply.text)
        self.assertEqual(self.commands(peer, b"AUTH"), [])

    async def test_helo_mode(self):
        peer = self.peer("127.0.0.95")
        await self.pool().send(Hop("127.0.0.95"), "a@x", ["b@y"], MSG, policy=OutboundPolicy("ISP", helo="helo"))
        self.assertEqual(peer.messages[0].helo, HELO)
        self.assertEqual(self.commands(peer, b"EHLO"), [])
        self.assertEqual(self.commands(peer, b"HELO"), [b"HELO " + HELO.encode()])


class ConnectionLimits(OutboundCase):
    def test_connect_timeout_comes_from_the_policy(self):
        pool = self.pool(connect_timeout=30)
        endpoint = pool._endpoint(Hop("127.0.0.96"), None, OutboundPolicy("ISP", connect_timeout=7))
        self.assertEqual(endpoint._timeout, 7)
        self.assertEqual(pool._endpoint(Hop("127.0.0.96"), None, None)._timeout, 30)

    async def test_per_host_limit(self):
        peer = self.peer("127.0.0.96")
        policy = OutboundPolicy("ISP", max_connections=10, max_connections_per_host=1)
        pool = self.pool()
        sends = [pool.send(Hop("127.0.0.96"), "a@x", [f"r{i}@y"], MSG, policy=policy) for i in range(4)]
        self.assertEqual(pool.open_count(policy, "127.0.0.96"), 1)
        await defer.gatherResults(sends)
        self.assertEqual(len(peer.messages), 4)
        self.assertEqual(peer.connections, 1)

    async def test_connector_total_across_hosts(self):
        release = threading.Event()
        first = self.peer("127.0.0.97")
        first.set_reply("dot", lambda _: release.wait(10) and None)
        second = self.peer("127.0.0.98")
        policy = OutboundPolicy("ISP", max_connections=1, max_connections_per_host=1)
        pool = self.pool()
        d1 = pool.send(Hop("127.0.0.97"), "a@x", ["b@y"], MSG, policy=policy)
        self.assertTrue(await wait_in_thread(lambda: first.transcript and first.transcript[-1] == b"."))
        d2 = pool.send(Hop("127.0.0.98"), "a@x", ["c@y"], MSG, policy=policy)
        # the connector is at its total: the second host gets no connection while the first is busy
        self.assertEqual(pool.open_count(policy), 1)
        self.assertEqual(pool.open_count(policy, "127.0.0.98"), 0)
        release.set()
        r1, r2 = await defer.gatherResults([d1, d2])
        self.assertEqual((r1[0].reply.code, r2[0].reply.code), (250, 250))
        self.assertEqual((len(first.messages), len(second.messages)), (1, 1))
        self.assertLessEqual(pool.open_count(policy), 1)

    async def test_idle_connection_of_another_host_makes_room(self):
        first = self.peer("127.0.0.97")
        second = self.peer("127.0.0.98")
        policy = OutboundPolicy("ISP", max_connections=1, max_connections_per_host=1)
        pool = self.pool(idle_timeout=60)
        await pool.send(Hop("127.0.0.97"), "a@x", ["b@y"], MSG, policy=policy)
        self.assertEqual(pool.idle_count("127.0.0.97", policy=policy), 1)
        await pool.send(Hop("127.0.0.98"), "a@x", ["c@y"], MSG, policy=policy)
        self.assertEqual(pool.idle_count("127.0.0.97", policy=policy), 0)
        self.assertEqual(len(second.messages), 1)
        self.assertTrue(await wait_in_thread(lambda: first.open_connections() == 0))
