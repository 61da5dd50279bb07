"""mta.delivery.nexthops against a real DNS server (dnsmasq on 127.0.0.56, see tests/dnsfixture.py)."""
from __future__ import annotations

import random

from twisted.internet import defer
from twisted.trial import unittest

from mta.model.nexthop import Hop
from mta.delivery.nexthops import PermanentDNSError, Resolver, TemporaryDNSError, ip_literal
from dnsfixture import DNSServer, free_port

DNS_IP = "127.0.0.56"


def records(dns: DNSServer) -> DNSServer:
    dns.add_mx("order.test", "mx2.order.test", 20)
    dns.add_mx("order.test", "mx1.order.test", 10)
    dns.add_mx("order.test", "mx3.order.test", 30)
    dns.add_a("mx1.order.test", "127.0.0.41")
    dns.add_a("mx2.order.test", "127.0.0.42")
    dns.add_a("mx3.order.test", "127.0.0.43")
    dns.add_aaaa("mx3.order.test", "::1")

    for host in ("a", "b"):
        dns.add_mx("equal.test", f"{host}.equal.test", 10)
    dns.add_mx("equal.test", "c.equal.test", 20)
    dns.add_a("a.equal.test", "127.0.0.44")
    dns.add_a("b.equal.test", "127.0.0.45")
    dns.add_a("c.equal.test", "127.0.0.46")

    dns.add_a("implicit.test", "127.0.0.47")
    dns.add_aaaa("v6only.test", "::1")
    dns.add_null_mx("null.test")

    dns.add_mx("nohost.test", "missing.nohost.test", 10)
    dns.add_mx("partial.test", "missing.partial.test", 10)
    dns.add_mx("partial.test", "ok.partial.test", 20)
    dns.add_a("ok.partial.test", "127.0.0.48")

    dns.add_mx("cname.test", "alias.cname.test", 10)
    dns.add_cname("alias.cname.test", "real.cname.test")
    dns.add_a("real.cname.test", "127.0.0.49")

    dns.add_mx("loop.test", "mail.gw.test", 10)
    dns.add_mx("loop.test", "backup.loop.test", 20)
    dns.add_mx("loop2.test", "first.loop2.test", 5)
    dns.add_mx("loop2.test", "mail.gw.test", 10)
    dns.add_mx("loop2.test", "backup.loop2.test", 20)
    for name, ip in (("mail.gw.test", "127.0.0.41"), ("backup.loop.test", "127.0.0.42"),
                     ("first.loop2.test", "127.0.0.43"), ("backup.loop2.test", "127.0.0.44"),
                     ("smarthost.test", "127.0.0.45")):
        dns.add_a(name, ip)
    return dns


def closing(test: unittest.TestCase, resolver: Resolver) -> Resolver:
    test.addCleanup(resolver.close)
    return resolver


