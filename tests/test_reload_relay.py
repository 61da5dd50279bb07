"""SIGHUP reloads relay_acl's settings the way ``postfix reload`` does: new connections use the file's
``relay`` lists and connector restrictions, sessions in progress keep what they started with, and a
file that no longer validates changes nothing (the log names the key).

In process through the real ESMTP server over an in-memory transport, then against the real daemon
(``twistd -n smtpgw``): gateway 127.0.0.160, client 127.0.0.161 (allowed only after the reload),
smart host peer 127.0.0.162; with ``gateway.workers: 2``: gateway 127.0.0.165, smart host 127.0.0.166.
"""
from __future__ import annotations

import signal
import smtplib
from typing import Any

from mta.config import parse_config
from mta.model.queue_entry import QueueEntry, RecipientState
from smtpgw_plugins.relay_acl.plugin import POLICY_KEY
from test_relay_acl import TRUSTED_V4, UNTRUSTED_V4, Client, config_dict, make_gateway

from gwprocess import base_config, wait_until

RELAYED = "<bob@far.test>"


def allowing(*networks: str, **connector: Any):
    cfg = config_dict(**connector)
    cfg["virtual_servers"][0]["relay"]["allow"] = list(networks)
    return parse_config(cfg)


# -- in process ----------------------------------------------------------------------------------

def test_new_sessions_get_the_new_relay_list_and_old_ones_keep_theirs():
    gw, plugin, _ = make_gateway()
    before = Client(gw, UNTRUSTED_V4)
    assert before.rcpt(RELAYED)[0] == 550

    gw.hooks.reload(allowing(f"{UNTRUSTED_V4}/32"))
    assert before.rcpt(RELAYED)[0] == 550                   # began under the old list
    after = Client(gw, UNTRUSTED_V4)
    assert after.rcpt(RELAYED)[0] == 250
    assert Client(gw, TRUSTED_V4).rcpt(RELAYED)[0] == 550   # dropped from the list

    gw.hooks.reload(allowing())
    assert after.rcpt(RELAYED)[0] == 250                    # still its own settings
    assert Client(gw, UNTRUSTED_V4).rcpt(RELAYED)[0] == 550
    assert after.protocol.session.extra[POLICY_KEY] is not plugin.policy


def test_connector_restrictions_follow_the_reload():
    gw, plugin, _ = make_gateway()
    old = Client(gw, TRUSTED_V4)
    assert old.rcpt(RELAYED, mail_params=" SIZE=5000")[0] == 250
    gw.hooks.reload(allowing(
        f"{TRUSTED_V4}/32", content_restrictions={"max_message_size": 1000},
        delivery_restrictions={"default": "accept", "except": ["@spam.test"]}))
    new = Client(gw, TRUSTED_V4)
    assert new.rcpt(RELAYED, mail_params=" SIZE=5000")[0] == 552
    assert new.rcpt(RELAYED, sender="x@spam.test")[0] == 550
    assert old.rcpt(RELAYED, mail_params=" SIZE=5000")[0] == 250
    # queued mail is checked at delivery against the newest restrictions
    connector = gw.config.connectors[0]
    entry = QueueEntry(id="q1", sender="x@spam.test", rcpts=[RecipientState("bob@far.test")],
                       received_at=0.0, size=10)
    assert plugin.smtpgw_delivery_window(connector=connector, envelope=entry).code == 550


def test_what_a_reload_cannot_apply_is_kept_and_the_rest_applied():
    gw, plugin, _ = make_gateway()
    cfg = config_dict()
    cfg["virtual_servers"][0]["name"] = "Renamed"
    cfg["virtual_servers"][0]["relay"]["allow"] = [f"{UNTRUSTED_V4}/32"]
    cfg["connectors"].append({"name": "New", "address_spaces": [{"domain": "new.test", "cost": 1}]})
    policy, notes = plugin.policy.reloaded(gw.config, parse_config(cfg))
    assert policy.relay_for("VS") == plugin.policy.relay_for("VS")       # unknown to the file: kept
    assert any("'VS' is no longer in the file" in n for n in notes)
    assert any("'Renamed' is new" in n for n in notes)
    assert any("connector 'New' is new" in n for n in notes)
    assert set(policy.connectors) == {"Internet"}


