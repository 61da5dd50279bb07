"""The outbound W3C protocol log (``connectors[].protocol_log``): what the gateway said to a next hop
and what it answered, one line per command, read back as a W3C log analyzer reads it.

Addresses: 127.0.0.202 (the client-level peer), 127.0.0.203 (the gateway) and 127.0.0.204 (its smart host).
"""
from __future__ import annotations

import base64
import shutil
import smtplib
import tempfile
from pathlib import Path

import pytest
from twisted.internet import reactor

from clientcase import HELO, ClientCase
from gwprocess import base_config, wait_until
from mta.config import ConfigError, OutboundAuth, ProtocolLogConfig, parse_config
from mta.model.nexthop import Hop
from mta.smtp.client.policy import OutboundPolicy
from mta.smtp.client.protocol_log import OutboundProtocolLog, site_name
from test_protocol_log import assert_directives_first, parse_w3c

MSG = b"From: a@x.test\r\nSubject: out\r\n\r\nbody\r\n"
PEER = "127.0.0.202"
GW_HOST, SMART = "127.0.0.203", "127.0.0.204"


class ClientLog(ClientCase):
    def setUp(self):
        super().setUp()
        self.tmp = Path(tempfile.mkdtemp(prefix="smtpgw-outlog-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)

    async def test_one_line_per_command_with_auth_masked(self):
        peer = self.peer(PEER, auth={"relay-user": "s3cret pass"}, auth_requires_tls=False)
        log = OutboundProtocolLog(ProtocolLogConfig(enabled=True, directory=str(self.tmp), period="unlimited"),
                                  "SMTPOUT1", "gw.example.test", reactor, delay=0.05)
        pool = self.pool()
        pool.protocol_logs["ISP"] = log
        policy = OutboundPolicy("ISP", tls="none", auth=OutboundAuth("relay-user", "s3cret pass", "PLAIN"),
                                allow_plaintext_auth=True)
        results = await pool.send(Hop(PEER), "a@x.test", ["b@y.test", "c@y.test"], MSG, policy=policy)
        self.assertEqual([r.reply.code for r in results], [250, 250])
        await pool.close()                                  # QUIT
        await log.close()
        path = self.tmp / "SMTPOUT1" / "extend1.log"
        assert_directives_first(path)
        rows = parse_w3c(path)[1]
        self.assertEqual([(r["cs-method"], r["sc-status"]) for r in rows], [
            ("-", "220"), ("EHLO", "250"), ("AUTH", "235"), ("MAIL", "250"), ("RCPT", "250"), ("RCPT", "250"),
            ("DATA", "250"), ("QUIT", "221")])
        self.assertEqual(rows[1]["cs-uri-query"], "+" + HELO)
        self.assertEqual(rows[2]["cs-uri-query"], "+PLAIN")              # the mechanism, never the credentials
        secret = base64.b64encode(b"\0relay-user\0s3cret pass").decode()
        self.assertNotIn(secret, path.read_text())
        self.assertEqual(rows[3]["cs-uri-query"], "+FROM:<a@x.test>+SIZE=%d" % len(MSG))
        self.assertEqual([r["cs-uri-query"] for r in rows[4:6]], ["+TO:<b@y.test>", "+TO:<c@y.test>"])
        self.assertGreaterEqual(int(rows[6]["cs-bytes"]), len(MSG) + len(b"DATA\r\n"))   # the message too
        self.assertEqual({r["s-ip"] for r in rows}, {PEER})
        self.assertEqual({r["s-port"] for r in rows}, {"25"})
        self.assertEqual({r["c-ip"] for r in rows}, {"127.0.0.1"})
        self.assertEqual([r["cs-username"] for r in rows[1:4]], [HELO, HELO, "relay-user"])   # once logged in
        self.assertEqual({r["s-sitename"] for r in rows}, {"SMTPOUT1"})
        self.assertEqual({r["cs-host"] for r in rows}, {f"[{PEER}]:25"})

    async def test_a_refused_sender_and_a_connector_without_a_log(self):
        peer = self.peer(PEER)
        peer.set_reply("mail", "550 5.7.1 not you")
        log = OutboundProtocolLog(ProtocolLogConfig(enabled=True, directory=str(self.tmp), period="unlimited"),
                                  "SMTPOUT2", "gw.example.test", reactor, delay=0.05)
        pool = self.pool()
        pool.protocol_logs["ISP"] = log
        await self.refused(pool.send(Hop(PEER), "a@x.test", ["b@y.test"], MSG, policy=OutboundPolicy("ISP")))
        await self.refused(pool.send(Hop(PEER), "a@x.test", ["b@y.test"], MSG, policy=OutboundPolicy("Other")))
        await pool.close()
        await log.close()
        rows = parse_w3c(self.tmp / "SMTPOUT2" / "extend1.log")[1]
        self.assertEqual([(r["cs-method"], r["sc-status"]) for r in rows][:3],
                         [("-", "220"), ("EHLO", "250"), ("MAIL", "550")])
        self.assertEqual(len([r for r in rows if r["cs-method"] == "EHLO"]), 1)      # "Other" wrote nothing


def test_connector_key_and_its_errors(tmp_path):
    cfg = base_config(tmp_path)
    assert parse_config(cfg).connectors[0].protocol_log.enabled is False
    cfg["connectors"][0]["protocol_log"] = {"enabled": True, "directory": "var/log/out", "period": "10MB",
                                            "fields": ["date", "time", "s-ip", "cs-method", "sc-status"]}
    config = parse_config(cfg)
    plog = config.connectors[0].protocol_log
    assert (plog.enabled, plog.period, plog.fields[-1]) == (True, 10 * 1024 * 1024, "sc-status")
    assert plog.directory.endswith("var/log/out")
    assert site_name(config, config.connectors[0]) == "SMTPOUT1"
    cfg["connectors"][0]["protocol_log"] = {"period": "fortnightly"}
    with pytest.raises(ConfigError, match=r"^connectors\[0\]\.protocol_log\.period: expected one of"):
        parse_config(cfg)


def test_twistd_gateway_writes_the_outbound_log(gateway, peers, tmp_path):
    smart = peers(SMART)
    cfg = base_config(tmp_path, listen=f"{GW_HOST}:2525")
    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    cfg["connectors"][0]["smart_hosts"] = [f"[{SMART}]"]
    cfg["connectors"][0]["protocol_log"] = {"enabled": True, "directory": str(tmp_path / "w3c"),
                                            "period": "daily"}
    gw = gateway(cfg)
    with smtplib.SMTP(GW_HOST, 2525, timeout=30) as s:
        s.sendmail("a@example.test", ["far@remote.test"], MSG)
    assert wait_until(lambda: len(smart.messages) == 1, 20)
    gw.stop()                                   # the connection is closed (QUIT) and the log written
    folder = tmp_path / "w3c" / "SMTPOUT1"
    assert wait_until(lambda: folder.is_dir() and list(folder.iterdir()), 5)
    [path] = list(folder.iterdir())
    assert path.name.startswith("ex") and path.name.endswith(".log")
    rows = parse_w3c(path)[1]
    methods = [r["cs-method"] for r in rows]
    assert methods[:5] == ["-", "EHLO", "MAIL", "RCPT", "DATA"], methods
    assert [r["sc-status"] for r in rows[:5]] == ["220", "250", "250", "250", "250"]
    assert rows[3]["cs-uri-query"] == "+TO:<far@remote.test>"
    assert {r["s-ip"] for r in rows} == {SMART} and {r["s-computername"] for r in rows} == {"gw.example.test"}
    assert not (tmp_path / "w3c" / "SMTPSVC1").exists()      # the virtual server's own log stays off
