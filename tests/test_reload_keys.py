"""SIGHUP against the running daemon, key by key: what can change live is applied -- proven by what the
gateway does next -- and every other changed key is named in one ``needs a restart: <key>`` line by the
core, whatever plugins are enabled, while the gateway keeps running as it started."""
from __future__ import annotations

import re
import signal
import smtplib

import pytest

from gwprocess import base_config, port_open, wait_until
from test_tls_e2e import HOSTNAME, client_context, peer_certificate, write_cert

trustme = pytest.importorskip("trustme")

GW_HOST, PORT = "127.0.0.130", 2525
CLIENT, NEW_CLIENT = "127.0.0.131", "127.0.0.134"
OLD_SMART, NEW_SMART = "127.0.0.132", "127.0.0.133"
BARE_HOST = "127.0.0.136"


def sighup(gw, cfg: dict) -> None:
    """Write ``cfg`` and send SIGHUP; returns once the reload's summary line is in the log."""
    before = gw.log().count("read again and valid")
    gw.config = cfg
    gw.write_config()
    gw.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: gw.log().count("read again and valid") > before), gw.log()


def reload_lines(gw, kind: str) -> list[str]:
    return re.findall(rf"SIGHUP: {kind}: (\S+)", gw.log())


def smtp(source: str = CLIENT, host: str = GW_HOST) -> smtplib.SMTP:
    s = smtplib.SMTP(host, PORT, timeout=10, source_address=(source, 0))
    s.ehlo("client.test")
    return s


def test_live_keys_are_applied(gateway, peers, tmp_path):
    ca = trustme.CA()
    cert, key, first = write_cert(ca, tmp_path / "tls1", HOSTNAME)
    old_peer, new_peer = peers(OLD_SMART), peers(NEW_SMART)
    new_peer.set_reply("rcpt", lambda rcpt: "451 4.2.0 later" if rcpt.startswith("later") else None)
    cfg = base_config(tmp_path, listen=f"{GW_HOST}:{PORT}")
    cfg["gateway"]["hostname"] = HOSTNAME
    cfg["gateway"]["queue"]["retry"] = ["1h"]
    vs = cfg["virtual_servers"][0]
    vs["relay"] = {"allow": [f"{CLIENT}/32"], "allow_authenticated": False}
    vs["tls"] = {"certificate": str(cert), "key": str(key)}
    cfg["connectors"][0]["smart_hosts"] = [f"[{OLD_SMART}]"]
    cfg["plugins"]["diag_logging"] = {"levels": {}}
    gw = gateway(cfg)
    context = client_context(ca)
    assert peer_certificate((GW_HOST, PORT), context, False) == first

    new_cert, new_key, second = write_cert(ca, tmp_path / "tls2", HOSTNAME)
    cfg["connectors"][0]["smart_hosts"] = [f"[{NEW_SMART}]"]
    cfg["connectors"][0]["delivery_restrictions"] = {"default": "accept", "except": ["blocked@example.test"]}
    cfg["gateway"]["queue"]["retry"] = ["1s"]
    vs["limits"]["max_recipients"] = 1
    vs["relay"]["allow"].append(f"{NEW_CLIENT}/32")
    vs["tls"] = {"certificate": str(new_cert), "key": str(new_key)}
    cfg["plugins"]["diag_logging"] = {"levels": {"smtp_protocol": "maximum"}, "format": "json"}
    sighup(gw, cfg)

    assert sorted(reload_lines(gw, "applied")) == sorted([
        "gateway.queue.retry", "virtual_servers[0].limits.max_recipients", "virtual_servers[0].relay.allow",
        "virtual_servers[0].tls.certificate", "virtual_servers[0].tls.key", "connectors[0].smart_hosts",
        "connectors[0].delivery_restrictions.except", "plugins.diag_logging.levels.smtp_protocol"])
    assert reload_lines(gw, "needs a restart") == ["plugins.diag_logging.format"]   # read at start only

    # smart hosts: the next message goes to the new one
    with smtp() as s:
        s.sendmail("alice@example.test", ["bob@remote.test"], "Subject: after\r\n\r\nafter the reload\r\n")
    assert new_peer.wait_for(1), gw.log()
    assert old_peer.messages == []
    # the retry schedule: a deferral is tried again after 1s, not 1h
    with smtp() as s:
        s.sendmail("alice@example.test", ["later@remote.test"], "Subject: later\r\n\r\nlater\r\n")
    assert wait_until(lambda: gw.log().count("to=<later@remote.test>") >= 2, 15), gw.log()
    with smtp() as s:
        assert s.mail("alice@example.test")[0] == 250
        assert s.rcpt("one@remote.test")[0] == 250
        assert s.rcpt("two@remote.test")[0] == 452                   # limits.max_recipients: 1
    with smtp(NEW_CLIENT) as s:                                      # relay.allow
        assert s.mail("alice@example.test")[0] == 250 and s.rcpt("bob@remote.test")[0] == 250
    with smtp() as s:                                                # delivery_restrictions
        assert s.mail("blocked@example.test")[0] == 250 and s.rcpt("bob@remote.test")[0] == 550
    assert peer_certificate((GW_HOST, PORT), context, False) == second       # the new files
    assert "[smtp_protocol/maximum] command" in gw.log()                       # the new level, still text