# -- the daemon ----------------------------------------------------------------------------------

GW_HOST, CLIENT, SMART = "127.0.0.160", "127.0.0.161", "127.0.0.162"
WGW_HOST, WSMART = "127.0.0.165", "127.0.0.166"
RELOADED = "relay settings reloaded"


def _rcpt(host: str, port: int = 25) -> tuple[int, str]:
    with smtplib.SMTP(host, port, timeout=30, source_address=(CLIENT, 0)) as s:
        s.ehlo("client.test")
        assert s.mail("alice@client.test")[0] == 250
        code, text = s.rcpt("bob@far.test")
        return code, text.decode()


def _send(host: str, subject: str, port: int = 25) -> None:
    with smtplib.SMTP(host, port, timeout=30, source_address=(CLIENT, 0)) as s:
        s.sendmail("alice@client.test", ["bob@far.test"], f"Subject: {subject}\r\n\r\nhello\r\n")


def _relay_site(tmp_path, host: str, smart: str) -> dict:
    cfg = base_config(tmp_path, listen=f"{host}:25")
    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.1/32"]
    cfg["connectors"][0]["smart_hosts"] = [f"[{smart}]"]
    return cfg


def test_sighup_applies_relay_allow_and_a_broken_file_changes_nothing(gateway, peers, tmp_path):
    peer = peers(SMART)
    cfg = _relay_site(tmp_path, GW_HOST, SMART)
    gw = gateway(cfg)
    code, text = _rcpt(GW_HOST)
    assert code == 550 and text.startswith("5.7.1"), (code, text)

    held = smtplib.SMTP(GW_HOST, 25, timeout=30, source_address=(CLIENT, 0))   # in progress over the reload
    held.ehlo("client.test")

    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.1/32", f"{CLIENT}/32"]
    gw.write_config()
    gw.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: RELOADED in gw.log()), gw.log()
    assert f"relay.allow 127.0.0.1/32, {CLIENT}/32" in gw.log()

    assert held.mail("alice@client.test")[0] == 250
    assert held.rcpt("bob@far.test")[0] == 550            # it began before the reload
    held.quit()
    assert _rcpt(GW_HOST)[0] == 250
    _send(GW_HOST, "after reload")
    assert peer.wait_for(1), gw.log()

    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.300/32"]
    gw.write_config()
    gw.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "running configuration is kept" in gw.log()), gw.log()
    broken = [line for line in gw.log().splitlines() if "running configuration is kept" in line]
    assert "virtual_servers[0].relay.allow[0]" in broken[-1] and "127.0.0.300" in broken[-1]
    assert gw.log().count(RELOADED) == 1
    assert _rcpt(GW_HOST)[0] == 250                       # still the last good settings

    gw.config_path.write_text(gw.config_path.read_text() + "\n  oops: [unclosed\n")
    gw.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "invalid YAML" in gw.log()), gw.log()
    assert _rcpt(GW_HOST)[0] == 250
    assert gw.proc.poll() is None


def test_sighup_reaches_every_worker(gateway, peers, tmp_path):
    peers(WSMART)
    cfg = _relay_site(tmp_path, WGW_HOST, WSMART)
    cfg["gateway"]["workers"] = 2
    gw = gateway(cfg)
    assert wait_until(lambda: "worker 1: " in gw.log() and "control.sock.1" in gw.log(), 30), gw.log()
    assert _rcpt(WGW_HOST)[0] == 550

    cfg["virtual_servers"][0]["relay"]["allow"] = [f"{CLIENT}/32"]
    gw.write_config()
    gw.proc.send_signal(signal.SIGHUP)                    # to the supervisor only

    def reloaded_lines() -> list[str]:
        return [line for line in gw.log().splitlines() if RELOADED in line]

    assert wait_until(lambda: len(reloaded_lines()) == 2, 30), gw.log()
    assert sum("worker 1: " in line for line in reloaded_lines()) == 1
    assert all(_rcpt(WGW_HOST)[0] == 250 for _ in range(20))    # whichever process takes it
