"""mta.delivery.attempt.Deliverer: routing, hop and connector fail-over, holds, local Maildir delivery.

The logic runs against a small gateway: real configuration objects, real hooks with the core policy,
the real resolver against dnsmasq (127.0.0.57), and a scripted client that records every ``send``.
The end-to-end class at the bottom uses the real SMTP client pool against SMTPPeer hosts on
127.0.0.41-49 port 25.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest

from twisted.internet import defer
from twisted.trial import unittest

from dnsfixture import DNSServer
from mta.config import (AddressSpace, Config, Connector, DnsConfig, GatewayConfig, ListenAddress, LocalDomain,
                        VirtualServer)
from mta.delivery.recipients import LocalRecipients
from mta.policy.core import CorePolicy
from mta.delivery.attempt import Deliverer
from mta.plugin.hookspecs import hookimpl
from mta.plugin.manager import Hooks
from mta.model.nexthop import Hop, HostUnusable, RecipientResult
from mta.model.queue_entry import QueueEntry, RecipientState
from mta.model.window import Hold
from mta.smtp.reply import Reply
from mta.delivery.nexthops import DNSError, Resolver
from mta.workers.identity import SINGLE
from mta.maillog import MailLog

DNS_IP = "127.0.0.57"
MESSAGE = b"Subject: test\r\n\r\nhello\r\n"
OK = Reply(250, "2.0.0", "OK queued")


def zone(dns: DNSServer) -> DNSServer:
    dns.add_mx("two.test", "mx1.two.test", 10).add_mx("two.test", "mx2.two.test", 20)
    dns.add_a("mx1.two.test", "127.0.0.41").add_a("mx2.two.test", "127.0.0.42")
    dns.add_mx("other.test", "mx.other.test", 10).add_a("mx.other.test", "127.0.0.43")
    dns.add_null_mx("null.test")
    dns.add_mx("dangling.test", "nowhere.dangling.test", 10)
    return dns


def make_config(*connectors: Connector, maildir: str = "/nonexistent", dns: DNSServer | None = None,
                listen: str = "127.0.0.1") -> Config:
    gw = GatewayConfig("gw.test", "/nonexistent/spool", "postmaster@gw.test",
                       local_domains={"local.test": LocalDomain("local.test", maildir)},
                       dns=DnsConfig(dns.nameservers if dns else (), 1.0))
    vs = VirtualServer("vs", (ListenAddress(listen, 25),))
    return Config(gw, (vs,), connectors or (Connector("internet", bridgeheads=("vs",)),))


class ScriptedClient:
    """Stands in for SMTPClientPool: answers per hop host with a Reply (2xx: all accepted;
    otherwise HostUnusable) or a callable(rcpts) -> list[RecipientResult]."""

    def __init__(self, script: dict | None = None, default: Reply | None = None) -> None:
        self.script = script or {}
        self.default = default or Reply(421, "4.4.2", "connection refused")
        self.calls: list[tuple[Hop, str, list[str], object, str | None]] = []

    def send(self, hop: Hop, sender: str, rcpts: list[str], data, source_address=None,
             policy=None) -> defer.Deferred:
        self.calls.append((hop, sender, list(rcpts), data, source_address))
        action = self.script.get(hop.host, self.default)
        if callable(action):
            return defer.succeed(action(rcpts))
        if action.is_positive:
            return defer.succeed([RecipientResult(r, action, str(hop)) for r in rcpts])
        return defer.fail(HostUnusable(action))

    @property
    def hosts(self) -> list[str]:
        return [c[0].host for c in self.calls]


class FakeGateway:
    def __init__(self, config: Config, client, resolver: Resolver | None = None) -> None:
        from twisted.internet import reactor
        self.config = config
        self.reactor = reactor
        self.client = client
        self.resolver = resolver or Resolver(config.gateway.dns.nameservers, timeout=1.0)
        self.worker = SINGLE
        self.mta_sts = None             # no MTA-STS lookups: the delivery tests' domains have no policy
        self.dane = None                # no TLSA lookups either
        self.mail_log = MailLog(reactor)
        self.hooks = Hooks()
        self.hooks.register(CorePolicy(self), name="core")
        self.recipients = LocalRecipients(self.config, self.reactor)
        self.events: list[tuple[str, str, str]] = []
        self.hooks.register(self, name="recorder")
        self.deliverer = Deliverer(self)

    @hookimpl
    def smtpgw_event(self, category, level, message, fields):
        self.events.append((category, level, message))


class HopsFor:
    """A site hook: fixed hops for one connector (as smart_host would), None for the others."""

    def __init__(self, connector: str, hops: list[Hop]) -> None:
        self.connector, self.hops = connector, hops

    @hookimpl
    def smtpgw_next_hops(self, domain, connector):
        return self.hops if connector.name == self.connector else None


def entry(*rcpts: str, sender: str = "alice@gw.test") -> QueueEntry:
    return QueueEntry("q1", sender, [RecipientState(r) for r in rcpts], time.time(), len(MESSAGE))


def codes(results: list[RecipientResult]) -> list[tuple[str, int, str]]:
    return [(r.recipient, r.reply.code, r.reply.status) for r in results]


def hooks_pass_dns_errors() -> bool:
    """Does mta.plugin.manager hand a reply-carrying exception back as the answer (needed for permanent DNS
    errors to bounce rather than be retried)?"""
    from mta.delivery.nexthops import PermanentDNSError

    class Raiser:
        @hookimpl
        def smtpgw_next_hops(self, domain):
            raise PermanentDNSError(Reply(550, "5.1.2", "probe"))

    hooks = Hooks()
    hooks.register(Raiser(), name="probe")
    answer = hooks.next_hops(None, "x", None)
    return isinstance(answer, Reply) and answer.code == 550


class DelivererTests(unittest.TestCase):
    dns: DNSServer

    @classmethod
    def setUpClass(cls) -> None:
        cls.dns = zone(DNSServer(DNS_IP)).start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.dns.stop()

    def tmpdir(self) -> str:
        path = tempfile.mkdtemp(prefix="smtpgw-delivery-")
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def gateway(self, *connectors: Connector, client=None, **kw) -> FakeGateway:
        gw = FakeGateway(make_config(*connectors, dns=self.dns, **kw), client or ScriptedClient())
        self.addCleanup(gw.resolver.close)
        return gw

    @defer.inlineCallbacks
    def test_lowest_preference_first(self):
        gw = self.gateway(client=ScriptedClient({"127.0.0.41": OK, "127.0.0.42": OK}))
        results = yield gw.deliverer.deliver(entry("bob@two.test", "carol@two.test"), MESSAGE,
                                             entry("bob@two.test", "carol@two.test").rcpts)
        self.assertEqual(codes(results), [("bob@two.test", 250, "2.0.0"), ("carol@two.test", 250, "2.0.0")])
        self.assertEqual(gw.client.hosts, ["127.0.0.41"])
        hop, sender, rcpts, data, source = gw.client.calls[0]
        self.assertEqual((sender, rcpts, data, source), ("alice@gw.test", ["bob@two.test", "carol@two.test"],
                                                         MESSAGE, "127.0.0.1"))
        self.assertIn("127.0.0.41", results[0].hop)
        self.assertTrue(any(c == "routing_engine" for c, _, _ in gw.events))

    @defer.inlineCallbacks
    def test_unusable_hop_falls_back_to_next_preference(self):
        gw = self.gateway(client=ScriptedClient({"127.0.0.42": OK}))
        e = entry("bob@two.test")
        results = yield gw.deliverer.deliver(e, MESSAGE, e.rcpts)
        self.assertEqual(codes(results), [("bob@two.test", 250, "2.0.0")])
        self.assertEqual(gw.client.hosts, ["127.0.0.41", "127.0.0.42"])
        self.assertIn("127.0.0.42", results[0].hop)

    @defer.inlineCallbacks
    def test_all_hops_down_defers_with_last_reply(self):
        gw = self.gateway(client=ScriptedClient({"127.0.0.42": Reply(421, "4.3.2", "shutting down")}))
        e = entry("bob@two.test")
        results = yield gw.deliverer.deliver(e, MESSAGE, e.rcpts)
        self.assertEqual(codes(results), [("bob@two.test", 421, "4.3.2")])
        self.assertEqual(results[0].outcome, "deferred")
        self.assertIn("127.0.0.42", results[0].hop)

    @defer.inlineCallbacks
    def test_permanent_host_refusal_fails_without_trying_more(self):
        gw = self.gateway(client=ScriptedClient({"127.0.0.41": Reply(550, "5.7.1", "sender refused")}))
        e = entry("bob@two.test", "carol@two.test")
        results = yield gw.deliverer.deliver(e, MESSAGE, e.rcpts)
        self.assertEqual([r.outcome for r in results], ["failed", "failed"])
        self.assertEqual(results[0].reply.status, "5.7.1")
        self.assertEqual(gw.client.hosts, ["127.0.0.41"])

    @defer.inlineCallbacks
    def test_connector_failover_by_cost(self):
        """All hops of the cheap connector down: the dearer one (its own hops) delivers."""
        cheap = Connector("cheap", (AddressSpace("*", 1),))
        dear = Connector("dear", (AddressSpace("*", 5),))
        gw = self.gateway(dear, cheap, client=ScriptedClient({"127.0.0.45": OK}))
        gw.hooks.register(HopsFor("dear", [Hop("127.0.0.45", 25, "backup.test", 0)]), name="site")
        e = entry("bob@two.test")
        results = yield gw.deliverer.deliver(e, MESSAGE, e.rcpts)
        self.assertEqual(codes(results), [("bob@two.test", 250, "2.0.0")])
        self.assertEqual(gw.client.hosts, ["127.0.0.41", "127.0.0.42", "127.0.0.45"])
        self.assertIn("127.0.0.45", results[0].hop)

    @defer.inlineCallbacks
    def test_temporary_dns_failure_fails_over_then_defers(self):
        """MX whose host has no address: temporary; the next connector is tried, then deferred."""
        cheap = Connector("cheap", (AddressSpace("*", 1),))
        dear = Connector("dear", (AddressSpace("*", 5),))
        gw = self.gateway(cheap, dear)
        e = entry("bob@dangling.test")
        results = yield gw.deliverer.deliver(e, MESSAGE, e.rcpts)
        self.assertEqual(results[0].outcome, "deferred")
        self.assertEqual(gw.client.calls, [])
        gw2 = self.gateway(cheap, dear, client=ScriptedClient({"127.0.0.45": OK}))
        gw2.hooks.register(HopsFor("dear", [Hop("127.0.0.45")]), name="site")
        results = yield gw2.deliverer.deliver(e, MESSAGE, e.rcpts)
        self.assertEqual(codes(results), [("bob@dangling.test", 250, "2.0.0")])
        self.flushLoggedErrors(DNSError)     # logged as plugin errors until mta.plugin.manager passes them on

    @pytest.mark.xfail(not hooks_pass_dns_errors(), strict=False,
                       reason="mta.plugin.manager turns the resolver's PermanentDNSError into a logged 451 4.3.0 "
                              "plugin error; needs the core change asked for in the delivery report")
    @defer.inlineCallbacks
    def test_nonexistent_domain_and_null_mx_bounce(self):
        gw = self.gateway()
        e = entry("bob@nx.test", "carol@null.test")
        results = yield gw.deliverer.deliver(e, MESSAGE, e.rcpts)
        self.flushLoggedErrors(DNSError)
        self.assertEqual(codes(results), [("bob@nx.test", 550, "5.1.2"), ("carol@null.test", 556, "5.1.10")])
        self.assertEqual(gw.client.calls, [])

    @defer.inlineCallbacks
    def test_permanent_reply_from_next_hops_bounces(self):
        """A next-hops hook answering with a 5xx Reply (how a DNS error arrives through the hook
        runner) fails the recipients; a 4xx one fails over and defers."""
        class Answer:
            def __init__(self, reply):
                self.reply = reply

            @hookimpl(tryfirst=True)
            def smtpgw_next_hops(self):
                return self.reply

        gw = self.gateway()
        gw.hooks.register(Answer(Reply(556, "5.1.10", "null MX")), name="site")
        e = entry("bob@two.test")
        results = yield gw.deliverer.deliver(e, MESSAGE, e.rcpts)
        self.assertEqual(codes(results), [("bob@two.test", 556, "5.1.10")])
        gw = self.gateway()
        gw.hooks.register(Answer(Reply(451, "4.4.3", "DNS timeout")), name="site")
        results = yield gw.deliverer.deliver(e, MESSAGE, e.rcpts)
        self.assertEqual(codes(results), [("bob@two.test", 451, "4.4.3")])
        self.assertEqual(gw.client.calls, [])

    @defer.inlineCallbacks
    def test_no_connector_is_no_route(self):
        gw = self.gateway(Connector("corp", (AddressSpace("*.corp.test", 1),)))
        e = entry("bob@two.test")
        results = yield gw.deliverer.deliver(e, MESSAGE, e.rcpts)
        self.assertEqual(codes(results), [("bob@two.test", 550, "5.4.4")])

    @defer.inlineCallbacks
    def test_closed_window_holds(self):
        until = time.time() + 3600

        class Closed:
            @hookimpl
            def smtpgw_delivery_window(self, connector):
                return Hold(until)

        gw = self.gateway(client=ScriptedClient({"127.0.0.41": OK}))
        gw.hooks.register(Closed(), name="schedule")
        e = entry("bob@two.test")
        results = yield gw.deliverer.deliver(e, MESSAGE, e.rcpts)
        self.assertEqual([(r.outcome, r.held_until, r.reply.status) for r in results], [("held", until, "4.4.5")])
        self.assertEqual(gw.client.calls, [])

    @defer.inlineCallbacks
    def test_route_hook_chooses_connectors(self):
        star = Connector("star", (AddressSpace("*", 1),))
        special = Connector("special", (AddressSpace("special.test", 1),))

        class Route:
            @hookimpl
            def smtpgw_route(self, recipient, connectors):
                assert [c.name for c in connectors] == ["star"]
                return [special] if recipient.startswith("vip") else None

        gw = self.gateway(star, special, client=ScriptedClient({"127.0.0.46": OK, "127.0.0.41": OK}))
        gw.hooks.register(Route(), name="route")
        gw.hooks.register(HopsFor("special", [Hop("127.0.0.46")]), name="hops")
        e = entry("vip@two.test")
        results = yield gw.deliverer.deliver(e, MESSAGE, e.rcpts)
        e2 = entry("plain@two.test")
        results2 = yield gw.deliverer.deliver(e2, MESSAGE, e2.rcpts)
        self.assertEqual([r.reply.code for r in results + results2], [250, 250])
        self.assertEqual(gw.client.hosts, ["127.0.0.46", "127.0.0.41"])

    @defer.inlineCallbacks
    def test_domains_concurrently_results_in_order(self):
        """Several domains in one call; per-recipient replies from the hop land on the right recipient."""
        def mixed(rcpts):
            return [RecipientResult(r, Reply(550, "5.1.1", "no such user") if r.startswith("x")
                                    else OK) for r in reversed(rcpts)]

        gw = self.gateway(client=ScriptedClient({"127.0.0.41": mixed, "127.0.0.43": OK}))
        e = entry("a@two.test", "b@other.test", "xavier@two.test", "c@TWO.test", "d@nx.test")
        results = yield gw.deliverer.deliver(e, [MESSAGE[:10], MESSAGE[10:]], e.rcpts)
        self.assertEqual([(r.recipient, r.reply.code) for r in results][:4],
                         [("a@two.test", 250), ("b@other.test", 250), ("xavier@two.test", 550),
                          ("c@TWO.test", 250)])
        self.assertGreaterEqual(results[4].reply.code, 400)
        self.assertEqual(sorted(gw.client.hosts), ["127.0.0.41", "127.0.0.43"])
        self.flushLoggedErrors(DNSError)
        two = [c for c in gw.client.calls if c[0].host == "127.0.0.41"][0]
        self.assertEqual(two[2], ["a@two.test", "xavier@two.test", "c@TWO.test"])

    @defer.inlineCallbacks
    def test_many_recipients_split_into_transactions(self):
        gw = self.gateway(client=ScriptedClient({"127.0.0.41": OK}))
        e = entry(*[f"u{i}@two.test" for i in range(150)])
        results = yield gw.deliverer.deliver(e, MESSAGE, e.rcpts)
        self.assertEqual({r.reply.code for r in results}, {250})
        self.assertEqual([len(c[2]) for c in gw.client.calls], [100, 50])

    @defer.inlineCallbacks
    def test_source_address_only_when_reachable(self):
        gw = self.gateway(listen="127.0.0.9", client=ScriptedClient({"127.0.0.41": OK}))
        gw.hooks.register(HopsFor("internet", [Hop("192.0.2.1"), Hop("127.0.0.41")]), name="hops")
        e = entry("bob@two.test")
        yield gw.deliverer.deliver(e, MESSAGE, e.rcpts)
        self.assertEqual([(c[0].host, c[4]) for c in gw.client.calls],
                         [("192.0.2.1", None), ("127.0.0.41", "127.0.0.9")])

    @defer.inlineCallbacks
    def test_local_domain_to_maildir(self):
        root = self.tmpdir()
        gw = FakeGateway(make_config(maildir=root, dns=self.dns), ScriptedClient())
        e = entry("Bob@Local.test", ".evil@local.test", "carol@local.test")
        results = yield gw.deliverer.deliver(e, [MESSAGE], e.rcpts)
        self.assertEqual(codes(results), [("Bob@Local.test", 250, "2.0.0"), (".evil@local.test", 550, "5.1.1"),
                                          ("carol@local.test", 250, "2.0.0")])
        for box in ("bob", "carol"):
            files = os.listdir(os.path.join(root, box, "new"))
            self.assertEqual(len(files), 1)
            with open(os.path.join(root, box, "new", files[0]), "rb") as f:
                rcpt = "Bob@Local.test" if box == "bob" else "carol@local.test"
                self.assertEqual(f.read(), f"Return-Path: <{e.sender}>\nDelivered-To: {rcpt}\n".encode()
                                 + MESSAGE.replace(b"\r\n", b"\n"))
        self.assertEqual(gw.client.calls, [])

    @defer.inlineCallbacks
    def test_local_disk_error_is_temporary(self):
        root = os.path.join(self.tmpdir(), "not-a-dir")
        with open(root, "w") as f:       # a file where the Maildir root should be
            f.write("x")
        gw = FakeGateway(make_config(maildir=root, dns=self.dns), ScriptedClient())
        e = entry("bob@local.test")
        results = yield gw.deliverer.deliver(e, MESSAGE, e.rcpts)
        self.assertEqual(codes(results), [("bob@local.test", 451, "4.3.0")])

    @defer.inlineCallbacks
    def test_client_crash_is_contained(self):
        class Broken(ScriptedClient):
            def send(self, hop, *a, **kw):
                self.calls.append((hop, "", [], None, None))
                if hop.host == "127.0.0.41":
                    raise RuntimeError("bug")
                return super().send(hop, *a, **kw)

        gw = self.gateway(client=Broken({"127.0.0.42": OK}))
        e = entry("bob@two.test")
        results = yield gw.deliverer.deliver(e, MESSAGE, e.rcpts)
        self.assertEqual(results[0].reply.code, 250)
        self.flushLoggedErrors(RuntimeError)

    @defer.inlineCallbacks
    def test_empty(self):
        results = yield self.gateway().deliverer.deliver(entry(), MESSAGE, [])
        self.assertEqual(results, [])


class EndToEndTests(unittest.TestCase):
    """The real SMTP client pool against SMTPPeer hosts found through MX records in dnsmasq."""

    dns: DNSServer

    @classmethod
    def setUpClass(cls) -> None:
        dns = DNSServer(DNS_IP)
        dns.add_mx("pref.test", "mx1.pref.test", 10).add_mx("pref.test", "mx2.pref.test", 20)
        dns.add_a("mx1.pref.test", "127.0.0.41").add_a("mx2.pref.test", "127.0.0.42")
        dns.add_mx("down.test", "mx1.down.test", 10).add_mx("down.test", "mx2.down.test", 20)
        dns.add_a("mx1.down.test", "127.0.0.44").add_a("mx2.down.test", "127.0.0.45")   # nobody listens
        dns.add_a("relay.down.test", "127.0.0.46")
        cls.dns = dns.start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.dns.stop()

    def setUp(self) -> None:
        from twisted.internet import reactor

        from mta.smtp.client.pool import SMTPClientPool
        self.pool = SMTPClientPool(reactor, helo_name="gw.test", connect_timeout=2.0, command_timeout=5.0,
                                   starttls=False)
        self.addCleanup(self.pool.close)

    def peer(self, host: str):
        from peers import SMTPPeer
        p = SMTPPeer(host=host, port=25).start()
        self.addCleanup(p.stop)
        return p

    def gateway(self, *connectors: Connector, listen: str = "127.0.0.1") -> FakeGateway:
        gw = FakeGateway(make_config(*connectors, dns=self.dns, listen=listen), self.pool)
        self.addCleanup(gw.resolver.close)
        return gw

    @defer.inlineCallbacks
    def test_lowest_preference_first(self):
        first, second = self.peer("127.0.0.41"), self.peer("127.0.0.42")
        gw = self.gateway(listen="127.0.0.48")
        e = entry("bob@pref.test", "carol@pref.test")
        results = yield gw.deliverer.deliver(e, MESSAGE, e.rcpts)
        self.assertEqual([r.reply.code for r in results], [250, 250])
        self.assertEqual([(m.sender, m.recipients, m.data, m.peer_ip) for m in first.messages],
                         [("alice@gw.test", ["bob@pref.test", "carol@pref.test"], MESSAGE, "127.0.0.48")])
        self.assertEqual(second.messages, [])

    @defer.inlineCallbacks
    def test_fallback_to_higher_preference_when_first_is_down(self):
        second = self.peer("127.0.0.42")          # 127.0.0.41 refuses connections
        gw = self.gateway()
        e = entry("bob@pref.test")
        results = yield gw.deliverer.deliver(e, MESSAGE, e.rcpts)
        self.assertEqual(codes(results), [("bob@pref.test", 250, "2.0.0")])
        self.assertIn("127.0.0.42", results[0].hop)
        self.assertEqual([m.recipients for m in second.messages], [["bob@pref.test"]])

    @defer.inlineCallbacks
    def test_connector_failover_by_cost(self):
        """Both MX hosts of the cheap connector are down; the dearer connector's relay takes it."""
        relay = self.peer("127.0.0.46")
        gw = self.gateway(Connector("cheap", (AddressSpace("*", 1),)),
                          Connector("dear", (AddressSpace("*", 5),)))
        gw.hooks.register(HopsFor("dear", [Hop("127.0.0.46", 25, "relay.down.test")]), name="site")
        e = entry("bob@down.test")
        results = yield gw.deliverer.deliver(e, MESSAGE, e.rcpts)
        self.assertEqual(codes(results), [("bob@down.test", 250, "2.0.0")])
        self.assertEqual([m.recipients for m in relay.messages], [["bob@down.test"]])

    @defer.inlineCallbacks
    def test_everything_down_is_deferred(self):
        gw = self.gateway()
        e = entry("bob@down.test")
        results = yield gw.deliverer.deliver(e, MESSAGE, e.rcpts)
        self.assertEqual(results[0].outcome, "deferred")
        self.assertIn("127.0.0.45", results[0].hop)

    @defer.inlineCallbacks
    def test_recipient_refusals_come_back_per_recipient(self):
        first = self.peer("127.0.0.41")
        first.set_reply("rcpt", lambda rcpt: "550 5.1.1 no such user" if rcpt.startswith("nobody") else None)
        gw = self.gateway()
        e = entry("nobody@pref.test", "bob@pref.test")
        results = yield gw.deliverer.deliver(e, MESSAGE, e.rcpts)
        self.assertEqual(codes(results), [("nobody@pref.test", 550, "5.1.1"), ("bob@pref.test", 250, "2.0.0")])
        self.assertEqual([m.recipients for m in first.messages], [["bob@pref.test"]])
