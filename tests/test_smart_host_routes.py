"""Smart hosts end to end inside one process: the real Gateway (hooks, smart_host plugin, resolver,
client pool, deliverer) against a dnsmasq and real SMTP peers.

* ``[name]`` is looked up by A/AAAA only, a bare name by MX then A (Postfix's relayhost rule);
* several smart hosts are tried in order on connection failure or 4xx; the connector fails over by
  cost only when all are unusable;
* a connector's smart hosts override its virtual server's ``smart_host``;
* with the plugin disabled, connectors route by MX;
* an ISP smart host on 587 that wants STARTTLS (certificate made here, verified) and AUTH.

Addresses: peers on 127.0.0.91-98 port 25 (587 for the ISP), dnsmasq on 127.0.0.99.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import trustme
from twisted.internet import defer, reactor
from twisted.trial import unittest

from dnsfixture import DNSServer
from mta.config import parse_config
from mta.app.gateway import Gateway
from mta.model.queue_entry import QueueEntry, RecipientState
from peers import SMTPPeer
from tlsfixture import ca_file, server_context

DNS_IP = "127.0.0.99"
MSG = b"From: a@example.test\r\nSubject: via smart host\r\n\r\nhello\r\n"


def zone(dns: DNSServer) -> DNSServer:
    dns.add_a("smart.isp.test", "127.0.0.91")
    dns.add_mx("smart.isp.test", "mx.isp.test", 10).add_a("mx.isp.test", "127.0.0.92")
    dns.add_mx("remote.test", "mx.remote.test", 10).add_a("mx.remote.test", "127.0.0.93")
    dns.add_a("relay.isp.test", "127.0.0.97")
    return dns


def make_config(tmp: Path, dns: DNSServer, *connectors: dict, plugins=("smart_host",), vs_smart_host=None) -> dict:
    vs = {"name": "Default SMTP Virtual Server", "listen": ["127.0.0.90:2525"]}
    if vs_smart_host:
        vs["smart_host"] = vs_smart_host
    host, port = dns.address
    return {
        "gateway": {"hostname": "gw.example.test", "spool": str(tmp / "spool"),
                    "local_domains": {"example.test": {"maildir": str(tmp / "mail")}},
                    "dns": {"nameservers": [f"{host}:{port}"], "timeout": "2s"}},
        "virtual_servers": [vs],
        "connectors": list(connectors),
        "plugins": {"enabled": list(plugins)},
    }


def connector(name: str = "Internet", smart_hosts=(), cost: int = 1, **keys) -> dict:
    c = {"name": name, "address_spaces": [{"domain": "*", "cost": cost}], "smart_hosts": list(smart_hosts),
         "outbound": {"tls": "none", "connect_timeout": "5s"}}
    for key, value in keys.items():
        if isinstance(value, dict) and isinstance(c.get(key), dict):
            c[key] = {**c[key], **value}
        else:
            c[key] = value
    return c


def entry(*rcpts: str) -> QueueEntry:
    return QueueEntry("smarthost1", "a@example.test", [RecipientState(r) for r in rcpts], time.time(),
                      len(MSG), virtual_server="Default SMTP Virtual Server")


class SmartHostRoutes(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="smtpgw-smarthost-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.dns = zone(DNSServer(DNS_IP)).start()
        self.addCleanup(self.dns.stop)
        self.gateways: list[Gateway] = []

    def tearDown(self):
        closing = []
        for gw in self.gateways:
            gw.resolver.close()
            closing.append(gw.client.close())
        return defer.DeferredList(closing)

    def peer(self, host: str, **kwargs) -> SMTPPeer:
        p = SMTPPeer(host, **kwargs).start()
        self.addCleanup(p.stop)
        return p

    def gateway(self, *connectors: dict, **kw) -> Gateway:
        gw = Gateway(parse_config(make_config(self.tmp, self.dns, *connectors, **kw)), reactor)
        self.gateways.append(gw)
        return gw

    async def deliver(self, gw: Gateway, *rcpts: str):
        e = entry(*rcpts)
        return await gw.deliverer.deliver(e, MSG, e.pending())

    # -- lookups ---------------------------------------------------------------------------------

    async def test_bracketed_name_uses_its_address_not_its_mx(self):
        by_a, by_mx = self.peer("127.0.0.91"), self.peer("127.0.0.92")
        results = await self.deliver(self.gateway(connector(smart_hosts=["[smart.isp.test]"])), "b@far.test")
        self.assertEqual(results[0].reply.code, 250)
        self.assertEqual(results[0].hop, "smart.isp.test[127.0.0.91]:25")
        self.assertEqual((len(by_a.messages), len(by_mx.messages)), (1, 0))

    async def test_bare_name_is_looked_up_by_mx(self):
        by_a, by_mx = self.peer("127.0.0.91"), self.peer("127.0.0.92")
        results = await self.deliver(self.gateway(connector(smart_hosts=["smart.isp.test"])), "b@far.test")
        self.assertEqual(results[0].hop, "mx.isp.test[127.0.0.92]:25")
        self.assertEqual((len(by_a.messages), len(by_mx.messages)), (0, 1))

    async def test_unknown_smart_host_defers_instead_of_bouncing(self):
        results = await self.deliver(self.gateway(connector(smart_hosts=["nowhere.isp.test"])), "b@far.test")
        self.assertEqual(results[0].reply.code, 451)
        self.assertIn("smart host nowhere.isp.test", results[0].reply.text)

    # -- order and fail-over ------------------------------------------------------------------------

    async def test_smart_hosts_are_tried_in_order_past_a_dead_and_a_4xx_host(self):
        busy = self.peer("127.0.0.95")
        busy.set_reply("connect", "421 4.3.2 too busy, try later")
        good = self.peer("127.0.0.96")
        gw = self.gateway(connector(smart_hosts=["[127.0.0.94]", "[127.0.0.95]", "[127.0.0.96]"]))
        results = await self.deliver(gw, "b@far.test", "c@far.test")
        self.assertEqual([r.reply.code for r in results], [250, 250])
        self.assertEqual(results[0].hop, "[127.0.0.96]:25")
        self.assertEqual(busy.connections, 1)
        self.assertEqual(good.messages[0].recipients, ["b@far.test", "c@far.test"])

    async def test_recipient_deferred_by_one_smart_host_goes_to_the_next(self):
        first = self.peer("127.0.0.95")
        first.set_reply("rcpt", lambda rcpt: "451 4.2.0 greylisted" if rcpt.startswith("grey") else None)
        second = self.peer("127.0.0.96")
        gw = self.gateway(connector(smart_hosts=["[127.0.0.95]", "[127.0.0.96]"]))
        results = await self.deliver(gw, "ok@far.test", "grey@far.test")
        self.assertEqual([(r.reply.code, r.hop) for r in results],
                         [(250, "[127.0.0.95]:25"), (250, "[127.0.0.96]:25")])
        self.assertEqual(first.messages[0].recipients, ["ok@far.test"])
        self.assertEqual(second.messages[0].recipients, ["grey@far.test"])

    async def test_connector_fails_over_by_cost_only_when_every_smart_host_is_unusable(self):
        busy = self.peer("127.0.0.95")
        busy.set_reply("mail", "452 4.3.1 out of space")
        backup = self.peer("127.0.0.96")
        gw = self.gateway(connector("Primary", ["[127.0.0.94]", "[127.0.0.95]"], cost=1),
                          connector("Dial-up", ["[127.0.0.96]"], cost=50))
        results = await self.deliver(gw, "b@far.test")
        self.assertEqual((results[0].reply.code, results[0].hop), (250, "[127.0.0.96]:25"))
        self.assertEqual(len(backup.messages), 1)
        self.assertEqual(busy.connections, 1)

        # with a usable primary the dial-up connector is not touched
        busy.set_reply("mail", None)
        await self.deliver(gw, "c@far.test")
        self.assertEqual((len(busy.messages), len(backup.messages)), (1, 1))

    async def test_all_unusable_and_nothing_left_defers_with_the_last_reason(self):
        busy = self.peer("127.0.0.95")
        busy.set_reply("rcpt", "450 4.2.1 mailbox busy")
        gw = self.gateway(connector(smart_hosts=["[127.0.0.94]", "[127.0.0.95]"]))
        results = await self.deliver(gw, "b@far.test")
        self.assertEqual((results[0].reply.code, results[0].reply.status), (450, "4.2.1"))
        self.assertEqual(results[0].outcome, "deferred")

    # -- who decides -------------------------------------------------------------------------------

    async def test_connector_smart_hosts_override_the_virtual_server_smart_host(self):
        vs_host, conn_host = self.peer("127.0.0.95"), self.peer("127.0.0.96")
        gw = self.gateway(connector(smart_hosts=["[127.0.0.96]"]), vs_smart_host="[127.0.0.95]")
        await self.deliver(gw, "b@far.test")
        self.assertEqual((len(vs_host.messages), len(conn_host.messages)), (0, 1))
        # a connector without smart hosts uses the virtual server's
        gw2 = self.gateway(connector(), vs_smart_host="[127.0.0.95]")
        await self.deliver(gw2, "b@remote.test")
        self.assertEqual(len(vs_host.messages), 1)

    async def test_without_the_plugin_connectors_route_by_mx(self):
        smart, mx = self.peer("127.0.0.96"), self.peer("127.0.0.93")
        gw = self.gateway(connector(smart_hosts=["[127.0.0.96]"]), plugins=())
        results = await self.deliver(gw, "b@remote.test")
        self.assertEqual(results[0].hop, "mx.remote.test[127.0.0.93]:25")
        self.assertEqual((len(smart.messages), len(mx.messages)), (0, 1))

    # -- an ISP smart host on 587 with STARTTLS and AUTH ---------------------------------------------

    async def test_isp_smart_host_on_587_with_verified_tls_and_auth(self):
        ca = trustme.CA()
        isp = self.peer("127.0.0.97", port=587, extensions=("STARTTLS", "PIPELINING", "SIZE 10485760"),
                        tls_context=server_context(ca, "relay.isp.test"), auth={"customer42": "pa55word"})
        gw = self.gateway(connector(smart_hosts=["[relay.isp.test]"], outbound={
            "tls": "verify", "ca_file": ca_file(ca, self.tmp), "port": 587,
            "auth": {"username": "customer42", "password": "pa55word", "mechanism": "login"}}))
        results = await self.deliver(gw, "b@far.test")
        self.assertEqual((results[0].reply.code, results[0].hop), (250, "relay.isp.test[127.0.0.97]:587"))
        got = isp.messages[0]
        self.assertEqual((got.tls, got.auth_user, got.recipients), (True, "customer42", ["b@far.test"]))

    async def test_isp_smart_host_without_starttls_holds_mail_when_tls_is_required(self):
        isp = self.peer("127.0.0.97", port=587, extensions=("PIPELINING",))
        gw = self.gateway(connector(smart_hosts=["[relay.isp.test]"], outbound={"tls": "required", "port": 587}))
        results = await self.deliver(gw, "b@far.test")
        self.assertEqual((results[0].reply.code, results[0].reply.status), (451, "4.7.10"))
        self.assertEqual(results[0].outcome, "deferred")
        self.assertEqual(isp.messages, [])