def test_other_keys_are_reported_and_kept_without_any_plugin(gateway, tmp_path):
    cfg = base_config(tmp_path, listen=f"{BARE_HOST}:{PORT}")
    cfg["plugins"] = {"enabled": [], "local": []}
    gw = gateway(cfg)
    with smtplib.SMTP(BARE_HOST, PORT, timeout=10) as s:
        assert b"gw.example.test" in s.ehlo("client.test")[1]

    cfg["virtual_servers"][0]["listen"] = [f"{BARE_HOST}:{PORT + 1}"]
    cfg["gateway"]["hostname"] = "renamed.example.test"
    cfg["gateway"]["spool"] = str(tmp_path / "other-spool")
    cfg["gateway"]["metrics"] = {"enabled": True, "listen": f"{BARE_HOST}:9125"}
    cfg["gateway"]["dns"]["nameservers"] = ["127.0.0.53"]
    cfg["connectors"][0]["address_spaces"] = [{"domain": "*", "cost": 5}]
    cfg["plugins"]["enabled"] = ["diag_logging"]
    sighup(gw, cfg)

    assert sorted(reload_lines(gw, "needs a restart")) == sorted([
        "gateway.hostname", "gateway.spool", "gateway.dns.nameservers", "gateway.metrics.enabled",
        "gateway.metrics.listen", "virtual_servers[0].listen", "connectors[0].address_spaces",
        "plugins.enabled"])
    assert reload_lines(gw, "applied") == []
    with smtplib.SMTP(BARE_HOST, PORT, timeout=10) as s:             # still the listener and name it began with
        assert b"gw.example.test" in s.ehlo("client.test")[1]
        assert s.sendmail("alice@example.test", ["bob@example.test"], "Subject: x\r\n\r\nx\r\n") == {}
    assert not port_open(BARE_HOST, PORT + 1)
    assert wait_until(lambda: "to=<bob@example.test>, relay=local" in gw.log())
    assert not (tmp_path / "other-spool").exists()


# -- the key paths, without a daemon ----------------------------------------------------------------

def _parsed(cfg: dict):
    from mta.config import parse_config
    return parse_config(cfg)


def test_changes_are_named_as_the_file_names_them_and_can_be_taken_over(tmp_path):
    from mta.config.changes import diff, with_changes
    cfg = base_config(tmp_path)
    old = _parsed(cfg)
    cfg["connectors"][0]["delivery_restrictions"] = {"default": "reject", "except": ["@example.test"]}
    cfg["connectors"][0]["delivery"] = {"schedule": {"mon": ["08:00-18:00"]}}
    cfg["plugins"]["diag_logging"]["levels"]["ndr"] = "maximum"
    cfg["gateway"]["local_domains"]["other.test"] = {"maildir": str(tmp_path / "other")}
    cfg["virtual_servers"].append({"name": "Second", "listen": ["127.0.0.1:2526"]})
    new = _parsed(cfg)
    changes = diff(old, new)
    assert [c.path for c in changes] == [
        "gateway.local_domains.other.test", "virtual_servers",
        "connectors[0].delivery.schedule", "connectors[0].delivery_restrictions.default",
        "connectors[0].delivery_restrictions.except", "plugins.diag_logging.levels.ndr"]
    assert changes[2].pattern == "connectors[].delivery.schedule"
    taken = with_changes(old, [c for c in changes if c.path.startswith(("connectors", "plugins"))])
    assert [c.path for c in diff(taken, new)] == ["gateway.local_domains.other.test", "virtual_servers"]
    assert taken.plugins.settings["diag_logging"]["levels"]["ndr"] == "maximum"
    assert diff(new, new) == []