class ResolverTests(unittest.TestCase):
    dns: DNSServer

    @classmethod
    def setUpClass(cls) -> None:
        cls.dns = records(DNSServer(DNS_IP)).start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.dns.stop()

    def resolver(self, **kw) -> Resolver:
        kw.setdefault("timeout", 2.0)
        return closing(self, Resolver(self.dns.nameservers, **kw))

    @defer.inlineCallbacks
    def assertFailsWith(self, d: defer.Deferred, exc_type: type, code: int, status: str):
        try:
            result = yield d
        except exc_type as e:
            self.assertEqual((e.reply.code, e.reply.status), (code, status), str(e.reply))
            return e
        self.fail(f"expected {exc_type.__name__}, got {result!r}")

    @defer.inlineCallbacks
    def test_mx_in_preference_order(self):
        """Lowest preference first; each MX host's A then AAAA addresses, labelled with the MX name."""
        hops = yield self.resolver().mx_hops("order.test")
        self.assertEqual(hops, [Hop("127.0.0.41", 25, "mx1.order.test", 10),
                                Hop("127.0.0.42", 25, "mx2.order.test", 20),
                                Hop("127.0.0.43", 25, "mx3.order.test", 30),
                                Hop("::1", 25, "mx3.order.test", 30)])

    @defer.inlineCallbacks
    def test_port_and_case(self):
        hops = yield self.resolver().mx_hops("ORDER.Test.", port=2525)
        self.assertEqual([(h.host, h.port) for h in hops][:1], [("127.0.0.41", 2525)])

    @defer.inlineCallbacks
    def test_equal_preferences_are_shuffled(self):
        """A seeded rng over many calls shows both orders of the two preference-10 hosts; 20 is last."""
        resolver = self.resolver(rng=random.Random(7))
        seen = set()
        for _ in range(30):
            hops = yield resolver.mx_hops("equal.test")
            names = [h.name for h in hops]
            self.assertEqual(names[2], "c.equal.test")
            seen.add(tuple(names[:2]))
        self.assertEqual(seen, {("a.equal.test", "b.equal.test"), ("b.equal.test", "a.equal.test")})
        self.assertGreater(resolver.hits, 0)

    @defer.inlineCallbacks
    def test_implicit_mx(self):
        """No MX records: the domain's own address, preference 0."""
        hops = yield self.resolver().mx_hops("implicit.test")
        self.assertEqual(hops, [Hop("127.0.0.47", 25, "implicit.test", 0)])
        hops = yield self.resolver().mx_hops("v6only.test")
        self.assertEqual(hops, [Hop("::1", 25, "v6only.test", 0)])

    def test_nxdomain_is_permanent(self):
        return self.assertFailsWith(self.resolver().mx_hops("nx.test"), PermanentDNSError, 550, "5.1.2")

    def test_null_mx_is_permanent(self):
        return self.assertFailsWith(self.resolver().mx_hops("null.test"), PermanentDNSError, 556, "5.1.10")

    def test_bad_domain_is_permanent(self):
        return self.assertFailsWith(self.resolver().mx_hops("bad..test"), PermanentDNSError, 550, "5.1.2")

    def test_mx_without_address_is_temporary(self):
        return self.assertFailsWith(self.resolver().mx_hops("nohost.test"), TemporaryDNSError, 451, "4.4.3")

    @defer.inlineCallbacks
    def test_unresolvable_mx_host_is_skipped(self):
        hops = yield self.resolver().mx_hops("partial.test")
        self.assertEqual(hops, [Hop("127.0.0.48", 25, "ok.partial.test", 20)])

    @defer.inlineCallbacks
    def test_mx_host_through_cname(self):
        hops = yield self.resolver().mx_hops("cname.test")
        self.assertEqual([h.host for h in hops], ["127.0.0.49"])

    @defer.inlineCallbacks
    def test_address_literal(self):
        hops = yield self.resolver().mx_hops("[127.0.0.41]", port=26)
        self.assertEqual(hops, [Hop("127.0.0.41", 26, "127.0.0.41", 0)])
        self.assertEqual(ip_literal("[IPv6:::1]"), "::1")
        self.assertIsNone(ip_literal("[999.1.1.1]"))
        yield self.assertFailsWith(self.resolver().mx_hops("[bogus]"), PermanentDNSError, 550, "5.1.2")

    @defer.inlineCallbacks
    def test_own_mx_drops_worse_preferences(self):
        """RFC 5321 5.1: when we are an MX, only better-preference hosts are tried; none left is a loop."""
        resolver = self.resolver(local_names=["Mail.GW.test"])
        hops = yield resolver.mx_hops("loop2.test")
        self.assertEqual([h.name for h in hops], ["first.loop2.test"])
        yield self.assertFailsWith(resolver.mx_hops("loop.test"), PermanentDNSError, 550, "5.4.6")

    @defer.inlineCallbacks
    def test_address_hops(self):
        """Smart hosts: A/AAAA only; a name without address waits (temporary) rather than bouncing."""
        resolver = self.resolver()
        hops = yield resolver.address_hops("smarthost.test", port=587, preference=3)
        self.assertEqual(hops, [Hop("127.0.0.45", 587, "smarthost.test", 3)])
        hops = yield resolver.address_hops("[127.0.0.46]")
        self.assertEqual(hops, [Hop("127.0.0.46", 25, "127.0.0.46", 0)])
        hops = yield resolver.address_hops("127.0.0.47", 2525)
        self.assertEqual(hops, [Hop("127.0.0.47", 2525, "127.0.0.47", 0)])
        # MX only, no address of its own: address_hops never follows MX
        yield self.assertFailsWith(resolver.address_hops("order.test"), TemporaryDNSError, 451, "4.4.3")

    def test_address_hops_missing_is_temporary(self):
        return self.assertFailsWith(self.resolver().address_hops("nx.test"), TemporaryDNSError, 451, "4.4.3")

    def test_refused_zone_is_temporary(self):
        """Outside the served zones dnsmasq answers REFUSED: no server could answer, so retry later."""
        return self.assertFailsWith(self.resolver().mx_hops("example.invalid"), TemporaryDNSError, 451, "4.4.3")

    @defer.inlineCallbacks
    def test_unreachable_nameserver_is_temporary(self):
        port = free_port(DNS_IP)          # nothing listens there
        resolver = closing(self, Resolver([(DNS_IP, port)], timeout=0.5))
        e = yield self.assertFailsWith(resolver.mx_hops("order.test"), TemporaryDNSError, 451, "4.4.3")
        self.assertIn("order.test", e.reply.text)

    @defer.inlineCallbacks
    def test_cache_respects_ttl(self):
        """Answers are reused until their TTL (60 s here) runs out; then asked again."""
        now = [1000.0]
        resolver = self.resolver(clock=lambda: now[0])
        first = yield resolver.mx_hops("order.test")
        asked = resolver.queries
        self.assertEqual(asked, 1 + 2 * 3)          # MX, then A + AAAA of each MX host
        now[0] += 59
        again = yield resolver.mx_hops("order.test")
        self.assertEqual((again, resolver.queries), (first, asked))
        now[0] += 2
        yield resolver.mx_hops("order.test")
        self.assertEqual(resolver.queries, 2 * asked)

    @defer.inlineCallbacks
    def test_concurrent_lookups_share_one_query(self):
        resolver = self.resolver()
        a, b = yield defer.gatherResults([resolver.mx_hops("implicit.test"), resolver.mx_hops("implicit.test")])
        self.assertEqual(a, b)
        self.assertEqual(resolver.queries, 3)       # MX, A, AAAA once


class CacheWithoutServerTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_cached_answer_survives_server_stop(self):
        dns = DNSServer("127.0.0.56")
        dns.add_mx("cached.test", "mx.cached.test", 10).add_a("mx.cached.test", "127.0.0.41").start()
        self.addCleanup(dns.stop)
        resolver = closing(self, Resolver(dns.nameservers, timeout=0.5))
        first = yield resolver.mx_hops("cached.test")
        dns.stop()
        again = yield resolver.mx_hops("cached.test")
        self.assertEqual(again, first)
        self.assertEqual(first[0].host, "127.0.0.41")
        # a name never asked is not in the cache: with the server gone it fails, temporarily
        try:
            yield resolver.mx_hops("other.test")
        except TemporaryDNSError:
            pass
        else:
            self.fail("expected TemporaryDNSError with the server stopped")

    @defer.inlineCallbacks
    def test_restart_applies_new_records(self):
        dns = DNSServer("127.0.0.56").start()
        self.addCleanup(dns.stop)
        port = dns.port
        try:
            yield closing(self, Resolver(dns.nameservers, timeout=1)).mx_hops("late.test")
        except PermanentDNSError:
            pass
        dns.add_a("late.test", "127.0.0.42").restart()
        self.assertEqual(dns.port, port)
        hops = yield closing(self, Resolver(dns.nameservers, timeout=1)).mx_hops("late.test")
        self.assertEqual([h.host for h in hops], ["127.0.0.42"])
